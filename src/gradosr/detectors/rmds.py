"""Relative Mahalanobis distance (RMDS).

Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance
for Improving Near-OOD Detection", arXiv:2106.09022 (ICML 2021 Workshop on Uncertainty
and Robustness in Deep Learning). Acts on the penultimate features x (D), as in the
paper. On the N known training samples with labels 0..K-1:

- the class-conditional Gaussians of the Mahalanobis score (Lee et al., NeurIPS 2018):
  class means μ_k and one shared covariance Σ = (1/N) Σ_k Σ_{i: y_i = k} (x_i − μ_k)(x_i − μ_k)ᵀ,
  MD_k(x) = (x − μ_k)ᵀ Σ⁺ (x − μ_k);
- the background Gaussian of all training features, class-agnostic: μ_0 = (1/N) Σ_i x_i,
  Σ_0 = (1/N) Σ_i (x_i − μ_0)(x_i − μ_0)ᵀ, MD_0(x) = (x − μ_0)ᵀ Σ_0⁺ (x − μ_0);
- the relative distance RMD_k(x) = MD_k(x) − MD_0(x). The paper's OOD score is
  min_k RMD_k(x) (higher = OOD); the confidence here is its negative,

      score(x) = −min_k (MD_k(x) − MD_0(x)) = MD_0(x) − min_k MD_k(x),

higher = more likely known. No hyperparameters. Both Gaussians are fitted, inverted
and evaluated by :class:`gradosr.detectors.mahalanobis.Mahalanobis` (the background one
as a single class): Σ⁺ and Σ_0⁺ are pseudo-inverses with the ``scipy.linalg.pinvh``
eigenvalue cutoff D·eps·max|λ|, distances by explicit differences in whitened
coordinates, float64, chunked over queries. Both Gaussians are accumulated in the same
single streamed float64 pass (:class:`gradosr.detectors.mahalanobis.ClassMoments`).

Differences from the references: OpenOOD v1.5's RMDS uses ``sklearn`` ``EmpiricalCovariance``
precisions (the same 1/N covariances and a pinvh inverse) in float32; pytorch-ood's RMD
takes for Σ_0 the un-normalised scatter matrix Σ_i (x_i − μ_0)(x_i − μ_0)ᵀ (N times the
covariance) plus 1e-6·I and inverts it, which divides MD_0 by about N and so nearly
removes the background term. Here both covariances are the maximum-likelihood (1/N) estimates of the
paper, with the pseudo-inverse of ``mahalanobis`` instead of a ridge.
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, check_chunk_size, class_counts
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.mahalanobis import ClassMoments, Mahalanobis, accumulate_moments, pinv_sqrt
from gradosr.detectors.registry import register
from gradosr.errors import DataError


def _restored_mahalanobis(means: np.ndarray, whiten: np.ndarray, chunk_size: int | None,
                          source: str = "features") -> Mahalanobis:
    m = Mahalanobis(chunk_size=chunk_size, source=source)
    m.means_, m.whiten_ = means, whiten
    m._restored()
    m.fitted_ = True
    return m


@register
class RMDS(Scorer):
    method_id = "rmds"
    family = "feature"
    paper = "Ren et al., arXiv:2106.09022, 2021"
    needs = ("features",)
    needs_fit = True
    _state_tensors = ("means_", "whiten_", "background_mean_", "background_whiten_")

    def __init__(self, chunk_size: int | None = None, source: str = "features") -> None:
        """``chunk_size``: queries per block (None: automatic); it does not change results.
        ``source``: the representation (a ScorerInputs field or ``gradients`` key; the
        ``plus`` family's ``relative_mahalanobis`` gradient metric reads ``projection``)."""
        self.chunk_size = check_chunk_size(chunk_size)
        self.source = source
        self.needs = (source,)
        self.params = {"layer": "penultimate" if source == "features" else source,
                       "covariance": "tied (class-centred, 1/N)",
                       "background": "one Gaussian of all training features (1/N)",
                       "inverse": "pseudo-inverse, eigenvalue cutoff D*eps*max", "rank": None,
                       "background_rank": None}

    def _start_fit(self) -> None:
        self._moments = [ClassMoments(), ClassMoments()]  # the classes, the background

    def _pending(self) -> bool:
        return getattr(self, "_moments", None) is not None and self._moments[0].n > 0 \
            and not getattr(self, "fitted_", False)

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        """Add one chunk to the class-conditional and the background Gaussians (streamed)."""
        if getattr(self, "_moments", None) is None:
            self._start_fit()
        accumulate_moments(self._moments, chunk, labels, self.source, "RMDS", single_class=[False, True])

    def _finalize(self) -> None:
        """The class-conditional Gaussians (tied covariance) and the background Gaussian."""
        classes, background = getattr(self, "_moments", None) or (None, None)
        if classes is None or classes.flush().n == 0:
            raise DataError(f"{self.method_id}: fit needs at least one training sample")
        class_counts(classes.counts, len(classes.counts), "RMDS", counted=True)
        self.means_, self.whiten_ = classes.means.copy(), pinv_sqrt(classes.covariance())
        background.flush()
        self.background_mean_, self.background_whiten_ = background.means.copy(), pinv_sqrt(background.covariance())
        self._restored()
        self._chunks = []
        self.fitted_ = True

    def _restored(self) -> None:
        for name in self._state_tensors:  # C-ordered float64, as after a save/load round trip
            setattr(self, name, np.ascontiguousarray(np.asarray(getattr(self, name), dtype=np.float64)))
        self.classes_ = _restored_mahalanobis(self.means_, self.whiten_, self.chunk_size, self.source)
        self.background_ = _restored_mahalanobis(self.background_mean_, self.background_whiten_, self.chunk_size,
                                                 self.source)
        self.params = {**self.params, "rank": self.classes_.rank_, "background_rank": self.background_.rank_}

    def relative_distances(self, inputs: ScorerInputs) -> np.ndarray:
        """RMD_k(x) = MD_k(x) − MD_0(x) -> N×K (float64)."""
        self.check_fitted()
        return self.classes_.distances(inputs) - self.background_.distances(inputs)

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """−min_k (MD_k(x) − MD_0(x)) -> N (float64), higher = more likely known."""
        return -self.relative_distances(inputs).min(axis=1)
