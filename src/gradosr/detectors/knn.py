"""Deep nearest neighbours (kNN).

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors",
ICML 2022. With the L2-normalised penultimate features z = f / max(‖f‖₂, 1e-12) of the
M known training samples {z_1..z_M},

    score(f) = − ‖z − z_(k)‖₂,

where z_(k) is the k-th nearest normalised training feature to z in Euclidean distance
(the paper's negative k-th nearest-neighbour distance; higher = more likely known).
For unit vectors ‖z − z_i‖² = 2 − 2 cos(z, z_i), so this ranks like the cosine
similarity to the k-th neighbour. A zero feature vector stays zero after normalisation
(the epsilon): its distance to every unit training feature is 1, never NaN.

k = min(50, size of the smallest training class): the paper's k = 50 for CIFAR-10,
reduced when some known class has fewer than 50 training samples (docs/design.md, "Architecture"); the
k actually used is recorded in ``params["k"]``. No training-set subsampling.

Brute force, exact, in float64: per chunk of queries, the k nearest are selected with
``torch.topk`` on 2 z·z_i − ‖z_i‖² (= ‖z‖² − ‖z − z_i‖², the same order as the
distance, also for zero vectors), and the k-th distance is then recomputed from the
selected training vector by explicit differences. Chunks hold at most about 2²² query ×
training entries; chunking does not change the results.

The same scorer serves other representations through two parameters:

- ``factors``: the :class:`ScorerInputs` fields (or ``gradients`` keys) whose rows make
  a sample's representation. With several factors, each L2-normalised, the similarity of
  two samples is the product of their factors' cosines, which is the cosine of the
  factors' outer (Kronecker) product, and the distance is sqrt(2 − 2·Π cos): the ``plus``
  preset's kNN in gradient space uses ``factors=("logit_grad", "features")``, since the
  head's weight gradient of a sample is g hᵀ and cos(g₁h₁ᵀ, g₂h₂ᵀ) = cos(g₁, g₂)·cos(h₁, h₂),
  so the K×D gradients are never formed (neighbours by ``torch.topk`` on that distance);
- ``normalize``: ``False`` for plain Euclidean kNN on one unnormalised factor (for
  example standardised log gradient norms).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_chunk_size, check_labels, class_counts, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import CheckpointError, ConfigError, DataError

_NORM_EPS = 1e-12


def _factor(outputs: ScorerInputs, name: str, what: str, normalize: bool) -> torch.Tensor:
    f = torch.from_numpy(float_rows(outputs, name, f"kNN ({what})"))
    return f / f.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS) if normalize else f


@register
class KNN(Scorer):
    method_id = "knn"
    family = "feature"
    paper = "Sun, Ming, Zhu & Li, ICML 2022"
    needs = ("features",)
    needs_fit = True

    def __init__(self, k: int = 50, chunk_size: int | None = None, factors: tuple[str, ...] = ("features",),
                 normalize: bool = True) -> None:
        """``k``: the largest k (reduced to the smallest class size at fit);
        ``chunk_size``: queries per block (None: automatic); it does not change results;
        ``factors``, ``normalize``: the representation (module docstring)."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        factors = tuple(factors)
        if not factors or (len(factors) > 1 and not normalize):
            raise ConfigError(f"kNN takes one factor, or several L2-normalised ones; got {list(factors)} "
                              f"with normalize={normalize}")
        self.k, self.chunk_size, self.factors, self.normalize = k, chunk_size, factors, bool(normalize)
        self.k_max = int(k)
        check_chunk_size(chunk_size)
        self.needs = factors
        self.params = {"k_max": self.k_max, "k": None, "normalize": "l2" if normalize else "none",
                       "distance": "euclidean" if len(factors) == 1 else "cosine of the factors' outer product",
                       **({"factors": list(factors)} if factors != ("features",) else {})}
        self.bank_: list[torch.Tensor] | None = None

    def _factors(self, outputs: ScorerInputs, what: str) -> list[torch.Tensor]:
        parts = [_factor(outputs, name, what, self.normalize) for name in self.factors]
        if any(len(p) != len(parts[0]) for p in parts):
            raise DataError(f"{what}: the factors {list(self.factors)} have different numbers of rows")
        return parts

    def _fit(self, outputs: ScorerInputs, labels: np.ndarray) -> None:
        """Stores the (normalised) training factors; k = min(k_max, smallest class size)."""
        bank = self._factors(outputs, "fit")
        y, n_classes = check_labels(labels, len(bank[0]), outputs)
        counts = class_counts(y, n_classes, "kNN")
        self.k_ = int(min(self.k_max, counts.min()))
        self.bank_ = [b.contiguous() for b in bank]
        self._restored()

    def _restored(self) -> None:
        self.train_sq_ = (self.bank_[0] * self.bank_[0]).sum(dim=1)
        self.params = {**self.params, "k": self.k_}

    def kth_distances(self, outputs: ScorerInputs) -> np.ndarray:
        """Distance N of each query to its k-th nearest training sample (float64)."""
        self.check_fitted()
        query = self._factors(outputs, "score")
        for q, b in zip(query, self.bank_):
            if q.shape[1] != b.shape[1]:
                raise DataError(f"feature dimension {q.shape[1]} does not match the fitted {b.shape[1]}")
        m = len(self.bank_[0])
        chunk = self.chunk_size or max(1, (1 << 22) // m)
        out = torch.empty(len(query[0]), dtype=torch.float64)
        for start in range(0, len(out), chunk):
            rows = slice(start, start + chunk)
            if len(query) == 1:
                block, train = query[0][rows], self.bank_[0]
                key = torch.addmm(self.train_sq_, block, train.T, beta=-1.0, alpha=2.0)
                idx = torch.topk(key, self.k_, dim=1, largest=True, sorted=True).indices[:, -1]
                out[rows] = (block - train[idx]).norm(dim=1)
            else:
                sim = None
                for q, b in zip(query, self.bank_):
                    s = q[rows] @ b.T
                    sim = s if sim is None else sim * s
                d = (2.0 - 2.0 * sim).clamp_min(0.0).sqrt()
                out[rows] = torch.topk(d, self.k_, dim=1, largest=False, sorted=True).values[:, -1]
        return out.numpy()

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """−(distance to the k-th nearest training sample) -> N (float64)."""
        return -self.kth_distances(outputs)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        self.check_fitted()
        tensors = {f"bank.{i}": b for i, b in enumerate(self.bank_)}
        return tensors, {"method_id": self.method_id, "params": {"k": self.k_max, "factors": list(self.factors),
                                                                 "normalize": self.normalize}, "fitted": {"k_": self.k_}}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "KNN":
        try:
            self = cls(**meta["params"])
            self.bank_ = [tensors[f"bank.{i}"].to(torch.float64) for i in range(len(self.factors))]
            self.k_ = int(meta["fitted"]["k_"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the stored kNN scorer is incomplete: {exc}") from None
        self._restored()
        self.fitted_ = True
        return self
