"""GradOrth: the norm of the head gradient projected on the known data's important subspace.

Behpour, Doan, Li, He & Ren, "GradOrth: A Simple yet Efficient Out-of-Distribution
Detection with Orthogonal Projection of Gradients", NeurIPS 2023. On the head's input
features h (D) and the logit gradient of the uniform-target loss g = softmax(z) − 1/K
(K), the head's weight gradient is g hᵀ; with S (D×r) the top right-singular vectors of
the N×D matrix of known training features holding ``energy`` (0.97, fixed a priori) of
their squared singular values,

    score(x) = log ‖g hᵀ S Sᵀ‖_F = log (‖g‖₂ ‖Sᵀh‖₂),

higher = more likely known (known inputs' gradients lie in the known subspace). A
component of the ``plus`` family (``signals=gradorth``), not a benchmark row.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError

#: fraction of the known training features' energy kept in the subspace
GRADORTH_ENERGY = 0.97
_EPS = 1e-12


def important_subspace(features: torch.Tensor, energy: float = GRADORTH_ENERGY) -> torch.Tensor:
    """The top right-singular vectors (D×r, float64) of the N×D matrix ``features``, r
    the fewest holding ``energy`` of the sum of squared singular values."""
    x = torch.as_tensor(features).to(torch.float64)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    share = torch.cumsum(sv.square(), 0) / sv.square().sum().clamp_min(_EPS)
    r = int(torch.searchsorted(share, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    return vh[:min(r, len(sv))].T.contiguous()


@register(kind="component")
class GradOrth(Scorer):
    method_id = "gradorth"
    family = "gradient"
    paper = "Behpour et al., NeurIPS 2023"
    needs = ("logits", "features")
    needs_fit = True
    _state_tensors = ("subspace_",)

    def __init__(self, energy: float = GRADORTH_ENERGY) -> None:
        if not 0.0 < energy <= 1.0:
            raise ConfigError(f"energy must lie in (0, 1], got {energy!r}")
        self.energy = energy
        self.params = {"energy": float(energy), "target": "uniform", "layer": "head"}

    def _fit(self, outputs: ScorerInputs, labels) -> None:
        self.subspace_ = important_subspace(torch.from_numpy(float_rows(outputs, "features", "GradOrth")), self.energy)

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """log(‖softmax(z) − 1/K‖₂ ‖Sᵀh‖₂) of logits N×K and features N×D -> N (float64)."""
        self.check_fitted()
        z, h = (torch.from_numpy(float_rows(outputs, n, "GradOrth")) for n in ("logits", "features"))
        if h.shape[1] != self.subspace_.shape[0]:
            raise DataError(f"feature dimension {h.shape[1]} does not match the fitted {self.subspace_.shape[0]}")
        g = torch.softmax(z, dim=1) - 1.0 / z.shape[1]
        return torch.log((g.norm(dim=1) * (h @ self.subspace_).norm(dim=1)).clamp_min(1e-300)).numpy()
