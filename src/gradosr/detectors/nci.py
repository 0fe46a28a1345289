"""NCI: the neural-collapse-inspired detector.

Liu & Qin, "Detecting Out-of-Distribution through the Lens of Neural Collapse",
CVPR 2025 (arXiv:2311.01479, 2023). Acts on the penultimate features h (D) and the
final linear head's weight rows w_k (D), as in the paper. With μ_G the mean of the known
training features (the global mean of neural collapse; the one fitted quantity) and
ŷ = argmax_k z_k the predicted class (ties: the lowest index),

    pScore(h) = w_ŷ · (h − μ_G) / ‖h − μ_G‖₂          (proximity to the class's weight vector),
    score(h)  = pScore(h) + α ‖h‖₁,      α = 1e-4,

higher = more likely known (ID features align with their class's weight vector, and lie
farther from the origin). α is the default of the authors' own implementation (their
OpenOOD ``nci`` configuration); OpenOOD's benchmark instead picks α from
{1e-4, 1e-3, 1e-2, 1e-1} on its validation split, which holds OOD samples, so that
search is not done here (it would tune on unknowns). The first term is the authors'
(and pytorch-ood's) w_ŷ · (h − μ_G)/‖h − μ_G‖, not divided by ‖w_ŷ‖ (a cosine only when
the weight norms are equal, as neural collapse predicts).

A query at μ_G exactly has pScore 0 (its denominator is clamped at 1e-12). Computed in
float64.

Differences from the references: none from OpenOOD v1.5 (α = 1e-4, its default).
pytorch-ood's NCI defaults to α = 0 (the pScore alone); with α = 1e-4 the two agree.
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.fdbd import TrainMeanScorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError

#: the weight of the L1 feature norm (the authors' default)
NCI_ALPHA = 1e-4


@register
class NCI(TrainMeanScorer):
    method_id = "nci"
    family = "feature"
    paper = "Liu & Qin, CVPR 2025"

    def __init__(self, alpha: float = NCI_ALPHA) -> None:
        """``alpha``: the weight of ‖h‖₁ (fixed a priori, never tuned on unknowns)."""
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and np.isfinite(alpha)
                and alpha >= 0):
            raise ConfigError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = alpha
        self.params = {"layer": "penultimate features + linear head", "alpha": float(alpha),
                       "centre": "mean of training features", "norm": "L1"}

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """w_ŷ·(h − μ_G)/‖h − μ_G‖₂ + α‖h‖₁ -> N (float64), higher = more likely known."""
        z, h, w, dist = self._scoring_rows(inputs)
        pred = z.argmax(axis=1)
        p_score = np.einsum("nd,nd->n", w[pred], h - self.train_mean_) / dist
        return p_score + float(self.alpha) * np.abs(h).sum(axis=1)
