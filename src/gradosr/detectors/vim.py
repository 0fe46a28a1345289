"""Virtual-logit Matching (ViM).

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching",
CVPR 2022. Acts on the penultimate features x (D, the input of the final linear head
z = Wx + b) and on the logits z (K), as in the paper.

**Fit** (the N known training samples; labels are not used):

- the origin u = −W⁺ b (W⁺ the Moore–Penrose pseudo-inverse of the head's K×D weight;
  zero for a head without a bias), the point the paper moves the feature space to;
- the principal subspace P: the eigenvectors of the ``dim`` largest eigenvalues of
  (1/N) Σ_i (x_i − u)(x_i − u)ᵀ, the second moment of the training features about u
  (the paper's "principal space of X" after the offset; the authors' code fits
  ``EmpiricalCovariance(assume_centered=True)`` to x − u, i.e. the features are centred
  at u, not at their mean). The residual x^{P⊥} is the part of x − u in the
  orthogonal complement (the eigenvectors of the D − ``dim`` smallest eigenvalues);
- α = (1/N) Σ_i max_k z_ik / ((1/N) Σ_i ‖x_i^{P⊥}‖₂), matching the virtual logit's
  scale to the largest logit on the training set (fitted, recorded in ``params``).

**Subspace size** ``dim``: the authors' rule for large D, from their benchmark code:
1000 for D ≥ 2048 and 512 for 768 ≤ D < 2048; for D < 768 (the small feature spaces of
LeNet- or ResNet-18-sized models), ⌊D/2⌋ — the value OpenOOD v1.5 uses for its D = 512
ResNet-18 (dim 256) and D = 84 LeNet (dim 42) benchmarks (the authors' code would keep
512, which leaves little or no residual below D = 768). D < 2 raises DataError (no
principal subspace and residual to split into). The size used is ``params["dim"]``.

**Score.** With the virtual logit α‖x^{P⊥}‖₂, the paper's ViM score is the softmax
probability of the virtual class, P_v = exp(α‖x^{P⊥}‖) / (Σ_k exp(z_k) + exp(α‖x^{P⊥}‖)),
higher = OOD. Here

    score(x) = logsumexp_k(z_k) − α ‖x^{P⊥}‖₂ = log((1 − P_v) / P_v),

a strictly decreasing function of P_v (the same ranking, the form the authors' code
returns), higher = more likely known. Computed in float64; finite for finite inputs.

**Fit at scale**: two streamed passes over float64 blocks of the training features
(:func:`gradosr.detectors.base.float_row_blocks`, the same blocks however the rows are
chunked): the D×D second moment about u, then the residual and feature norms for α;
no float64 copy of the N×D features is formed, and a chunked fit keeps its chunks
without concatenating them. The eigendecomposition is of the D×D moment only.

A training set whose features lie (numerically) inside the principal subspace (mean
residual norm ≤ √eps times the mean ‖x − u‖) raises DataError: α would be unbounded.

Differences from the references: none in the formula. OpenOOD v1.5 and pytorch-ood
take ``dim`` as a required argument (OpenOOD's benchmark configs: 256 for ResNet-18,
42 for LeNet, i.e. D/2); here it follows the rule above when not given. Both use
``np.linalg.eig`` on the symmetric second-moment matrix; here ``np.linalg.eigh``
(real, orthonormal eigenvectors; the same subspace).
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, float_row_blocks, float_rows, head_rows, matrix_field
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError


def principal_dim(d: int) -> int:
    """The principal-subspace size for feature dimension ``d`` (module docstring)."""
    if d >= 2048:
        return 1000
    if d >= 768:
        return 512
    return d // 2


@register
class ViM(Scorer):
    method_id = "vim"
    family = "feature"
    paper = "Wang, Li, Feng & Zhang, CVPR 2022"
    needs = ("logits", "features", "head_weight", "head_bias")
    needs_fit = True
    _state_tensors = ("origin_", "residual_basis_")
    _state_meta = ("alpha_",)

    def __init__(self, dim: int | None = None) -> None:
        """``dim``: the principal-subspace size (None: the rule of the module docstring)."""
        if dim is not None and (isinstance(dim, bool) or int(dim) != dim or dim < 1):
            raise ConfigError(f"dim must be a positive integer or None, got {dim!r}")
        self.dim = dim
        self.params = {"layer": "penultimate features + logits", "origin": "-pinv(W) b",
                       "dim_rule": "given" if dim is not None else "1000 if D>=2048, 512 if D>=768, else D//2",
                       "dim": dim, "alpha": None}

    def _finalize(self) -> None:
        """Origin u, residual basis (D×(D−dim)) and α from the training features: the
        chunks kept by the fit, read in two streamed passes (module docstring)."""
        parts = [c for c, _ in getattr(self, "_chunks", [])]
        if not parts or not sum(len(matrix_field(p, "features", "ViM")) for p in parts):
            raise DataError(f"{self.method_id}: fit needs at least one training sample")
        self._fit_parts(parts)
        self._chunks = []
        self.fitted_ = True

    def _fit_parts(self, parts: list[ScorerInputs]) -> None:
        logits = [float_rows(p, "logits", "ViM") for p in parts]  # N×K: small
        sizes = [len(matrix_field(p, "features", "ViM")) for p in parts]
        n, d = sum(sizes), matrix_field(parts[0], "features", "ViM").shape[1]
        if sum(len(z) for z in logits) != n:
            raise DataError(f"ViM: {sum(len(z) for z in logits)} logit rows but {n} feature rows")
        if d < 2:
            raise DataError(f"ViM needs a feature dimension of at least 2 (a principal subspace and a residual), "
                            f"got {d}")
        dim = principal_dim(d) if self.dim is None else int(self.dim)
        if dim >= d:
            raise DataError(f"ViM: the principal subspace (dim {dim}) must be smaller than the feature dimension {d}")
        w, b = head_rows(parts[0], logits[0].shape[1], d, "ViM")
        origin = -np.linalg.pinv(w) @ b
        moment = np.zeros((d, d))
        for x in float_row_blocks(parts, "features", "ViM"):
            centred = x - origin
            moment += centred.T @ centred
        moment /= n
        _, vectors = np.linalg.eigh((moment + moment.T) / 2)  # ascending eigenvalues
        residual_basis = vectors[:, : d - dim]
        residual = scale = 0.0
        for x in float_row_blocks(parts, "features", "ViM"):
            centred = x - origin
            residual += np.linalg.norm(centred @ residual_basis, axis=1).sum()
            scale += np.linalg.norm(centred, axis=1).sum()
        residual, scale = residual / n, scale / n
        if not residual > np.sqrt(np.finfo(np.float64).eps) * scale:
            raise DataError(f"ViM: the training features lie in their {dim}-dimensional principal subspace "
                            "(no residual to match the logits to); give a smaller dim")
        self.origin_ = origin
        self.residual_basis_ = np.ascontiguousarray(residual_basis)
        self.alpha_ = float(np.concatenate(logits).max(axis=1).mean() / residual)
        self._restored()

    def _restored(self) -> None:
        self.origin_ = np.asarray(self.origin_, dtype=np.float64)
        self.residual_basis_ = np.asarray(self.residual_basis_, dtype=np.float64)
        d, r = self.residual_basis_.shape
        self.params = {**self.params, "dim": d - r, "alpha": float(self.alpha_)}

    def residual_norms(self, inputs: ScorerInputs) -> np.ndarray:
        """‖x^{P⊥}‖₂ -> N (float64), the norm of the features' residual."""
        self.check_fitted()
        x = float_rows(inputs, "features", "ViM")
        if x.shape[1] != len(self.origin_):
            raise DataError(f"feature dimension {x.shape[1]} does not match the fitted {len(self.origin_)}")
        return np.linalg.norm((x - self.origin_) @ self.residual_basis_, axis=1)

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """logsumexp(z) − α‖x^{P⊥}‖₂ -> N (float64), higher = more likely known."""
        r = self.residual_norms(inputs)
        z = float_rows(inputs, "logits", "ViM")
        from scipy.special import logsumexp  # imported on use: scipy.special costs every command 0.3 s

        return logsumexp(z, axis=1) - self.alpha_ * r
