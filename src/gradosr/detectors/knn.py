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
reduced when some known class has fewer than 50 training samples (DESIGN.md §5); the
k actually used is recorded in ``params["k"]``. No training-set subsampling.

Brute force, exact, in float64: per chunk of queries, the k nearest are selected with
``torch.topk`` on 2 z·z_i − ‖z_i‖² (= ‖z‖² − ‖z − z_i‖², the same order as the
distance, also for zero vectors), and the k-th distance is then recomputed from the
selected training vector by explicit differences. Chunks hold at most about 2²² query ×
training entries; chunking does not change the results.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import (
    ClassifierOutputs,
    OutputScorer,
    check_chunk_size,
    check_labels,
    class_counts,
)
from gradosr.errors import ConfigError, DataError

_NORM_EPS = 1e-12


def _unit_features(outputs: ClassifierOutputs, what: str) -> torch.Tensor:
    if outputs.features is None:
        raise DataError(f"{what}: the outputs carry no penultimate features")
    f = torch.as_tensor(outputs.features).detach().cpu().to(torch.float64)
    if f.ndim != 2:
        raise DataError(f"{what}: features must be N×D, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise DataError(f"{what}: features contain NaN or infinite values")
    return f / f.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)


class KNN(OutputScorer):
    method_id = "knn"
    needs_fit = True

    def __init__(self, k: int = 50, chunk_size: int | None = None) -> None:
        """``k``: the largest k (reduced to the smallest class size at fit);
        ``chunk_size``: queries per block (None: automatic); it does not change results."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        self.k_max = int(k)
        self.chunk_size = check_chunk_size(chunk_size)
        self.params = {"k_max": self.k_max, "k": None, "normalize": "l2", "distance": "euclidean"}
        self.train_: torch.Tensor | None = None

    def fit(self, outputs: ClassifierOutputs, labels: np.ndarray) -> "KNN":
        """Stores the normalised training features; k = min(k_max, smallest class size)."""
        z = _unit_features(outputs, "fit")
        y, n_classes = check_labels(labels, len(z), outputs)
        counts = class_counts(y, n_classes, "kNN")
        self.k_ = int(min(self.k_max, counts.min()))
        self.train_ = z.contiguous()
        self.train_sq_ = (z * z).sum(dim=1)
        self.params = {**self.params, "k": self.k_}
        return self

    def kth_distances(self, outputs: ClassifierOutputs) -> np.ndarray:
        """Euclidean distance N of each normalised query to its k-th nearest training
        feature (float64)."""
        if self.train_ is None:
            raise DataError("kNN: call fit on known training samples before scoring")
        q = _unit_features(outputs, "score")
        if q.shape[1] != self.train_.shape[1]:
            raise DataError(
                f"feature dimension {q.shape[1]} does not match the fitted {self.train_.shape[1]}"
            )
        m = len(self.train_)
        chunk = self.chunk_size or max(1, (1 << 22) // m)
        out = torch.empty(len(q), dtype=torch.float64)
        for start in range(0, len(q), chunk):
            block = q[start : start + chunk]
            key = torch.addmm(self.train_sq_, block, self.train_.T, beta=-1.0, alpha=2.0)
            idx = torch.topk(key, self.k_, dim=1, largest=True, sorted=True).indices[:, -1]
            out[start : start + chunk] = (block - self.train_[idx]).norm(dim=1)
        return out.numpy()

    def score_samples(self, outputs: ClassifierOutputs) -> np.ndarray:
        """−(distance to the k-th nearest normalised training feature) -> N (float64)."""
        return -self.kth_distances(outputs)
