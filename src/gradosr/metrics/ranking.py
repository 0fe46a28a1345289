"""Ranking metrics of known vs unknown scores: AUROC, AUPR-In/Out, the threshold at a
TPR and the FPR there (higher score = more likely known; ties are one threshold)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from gradosr.errors import ConfigError
from gradosr.metrics.checks import _binary_inputs, _scores


def _cumulative_counts(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``pos`` and ``neg`` samples with score >= t, for every distinct score t.

    ``pos`` and ``neg`` are boolean masks of shape ``(N,)``. Returns two arrays of shape
    ``(T,)`` (T = number of distinct scores), ordered from the highest threshold to the
    lowest; tied samples enter together.
    """
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    # index of the last sample of each group of equal scores
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    return np.cumsum(pos[order])[last], np.cumsum(neg[order])[last]


def _trapezoid_from_origin(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under the piecewise-linear curve (0, 0), (x[0], y[0]), ..."""
    x = np.r_[0.0, x]
    y = np.r_[0.0, y]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def auroc(scores: Any, is_known: Any) -> float:
    """Area under the ROC curve, with known samples as the positive class.

    Args:
        scores: shape ``(N,)``, higher = more likely known.
        is_known: shape ``(N,)``, boolean.

    Definition: the ROC curve plots TPR(t) = fraction of knowns with score >= t against
    FPR(t) = fraction of unknowns with score >= t over all thresholds t; the area is
    taken by trapezoids, so ties between a known and an unknown count 1/2. Equivalently,
    P(score of a random known > score of a random unknown) + 1/2 P(equal). Equals
    ``sklearn.metrics.roc_auc_score(is_known, scores)``.
    """
    fpr, tpr = roc_curve(scores, is_known)
    return _trapezoid_from_origin(fpr[1:], tpr[1:])


def roc_curve(scores: Any, is_known: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ROC points (FPR(t), TPR(t)) of :func:`auroc`, from (0, 0) at t = +inf down to
    the lowest score (1, 1); two float64 arrays of shape ``(T + 1,)``."""
    s, k = _binary_inputs(scores, is_known, "auroc")
    tp, fp = _cumulative_counts(s, k, ~k)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """sum over distinct thresholds t of (R(t) - R(t_prev)) * P(t), thresholds descending."""
    tp, fp = _cumulative_counts(scores, positive, ~positive)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(scores: Any, is_known: Any) -> float:
    """Area under the precision-recall curve with known samples as positive ("AUPR-In").

    Args:
        scores: shape ``(N,)``, higher = more likely known.
        is_known: shape ``(N,)``, boolean.

    Definition: average precision, ``AP = sum_t (R(t) - R(t_prev)) * P(t)`` over the
    distinct scores t in decreasing order, where P(t) and R(t) are precision and recall
    of "known" among samples with score >= t (step-wise, not interpolated). Equals
    ``sklearn.metrics.average_precision_score(is_known, scores)``.
    """
    s, k = _binary_inputs(scores, is_known, "aupr_in")
    return _average_precision(s, k)


def aupr_out(scores: Any, is_known: Any) -> float:
    """Area under the precision-recall curve with unknown samples as positive ("AUPR-Out").

    Args:
        scores: shape ``(N,)``, higher = more likely known.
        is_known: shape ``(N,)``, boolean.

    Definition: the average precision of :func:`aupr_in` computed with the negated
    scores and ``~is_known`` as the positive class. Equals
    ``sklearn.metrics.average_precision_score(~is_known, -scores)``.
    """
    s, k = _binary_inputs(scores, is_known, "aupr_out")
    return _average_precision(-s, ~k)


# ---------------------------------------------------------------------------
# threshold metrics
# ---------------------------------------------------------------------------


def _check_tpr(tpr: float) -> Fraction:
    try:
        value = float(tpr)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"tpr must be a number in (0, 1], got {tpr!r}") from exc
    if not (0.0 < value <= 1.0):
        raise ConfigError(f"tpr must be in (0, 1], got {value}")
    # The decimal the user wrote (0.95 -> 19/20), so that ceil(tpr * n) is exact:
    # in floating point 0.07 * 100 == 7.000000000000001.
    return Fraction(repr(value))


def threshold_at_tpr(known_scores: Any, tpr: float = 0.95) -> float:
    """The largest threshold t at which at least ``tpr`` of the known scores are >= t.

    Args:
        known_scores: shape ``(n,)``, scores of known samples only (higher = more known).
        tpr: target true-positive rate in ``(0, 1]``.

    Definition: with k = ceil(tpr * n) (computed exactly on the decimal value of
    ``tpr``), t is the k-th largest known score. Accepting samples with
    ``score >= t`` then keeps at least ``tpr`` of the knowns (more if there are ties
    at t), and any larger threshold keeps fewer than ``tpr``. Use it to calibrate an
    acceptance threshold on held-out known samples; the rule for applying it lives in
    :func:`open_set_predictions`.
    """
    s = _scores(known_scores, "known_scores")
    fraction = _check_tpr(tpr)
    n = len(s)
    k = math.ceil(fraction * n)  # exact: Fraction * int, ceil of a Fraction
    k = min(max(k, 1), n)
    return float(np.sort(s)[::-1][k - 1])


def fpr_at_tpr(scores: Any, is_known: Any, tpr: float = 0.95) -> float:
    """False-positive rate at a true-positive rate of ``tpr`` (e.g. "FPR@95TPR").

    Args:
        scores: shape ``(N,)``, higher = more likely known.
        is_known: shape ``(N,)``, boolean.
        tpr: target fraction of knowns to accept, in ``(0, 1]``.

    Definition: t = :func:`threshold_at_tpr` of the known scores, the largest threshold
    at which at least ``tpr`` of the knowns have score >= t; returns the fraction of
    unknowns with score >= t.
    """
    s, k = _binary_inputs(scores, is_known, "fpr_at_tpr")
    t = threshold_at_tpr(s[k], tpr)
    return float(np.mean(s[~k] >= t))


