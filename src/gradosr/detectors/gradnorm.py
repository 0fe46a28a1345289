"""GradNorm.

Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
the Wild", NeurIPS 2021. The score is the L1 norm of the gradient, with respect to the
last layer's weight W (K×D), of the KL divergence between the uniform distribution u and
the softmax at temperature T (T = 1):

    L(x) = KL(u ‖ softmax(z / T)) = -(1/K) Σ_k log softmax(z / T)_k - log K,
    score(x) = ‖∂L/∂W‖₁.

Computed in closed form from the logits and the head's input features h (D): with
z = W h + b, dL/dz = (softmax(z / T) - 1/K) / T and ∂L/∂W = (dL/dz) hᵀ, so

    ‖∂L/∂W‖₁ = ‖h‖₁ · ‖dL/dz‖₁.

Orientation: higher = more likely known (confident inputs are far from uniform, so their
gradient is larger). Needs only logits and features, no model pass. With ``log=True``
the score is log ‖∂L/∂W‖₁ (the same ranking; the ``plus`` preset's ``gradnorm`` signal).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_temperature
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import DataError


@register
class GradNorm(Scorer):
    method_id = "gradnorm"
    family = "gradient"
    paper = "Huang, Geng & Li, NeurIPS 2021"
    needs = ("logits", "features")

    def __init__(self, temperature: float = 1.0, log: bool = False) -> None:
        self.temperature, self.log = temperature, bool(log)
        self.params = {"temperature": check_temperature(temperature), **({"log": True} if log else {})}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """‖h‖₁ · ‖(softmax(z/T) - 1/K)/T‖₁ for logits N×K, features N×D -> N (float64)."""
        t = self.params["temperature"]
        z = torch.as_tensor(outputs.logits, dtype=torch.float64)
        if outputs.features is None:
            raise DataError("gradnorm needs the head's input features")
        h = torch.as_tensor(outputs.features, dtype=torch.float64)
        if z.dim() != 2 or h.dim() != 2 or len(z) != len(h):
            raise DataError(f"gradnorm needs logits N×K and features N×D, got "
                            f"{tuple(z.shape)} and {tuple(h.shape)}")
        k = z.shape[1]
        g = (torch.softmax(z / t, dim=1) - 1.0 / k) / t
        norm = h.abs().sum(dim=1) * g.abs().sum(dim=1)
        return (torch.log(norm.clamp_min(1e-300)) if self.log else norm).numpy()
