"""Self-influence (leverage) of a sample's gradient against the known training gradients.

TRAK (Park, Georgiev, Ilyas, Leclerc & Mądry, "TRAK: Attributing Model Behavior at
Scale", ICML 2023) and LoGra (Choe et al., "What is Your Data Worth to GPT?", 2024)
score the influence of training samples through projected per-sample gradients g
(P') and the kernel of the known training gradients G (N×P'); the self-influence of a
sample (Koh & Liang, "Understanding Black-box Predictions via Influence Functions",
ICML 2017) is its gradient's size in the inverse of that kernel:

    M = GᵀG / N                         (the uncentred second moment, P'×P'),
    γ = damping × trace(M) / P'          (damping 0.1 by default, fixed),
    leverage(g) = gᵀ (M + γI)⁻¹ g,

The score is +leverage(g) (``negate=False``, the default): the gradient of the
confounding-label loss grows with the classifier's confidence, so a known input has the
larger one, as in GradNorm (Huang et al., NeurIPS 2021, same direction); with
``negate=True`` it is −leverage(g), the direction of a true-label self-influence (an
atypical, hard sample has the larger one). Unlike the Mahalanobis distance there are no
class means: M is centred at zero, as the Gauss–Newton / empirical Fisher matrix is.

**Fit at scale.** M is accumulated in one pass over float64 blocks of
:data:`gradosr.detectors.base.ROW_CHUNK` rows as the covariance plus the outer product
of the mean (:class:`gradosr.detectors.mahalanobis.ClassMoments` with one class, Chan,
Golub & LeVeque's pairwise update), so a chunked fit equals the one-shot fit to float64
rounding and nothing N×N is formed. With M + γI = U diag(λ+γ) Uᵀ (``torch.linalg.eigh``)
and W = U diag((λ+γ)^-½) Uᵀ, the damped inverse square root of the K-FAC factors
(:func:`gradosr.gradients.kfac.damped_inv_sqrt`), leverage(g) = ‖gW‖², evaluated in
float64 chunks of queries.

Inputs: ``source`` names the representation (a ScorerInputs ``gradients`` key; in the
``plus`` family the LoGra projection ``projection``, N×P').
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_chunk_size, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.mahalanobis import StreamedMoments
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError
from gradosr.gradients.kfac import damped_inv_sqrt


@register(kind="component")
class Leverage(StreamedMoments, Scorer):
    """±gᵀ(GᵀG/N + γI)⁻¹g (module docstring); fitted attribute ``whiten_`` (P'×P')."""

    method_id = "leverage"
    family = "gradient"
    paper = "Park et al., ICML 2023 (TRAK); Choe et al., 2024 (LoGra); Koh & Liang, ICML 2017"
    needs = ("projection",)
    needs_fit = True
    _state_tensors = ("whiten_",)
    _single_class = True  # one uncentred second moment, no class means

    def __init__(self, source: str = "projection", damping: float = 0.1, negate: bool = False,
                 chunk_size: int | None = None) -> None:
        """``source``: the gradient representation; ``damping``: γ relative to the mean
        eigenvalue of GᵀG/N; ``negate``: score −leverage instead of +leverage;
        ``chunk_size``: queries per block (does not change results)."""
        if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0):
            raise ConfigError(f"leverage damping must be > 0, got {damping!r}")
        self.source, self.damping, self.negate = source, damping, bool(negate)
        self.chunk_size = check_chunk_size(chunk_size)
        self.needs = (source,)
        self.params = {"representation": source, "kernel": "uncentred GᵀG/N", "damping": damping,
                       "score": "-leverage" if negate else "+leverage"}
        self.whiten_: np.ndarray | None = None

    def _finalize(self) -> None:
        m = self._fitted_moments()
        mean = m.means[0]
        second = torch.from_numpy(m.covariance() + np.outer(mean, mean))
        self.whiten_ = damped_inv_sqrt(second, self.damping).numpy()  # symmetric: W Wᵀ = (M + γI)⁻¹
        self._moments = None
        self.fitted_ = True

    def _restored(self) -> None:
        self.whiten_ = np.asarray(self.whiten_, dtype=np.float64)

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """±gᵀ(M + γI)⁻¹g -> float64 N (module docstring)."""
        self.check_fitted()
        g = float_rows(inputs, self.source, "leverage (score)")
        if g.shape[1] != self.whiten_.shape[0]:
            raise DataError(f"leverage: gradient dimension {g.shape[1]} does not match the fitted "
                            f"{self.whiten_.shape[0]}")
        chunk = self.chunk_size or max(1, (1 << 21) // max(1, g.shape[1]))
        out = np.empty(len(g))
        for start in range(0, len(g), chunk):
            z = g[start:start + chunk] @ self.whiten_
            out[start:start + chunk] = np.einsum("nd,nd->n", z, z)
        return -out if self.negate else out
