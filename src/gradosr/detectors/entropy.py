"""Predictive entropy of the softmax.

The entropy baseline of the out-of-distribution literature, the natural companion of
the maximum softmax probability of Hendrycks & Gimpel, "A Baseline for Detecting
Misclassified and Out-of-Distribution Examples in Neural Networks", ICLR 2017 (pytorch-ood
ships it as ``Entropy``). Acts on the logits z (K) through p = softmax(z):

    H(p) = −Σ_k p_k log p_k,        score(x) = −H(p) = Σ_k p_k log p_k,

higher = more likely known (a peaked softmax has low entropy). No hyperparameters
(temperature 1).

Computed in float64 from the log-softmax (with log1p, so that log p stays accurate for
p close to 1): p_k log p_k with log p_k finite, so a probability that underflows to 0
contributes exactly 0 (never 0·log 0 = NaN). Finite for finite logits; in [−log K, 0].

Differences from the references: pytorch-ood clips p at 1e-7 before the logarithm, which
adds about 1.6e-6 per near-zero class; here the exact entropy.
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, float_rows, log_softmax
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register


@register
class Entropy(Scorer):
    method_id = "entropy"
    family = "logit"
    paper = "entropy baseline (cf. Hendrycks & Gimpel, ICLR 2017)"

    def __init__(self) -> None:
        self.params = {"layer": "logits (softmax)", "temperature": 1.0}

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """−H(softmax(z)) -> N (float64), higher = more likely known."""
        log_p = log_softmax(float_rows(inputs, "logits", "entropy"))
        return (np.exp(log_p) * log_p).sum(axis=1)
