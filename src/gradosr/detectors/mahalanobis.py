"""Mahalanobis distance to the nearest class mean (tied covariance).

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks", NeurIPS 2018. On the penultimate features f (D) of
the N known training samples with labels 0..K-1:

    μ_k = mean of the features of class k,
    Σ   = (1/N) Σ_k Σ_{i: y_i = k} (f_i − μ_k)(f_i − μ_k)ᵀ       (one tied covariance),

    score(f) = − min_k (f − μ_k)ᵀ Σ⁺ (f − μ_k),

higher = more likely known (closer to some class mean). Only the penultimate layer is
used: no input perturbation and no feature ensemble / logistic regression (the paper's
"vanilla" score on one layer).

Σ⁺ is the Moore–Penrose pseudo-inverse, since ReLU features often have dead units and Σ
is then rank-deficient. It is computed from the symmetric eigendecomposition
Σ = U diag(λ) Uᵀ, dropping the eigenvalues λ_i ≤ D · eps · max_j |λ_j| (eps = float64
machine epsilon) — the default cutoff of ``scipy.linalg.pinvh``, which the authors'
code reaches through ``sklearn.covariance.EmpiricalCovariance().precision_``; equal to
``np.linalg.pinv(Σ, rcond=D * eps)``. With W = U_r diag(λ_r^{-1/2}) (the kept columns),
(f − μ)ᵀ Σ⁺ (f − μ) = ‖fW − μW‖², which is evaluated by explicit differences (no
cancellation near a class mean), in float64 and in chunks of queries.

``source`` names the representation (default the penultimate ``features``); the
``plus`` family applies the same score to gradient representations (``norms``,
``projection``): there the class-centred second moment of per-sample gradients is a
centred empirical Fisher information.
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, check_chunk_size, check_labels, class_counts, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import DataError


@register
class Mahalanobis(Scorer):
    method_id = "mahalanobis"
    family = "feature"
    paper = "Lee, Lee, Lee & Shin, NeurIPS 2018"
    needs = ("features",)
    needs_fit = True
    _state_tensors = ("means_", "whiten_")

    def __init__(self, chunk_size: int | None = None, source: str = "features") -> None:
        """``chunk_size``: queries per block (None: automatic); it does not change results.
        ``source``: the representation (a ScorerInputs field or ``gradients`` key)."""
        self.chunk_size = check_chunk_size(chunk_size)
        self.source = source
        self.needs = (source,)
        self.params = {
            "layer": "penultimate" if source == "features" else source,
            "covariance": "tied (class-centred, 1/N)",
            "inverse": "pseudo-inverse, eigenvalue cutoff D*eps*max",
            "input_perturbation": 0.0,
            "feature_ensemble": False,
        }
        self.means_: np.ndarray | None = None

    def _fit(self, outputs: ScorerInputs, labels: np.ndarray) -> None:
        """Class means and the tied covariance's pseudo-inverse square root."""
        f = float_rows(outputs, self.source, "Mahalanobis (fit)")
        y, k = check_labels(labels, len(f), outputs)
        counts = class_counts(y, k, "Mahalanobis")
        d = f.shape[1]
        means = np.zeros((k, d))
        np.add.at(means, y, f)
        means /= counts[:, None]
        centred = f - means[y]
        cov = centred.T @ centred / len(f)
        cov = (cov + cov.T) / 2
        lam, u = np.linalg.eigh(cov)
        cutoff = d * np.finfo(np.float64).eps * (np.abs(lam).max() if d else 0.0)
        keep = lam > cutoff
        self.cov_ = cov
        self.rank_ = int(keep.sum())
        self.whiten_ = u[:, keep] / np.sqrt(lam[keep])  # D×r, Σ⁺ = W Wᵀ
        self.means_ = means
        self.centres_ = means @ self.whiten_  # K×r
        self.params = {**self.params, "rank": self.rank_}

    def _restored(self) -> None:
        """From the stored class means (K×D) and whitening matrix (D×r, Σ⁺ = W Wᵀ)."""
        self.means_ = np.asarray(self.means_, dtype=np.float64)
        self.whiten_ = np.asarray(self.whiten_, dtype=np.float64)
        self.rank_ = self.whiten_.shape[1]
        self.centres_ = self.means_ @ self.whiten_
        self.params = {**self.params, "rank": self.rank_}

    def distances(self, outputs: ScorerInputs) -> np.ndarray:
        """Squared Mahalanobis distances N×K to the class means (float64)."""
        self.check_fitted()
        f = float_rows(outputs, self.source, "Mahalanobis (score)")
        if f.shape[1] != self.means_.shape[1]:
            raise DataError(
                f"feature dimension {f.shape[1]} does not match the fitted {self.means_.shape[1]}"
            )
        k, r = self.centres_.shape
        chunk = self.chunk_size or max(1, (1 << 21) // max(1, k * r))
        out = np.empty((len(f), k))
        for start in range(0, len(f), chunk):
            z = f[start : start + chunk] @ self.whiten_  # n×r
            diff = z[:, None, :] - self.centres_[None, :, :]
            out[start : start + chunk] = np.einsum("nkr,nkr->nk", diff, diff)
        return out

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """−min_k (f − μ_k)ᵀ Σ⁺ (f − μ_k) -> N (float64), higher = more likely known."""
        return -self.distances(outputs).min(axis=1)
