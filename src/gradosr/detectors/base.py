"""The interface shared by the post-hoc OSR scorers (baselines) in this package.

A scorer sees what one trained classifier computes for a set of samples, bundled in
:class:`ClassifierOutputs`: its logits (N×K), its penultimate features (N×D, the head's
input) and, for the methods that need gradients or input perturbations, the model and
its inputs (N×C×H×W). ``fit`` takes the outputs of known *training* samples with their
labels 0..K-1 where a method needs them (``needs_fit``); ``score_samples`` returns a
float64 array N, higher = more likely known. Hyperparameters are fixed without looking
at unknowns and listed in ``params`` (recorded in results).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradosr.errors import ConfigError, DataError


@dataclass
class ClassifierOutputs:
    """What a classifier computes for N samples.

    Attributes:
        logits: float32 N×K (CPU).
        features: float32 N×D, the input of the classification head (CPU).
        inputs: float32 N×C×H×W model inputs, or None when no method needs them.
        model: the classifier (eval mode), or None.
    """

    logits: torch.Tensor
    features: torch.Tensor
    inputs: torch.Tensor | None = None
    model: nn.Module | None = None

    def __len__(self) -> int:
        return len(self.logits)


class OutputScorer:
    """Base class of post-hoc scorers. Subclasses set ``method_id`` (DESIGN.md §8),
    ``params`` and the flags, and implement :meth:`score_samples`; those that learn
    from known training data override :meth:`fit`."""

    method_id: str = ""
    #: hyperparameters, recorded in results
    params: dict = {}
    #: whether :meth:`fit` must see known training samples first
    needs_fit: bool = False
    #: whether score_samples needs ``outputs.model`` and ``outputs.inputs``
    needs_model: bool = False

    def fit(self, outputs: ClassifierOutputs, labels: np.ndarray) -> "OutputScorer":
        """Learn from known training samples (labels N, 0..K-1)."""
        return self

    def score_samples(self, outputs: ClassifierOutputs) -> np.ndarray:
        """Scores N (float64), higher = more likely known."""
        raise NotImplementedError


def check_labels(labels, n: int, outputs: ClassifierOutputs) -> tuple[np.ndarray, int]:
    """Training labels as int64 N, and the class count K (the logits' width, else the
    largest label + 1). DataError for a wrong length, non-integers or out-of-range labels."""
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"labels must be a vector of length {n}, got shape {y.shape}")
    if n == 0:
        raise DataError("fit needs at least one training sample")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y) & (y == np.round(y))))
    )
    if not integral:
        raise DataError("labels must be integers 0..K-1")
    y = y.astype(np.int64)
    k = int(outputs.logits.shape[1]) if outputs.logits is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"labels must lie in 0..{k - 1}, got {y.min()}..{y.max()}")
    return y, k


def check_temperature(temperature: float) -> float:
    """A temperature > 0 as float; ConfigError otherwise."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature!r}")
    return float(temperature)


def check_chunk_size(chunk_size: int | None) -> int | None:
    """A positive integer chunk size (or None = automatic); ConfigError otherwise."""
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return None if chunk_size is None else int(chunk_size)


def class_counts(y: np.ndarray, k: int, method: str) -> np.ndarray:
    """Training samples per class (K); DataError naming ``method`` if a class has none."""
    counts = np.bincount(y, minlength=k)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise DataError(f"{method} needs training samples of every class; none for {missing}")
    return counts
