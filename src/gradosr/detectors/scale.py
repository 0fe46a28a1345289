"""SCALE: scaling of the penultimate activations, without pruning, scored by the energy.

Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
Detection Enhancement", ICLR 2024. Per sample, on its penultimate activations h (D;
``features``, the input of the linear head W, b), with the percentile p:

    k  = D − round(D·p/100)        (at least 1),
    s1 = Σ_i h_i,    s2 = Σ of the k largest entries of h,
    SCALE(h) = h · exp(s1 / s2)    (every unit kept: no pruning),
    score(x) = logsumexp_k (W · SCALE(h) + b)_k,

higher = more likely known (:mod:`gradosr.detectors.shaping`: recomputing the logits
through the head is exact because it is linear; a model whose head is not its last
linear map needs its penultimate layer as ``features``). SCALE is ASH-S without its
pruning step: the paper shows that the gain comes from the scaling alone. Where s2 ≤ 0
(h = 0 for non-negative activations) the factor is 1 (see
:mod:`gradosr.detectors.shaping` on signed activations).

- Layer: the penultimate activations (after global average pooling), as in the paper.
- Percentile: per sample, over its D units (only s2 depends on it; nothing is fitted).
- p = 85, the paper's default (the authors' released configuration, which turns the
  automatic parameter search off), fixed, never tuned on unknowns; recorded in
  ``params["percentile"]``.
- Score: the energy (T = 1), as in the paper.

Differences from the reference implementations, deliberate: none in the formula.
OpenOOD v1.5 has the same default p = 85 but searches p on OOD validation data in its
automatic-parameter-search mode; pytorch-ood 0.4 defaults to 0.65 (a fraction, the ASH
default). Here p = 85 always, and the s2 ≤ 0 guard keeps the score finite for zero
activations (s2, a sum of the k largest values, does not depend on how ties are
ordered).
"""

from __future__ import annotations

import torch

from gradosr.detectors.registry import register
from gradosr.detectors.shaping import ENERGY, ShapedEnergy, check_percent, kept_count, sum_ratio, top_mask


@register
class Scale(ShapedEnergy):
    method_id = "scale"
    paper = "Xu, Chen, Franchi & Yao, ICLR 2024"

    def __init__(self, percentile: float = 85.0) -> None:
        """``percentile``: p of the per-sample top-k sum s2 (the paper's 85)."""
        self.percentile = percentile
        self.params = {"layer": "penultimate", "percentile": check_percent(percentile),
                       "percentile_over": "per sample, over its D units",
                       "kept": "k = D - round(D*p/100), at least 1 (for s2 only; no pruning)", "score": ENERGY}

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        """h · exp(s1 / s2)."""
        kept = top_mask(h, kept_count(h.shape[1], self.params["percentile"]))
        return h * torch.exp(sum_ratio(h, kept))[:, None]
