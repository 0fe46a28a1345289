"""GEN: generalized entropy of the softmax.

Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
Detection", CVPR 2023. Acts on the logits z (K) through p = softmax(z), as in the paper.
With p_(1) ≥ p_(2) ≥ … the sorted probabilities and M = min(100, K) (the paper's
M = 100; all K classes when K < 100),

    G_γ(p) = Σ_{j=1}^{M} p_(j)^γ (1 − p_(j))^γ,      γ = 0.1 (the paper's default),

    score(x) = −G_γ(p),

higher = more likely known (a peaked softmax has a small generalized entropy).

Computed in float64 in log space, each term as exp(γ (log p_j + log(1 − p_j))): log p is
the log-softmax (with log1p, accurate near p = 1), log(1 − p_j) is log1p(−p_j) for every
class but the most probable one (p_j ≤ 1/2 there) and, for the most probable class,
logsumexp_{i ≠ j} z_i − logsumexp_i z_i (1 − p_(1) without cancellation). Probabilities
that underflow in float64 still contribute their exact p^γ, and confident samples are
not tied at 0. Finite for finite logits; K = 1 gives 0.

Differences from the references: OpenOOD v1.5 computes p^γ (1 − p)^γ from float32
probabilities directly; pytorch-ood clamps p to [1e-7, 1 − 1e-7] and averages instead of
summing over the top M (and by default uses all K). The formula is the same; here it is
exact also for very confident or very small probabilities, so the two differ only among
samples whose probabilities underflow or round to 1 in their arithmetic.
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, float_rows, log_softmax
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError

GEN_GAMMA = 0.1
GEN_M = 100


def log_one_minus_softmax(z: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """log(1 − softmax(z)) N×K without cancellation, given ``log_p`` = log softmax(z)
    (−inf for K = 1)."""
    rows, top = np.arange(len(z)), z.argmax(axis=1)
    with np.errstate(divide="ignore"):
        out = np.log1p(-np.exp(log_p))  # p ≤ 1/2 off the argmax: accurate there
        others = z.copy()
        others[rows, top] = -np.inf
        # log(1 − p_top) = logsumexp_{j ≠ top} z_j − logsumexp z, and logsumexp z = z_top − log p_top
        from scipy.special import logsumexp  # imported on use: scipy.special costs every command 0.3 s

        out[rows, top] = logsumexp(others, axis=1) - z[rows, top] + log_p[rows, top]
    return out


@register
class GEN(Scorer):
    method_id = "gen"
    family = "logit"
    paper = "Liu, Lochman & Zach, CVPR 2023"

    def __init__(self, gamma: float = GEN_GAMMA, m: int = GEN_M) -> None:
        """``gamma``: the exponent γ in (0, 1]; ``m``: the number of largest probabilities
        summed (min(m, K) is used)."""
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma <= 1):
            raise ConfigError(f"gamma must lie in (0, 1], got {gamma!r}")
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise ConfigError(f"m must be a positive integer, got {m!r}")
        self.gamma, self.m = gamma, m
        self.params = {"layer": "logits (softmax)", "gamma": float(gamma), "M_max": int(m), "M": "min(M_max, K)"}

    def generalized_entropy(self, inputs: ScorerInputs) -> np.ndarray:
        """G_γ over the top-M probabilities -> N (float64)."""
        z = float_rows(inputs, "logits", "GEN")
        log_p = log_softmax(z)
        log_q = log_one_minus_softmax(z, log_p)
        m = min(int(self.m), z.shape[1])
        order = np.argsort(-log_p, axis=1, kind="stable")[:, :m]
        terms = np.exp(float(self.gamma) * (np.take_along_axis(log_p, order, axis=1)
                                            + np.take_along_axis(log_q, order, axis=1)))
        return terms.sum(axis=1)

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """−G_γ(softmax(z)) -> N (float64), higher = more likely known."""
        return -self.generalized_entropy(inputs)
