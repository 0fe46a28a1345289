"""The interface shared by the post-hoc scorers in this package.

A scorer sees what a trained classifier computes for a batch: its logits (N×K) and
its penultimate features (N×D, the head's input). ``fit`` takes those of known
training samples with their labels (N) where a method needs them; ``score_samples``
returns a float64 array N, higher = more likely known.
"""

from __future__ import annotations

import numpy as np
import torch


class OutputScorer:
    """Base class of scorers on classifier outputs. Subclasses set ``method_id`` and
    implement :meth:`score_samples`; those that learn from known data override :meth:`fit`."""

    method_id: str = ""
    #: hyperparameters, recorded in results
    params: dict = {}
    #: whether :meth:`fit` must see known training samples first
    needs_fit: bool = False

    def fit(self, logits: torch.Tensor, features: torch.Tensor, labels: np.ndarray) -> "OutputScorer":
        """Learn from known training samples: logits N×K, features N×D, labels N (0..K-1)."""
        return self

    def score_samples(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> np.ndarray:
        """Scores N (float64), higher = more likely known."""
        raise NotImplementedError
