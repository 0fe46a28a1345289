"""The energy of the classification head on shaped penultimate activations.

Shared by the activation-shaping methods (family ``activation``: ReAct, ASH-S/-B/-P,
SCALE, DICE). Each acts on the penultimate activations h (D) of a sample, which in
this project are the ``features`` of :class:`ScorerInputs`: the input of the
classifier's final ``nn.Linear`` head, with weight W (K×D, ``head_weight``) and bias b
(K, ``head_bias``; None is read as zeros). The shaped logits are recomputed through the
head and scored by their energy (Liu et al., NeurIPS 2020, T = 1),

    z' = W · shape(h) + b,        score(x) = logsumexp_k z'_k,

higher = more likely known. Recomputing z' from h is exact, not an approximation,
because the head is linear and h is its whole input: z' is what the classifier itself
would output if its penultimate layer had produced shape(h) (DICE shapes the weight
instead: z' = (W ⊙ M) h + b). For a user model whose head is not the last linear map
of the network (a nonlinearity or a second layer after it), these methods need the
true penultimate layer as ``features`` and that final linear map as the head; the
project's models (``lenet``, ``cnn32``, ``resnet18``) end in one ``nn.Linear`` on their
penultimate features, the head :func:`gradosr.models.find_head` returns.

The papers assume non-negative (post-ReLU) activations, as ``lenet`` and ``resnet18``
give; ``cnn32``'s are averages of LeakyReLU(0.2) outputs and can be slightly negative.
The formulas are applied as written to signed activations, with one guard for ASH-S
and SCALE: their factor exp(s1/s2) is used where s2 (the sum of the kept activations)
is > 0, and replaced by 1 where s2 ≤ 0 (for non-negative activations: only h = 0,
whose shaped vector is 0 whatever the factor). Where s2 > 0 every non-kept entry is at
most the smallest kept one, which is at most s2/k, so s1/s2 ≤ D/k: the factor never
overflows and the scores stay finite for any finite activations.

Every computation is in float64, vectorised over the samples. "Top k" per row: the k
largest entries, ties broken towards the lower index (a stable descending sort), so the
kept set is deterministic also for the exact zeros of ReLU activations.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.errors import ConfigError, DataError

#: what every activation-shaping method records as its score
ENERGY = "energy logsumexp(W·shape(h) + b), T = 1"


def check_percent(value: float, name: str = "percentile") -> float:
    """A percentage in [0, 100) as float; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 100.0:
        raise ConfigError(f"{name} must be a number in [0, 100), got {value!r}")
    return float(value)


def penultimate(inputs: ScorerInputs, what: str) -> torch.Tensor:
    """The penultimate activations h (``features``) as a finite float64 N×D tensor."""
    h = torch.as_tensor(inputs.get("features", what)).detach().cpu().to(torch.float64)
    if h.ndim != 2:
        raise DataError(f"{what} needs features N×D (the head's input), got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise DataError(f"{what}: features contain NaN or infinite values")
    return h


def linear_head(inputs: ScorerInputs, what: str, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight W (K×D) and bias b (K; zeros when the head has none), float64."""
    w = torch.as_tensor(inputs.get("head_weight", what)).detach().cpu().to(torch.float64)
    if w.ndim != 2 or w.shape[1] != d:
        raise DataError(f"{what}: head weight must be K×{d} (features are N×{d}), got shape {tuple(w.shape)}")
    if inputs.head_bias is None:
        b = torch.zeros(w.shape[0], dtype=torch.float64)
    else:
        b = torch.as_tensor(inputs.head_bias).detach().cpu().to(torch.float64).reshape(-1)
        if b.shape != (w.shape[0],):
            raise DataError(f"{what}: head bias must have {w.shape[0]} entries, got shape {tuple(b.shape)}")
    return w, b


def head_energy(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """logsumexp(W h + b) per row of the shaped activations h (N×D) -> N (float64)."""
    return torch.logsumexp(h @ w.T + b, dim=1).numpy()


def kept_count(d: int, percentile: float) -> int:
    """How many of d entries a p-th percentile cut keeps: d − round(d·p/100) (the ASH
    authors' rule, round half to even), at least 1."""
    return max(1, d - int(round(d * percentile / 100.0)))


def top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of each row of x (N×D); ties go to the
    lower index."""
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)


def sum_ratio(h: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """s1 / s2 per row: the sum of all activations over the sum of the kept ones (ASH-S
    and SCALE; at most D/k); 0 (a factor exp(0) = 1) where s2 ≤ 0 (see the module
    docstring)."""
    s1, s2 = h.sum(dim=1), (h * kept).sum(dim=1)
    positive = s2 > 0
    return torch.where(positive, s1 / torch.where(positive, s2, torch.ones_like(s2)), torch.zeros_like(s1))


class ShapedEnergy(Scorer):
    """Base of the activation-shaping scorers: ``score_samples`` is the energy of the
    head on ``shape(h)`` with the weight ``weight(W)`` (both identities here;
    subclasses override one)."""

    family = "activation"
    needs = ("features", "head_weight")

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        """The shaped activations N×D (float64)."""
        return h

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The head weight used for scoring (K×D, float64)."""
        return w

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """logsumexp(weight(W) · shape(h) + b) -> N (float64), higher = more likely known."""
        self.check_fitted()
        h = penultimate(inputs, self.method_id)
        w, b = linear_head(inputs, self.method_id, h.shape[1])
        return head_energy(self.shape(h), self.weight(w), b)
