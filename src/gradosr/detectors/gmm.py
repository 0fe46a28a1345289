"""Class-conditional Gaussians with per-class covariances (GMM).

The class-conditional Gaussian density of the penultimate features h (D): the
generative classifier behind the Mahalanobis score (Lee, Lee, Lee & Shin, NeurIPS 2018)
without the shared covariance, as pytorch-ood's ``GMM`` detector. On the known training
samples with labels 0..K-1 (n_k per class):

    μ_k = (1/n_k) Σ_{i: y_i = k} h_i,      Σ_k = (1/n_k) Σ_{i: y_i = k} (h_i − μ_k)(h_i − μ_k)ᵀ,

    score(h) = max_k log N(h; μ_k, Σ_k + λI)
             = max_k −½ [ (h − μ_k)ᵀ (Σ_k + λI)⁻¹ (h − μ_k) + log det(Σ_k + λI) + D log 2π ],

higher = more likely known (the density of the best-fitting class; no class priors).

**Regularisation: a small ridge**, λ = 1e-6 · tr(Σ̄)/D, with Σ̄ the tied class-centred
covariance of ``mahalanobis`` (1e-6 of the average feature variance within classes). A
per-class covariance is often singular (dead ReLU units, or n_k ≤ D); a pseudo-inverse
would need pseudo-determinants of different ranks, which make the densities of
different classes incomparable, while the ridge keeps every class a proper Gaussian on
all of R^D. Relative to the within-class variance it is scale-free: scaling the features
by c shifts every score by −D log c and leaves their order unchanged. tr(Σ̄) = 0 (every
class a single point) raises DataError. The inverse and the log-determinant come from
the eigendecomposition of Σ_k + λI (eigenvalues below 0 from rounding set to 0 first);
distances by explicit differences in whitened coordinates, float64, chunked over
queries. The means and per-class scatters are accumulated in one streamed float64 pass
(:class:`gradosr.detectors.mahalanobis.ClassMoments`, K·D² memory).

Differences from the references: pytorch-ood's GMM adds an absolute 1e-6·I and scores
min_k of the Mahalanobis terms (h − μ_k)ᵀ(Σ_k + 1e-6 I)⁻¹(h − μ_k) / D alone, without the
log-determinants (its docstring's mixture likelihood is not what it computes); leaving
the log-determinants out changes the ranking when the classes' covariances differ.
Here the Gaussian log-density itself, as the method is defined. OpenOOD v1.5's ``gmm``
is a different method (multi-layer, multi-component GMMs).
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, check_chunk_size, class_counts, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.mahalanobis import ClassMoments, accumulate_moments
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError

#: the ridge, relative to the average within-class feature variance
GMM_RIDGE = 1e-6


@register
class GMM(Scorer):
    method_id = "gmm"
    family = "feature"
    paper = "class-conditional Gaussian, per-class covariance (cf. Lee et al., NeurIPS 2018)"
    needs = ("features",)
    needs_fit = True
    _state_tensors = ("means_", "whiten_", "log_dets_")
    _state_meta = ("ridge_",)

    def __init__(self, ridge: float = GMM_RIDGE, chunk_size: int | None = None) -> None:
        """``ridge``: λ relative to tr(Σ̄)/D; ``chunk_size``: queries per block (None:
        automatic); it does not change results."""
        if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and np.isfinite(ridge) and ridge > 0):
            raise ConfigError(f"ridge must be a finite number > 0, got {ridge!r}")
        self.ridge = ridge
        self.chunk_size = check_chunk_size(chunk_size)
        self.params = {"layer": "penultimate", "covariance": "per class (1/n_k)",
                       "regularisation": "ridge lambda = ridge * tr(tied covariance) / D", "ridge": float(ridge),
                       "lambda": None, "class_prior": "none (max over classes)"}

    def _start_fit(self) -> None:
        self._moments = ClassMoments(per_class=True)

    def _pending(self) -> bool:
        return getattr(self, "_moments", None) is not None and self._moments.n > 0 \
            and not getattr(self, "fitted_", False)

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        """Add one chunk to the class means and per-class scatters (streamed, float64)."""
        if getattr(self, "_moments", None) is None:
            self._start_fit()
        accumulate_moments([self._moments], chunk, labels, "features", "GMM")

    def _finalize(self) -> None:
        """Class means, per-class whitening matrices of Σ_k + λI and their log-determinants."""
        m = getattr(self, "_moments", None)
        if m is None or m.flush().n == 0:
            raise DataError(f"{self.method_id}: fit needs at least one training sample")
        counts = class_counts(m.counts, len(m.counts), "GMM", counted=True)
        means, d = m.means.copy(), m.means.shape[1]
        lam = float(self.ridge) * np.trace(m.covariance()) / d
        if not lam > 0:
            raise DataError("GMM: the training features have no within-class variance (every class is one point)")
        whiten = np.empty((len(means), d, d))
        log_dets = np.empty(len(means))
        for c in range(len(means)):  # one eigendecomposition per class
            cov = m.scatter[c] / counts[c]
            eig, u = np.linalg.eigh((cov + cov.T) / 2)
            eig = np.maximum(eig, 0.0) + lam
            whiten[c] = u / np.sqrt(eig)
            log_dets[c] = np.log(eig).sum()
        self.means_, self.whiten_, self.log_dets_, self.ridge_ = means, whiten, log_dets, lam
        self._restored()
        self._chunks = []
        self.fitted_ = True

    def _restored(self) -> None:
        self.means_ = np.asarray(self.means_, dtype=np.float64)
        self.whiten_ = np.asarray(self.whiten_, dtype=np.float64)
        self.log_dets_ = np.asarray(self.log_dets_, dtype=np.float64)
        self.params = {**self.params, "lambda": float(self.ridge_)}

    def log_densities(self, inputs: ScorerInputs) -> np.ndarray:
        """log N(h; μ_k, Σ_k + λI) -> N×K (float64)."""
        self.check_fitted()
        h = float_rows(inputs, "features", "GMM")
        k, d = self.means_.shape
        if h.shape[1] != d:
            raise DataError(f"feature dimension {h.shape[1]} does not match the fitted {d}")
        chunk = self.chunk_size or max(1, (1 << 21) // max(1, k * d))
        out = np.empty((len(h), k))
        for start in range(0, len(h), chunk):
            diff = h[None, start : start + chunk, :] - self.means_[:, None, :]  # K×n×D
            white = np.matmul(diff, self.whiten_)  # K×n×D, batched over the classes
            out[start : start + chunk] = np.einsum("knd,knd->nk", white, white)
        return -0.5 * (out + self.log_dets_ + d * np.log(2 * np.pi))

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """max_k log N(h; μ_k, Σ_k + λI) -> N (float64), higher = more likely known."""
        return self.log_densities(inputs).max(axis=1)
