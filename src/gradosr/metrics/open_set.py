"""Open-set classification metrics: macro-F1 over the K known classes plus unknown,
closed-set accuracy, OSCR, and the open-set predictions at a threshold."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradosr.errors import ConfigError, DataError
from gradosr.metrics.checks import _labels, _need_both, _same_length, _scores, _some
from gradosr.metrics.ranking import _cumulative_counts, _trapezoid_from_origin


def macro_f1_open(y_true: Any, y_pred: Any, num_known: int | None = None) -> float:
    """Macro-averaged F1 over the known classes and the unknown class.

    Args:
        y_true: shape ``(N,)``, labels in ``{-1, 0, ..., K-1}`` (-1 = unknown).
        y_pred: shape ``(N,)``, open-set predictions, same label set.
        num_known: K. When given, the classes are ``-1, 0, ..., K-1`` whether present
            or not (an absent class that is never predicted has F1 = 0), and labels
            outside that set raise. When ``None``, the classes are the labels present
            in ``y_true`` or ``y_pred``.

    Definition: for each class c, ``F1_c = 2 TP / (2 TP + FP + FN)`` (0 when the
    denominator is 0); the result is the unweighted mean over classes. Equals
    ``sklearn.metrics.f1_score(y_true, y_pred, labels=..., average="macro",
    zero_division=0)``.
    """
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    if num_known is None:
        classes = np.union1d(t, p)
    else:
        if isinstance(num_known, bool) or not isinstance(num_known, (int, np.integer)) or num_known < 0:
            raise ConfigError(f"num_known must be a non-negative integer, got {num_known!r}")
        for name, arr in (("y_true", t), ("y_pred", p)):
            if np.any(arr >= num_known):
                raise DataError(
                    f"{name} has labels outside {{-1, 0..{int(num_known) - 1}}}: {_some(arr[arr >= num_known])}"
                )
        classes = np.arange(-1, int(num_known))
    f1 = []
    for c in classes:
        tp = np.count_nonzero((t == c) & (p == c))
        fp = np.count_nonzero((t != c) & (p == c))
        fn = np.count_nonzero((t == c) & (p != c))
        denom = 2 * tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


def closed_set_accuracy(y_true: Any, y_pred: Any) -> float:
    """Accuracy of the closed-set prediction on the known samples, ignoring rejection.

    Args:
        y_true: shape ``(N,)``, labels in ``{-1, 0, ..., K-1}``; unknowns (-1) are skipped.
        y_pred: shape ``(N,)``, closed-set predictions (argmax over known classes, never -1).

    Definition: ``mean(y_pred[known] == y_true[known])`` with ``known = y_true != -1``.
    """
    t = _labels(y_true, "y_true")
    p = _closed_pred(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    known = t != -1
    if not known.any():
        raise DataError("closed_set_accuracy is undefined: there are no known samples (all y_true are -1)")
    return float(np.mean(p[known] == t[known]))


def _closed_pred(x: Any, name: str) -> np.ndarray:
    p = _labels(x, name)
    if np.any(p == -1):
        raise DataError(f"{name} must be closed-set predictions (argmax over known classes), but it contains -1")
    return p


def oscr(y_true: Any, y_pred: Any, scores: Any) -> float:
    """Open-Set Classification Rate: area under the CCR-vs-FPR curve.

    Dhamija, Günther & Boult, "Reducing Network Agnostophobia" (NeurIPS 2018).

    Args:
        y_true: shape ``(N,)``, labels in ``{-1, 0, ..., K-1}`` (-1 = unknown).
        y_pred: shape ``(N,)``, closed-set predictions (argmax, never -1).
        scores: shape ``(N,)``, higher = more likely known.

    Definition: for a threshold t,
    ``CCR(t)`` = fraction of knowns that are correctly classified and have score >= t,
    ``FPR(t)`` = fraction of unknowns with score >= t.
    The curve runs over every distinct score (plus t = +inf, the point (0, 0)) down to
    the lowest score, the point (1, closed-set accuracy); the area is taken by
    trapezoids over the FPR axis. Tied samples enter together, so a tie between
    knowns and unknowns is a straight diagonal segment. When every known is correctly
    classified, OSCR equals :func:`auroc`.
    """
    fpr, ccr = oscr_curve(y_true, y_pred, scores)
    return _trapezoid_from_origin(fpr[1:], ccr[1:])


def oscr_curve(y_true: Any, y_pred: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """The points (FPR(t), CCR(t)) of :func:`oscr`'s curve, from (0, 0) at t = +inf down
    to the lowest score; two float64 arrays of shape ``(T + 1,)``."""
    t = _labels(y_true, "y_true")
    p = _closed_pred(y_pred, "y_pred")
    s = _scores(scores)
    _same_length(y_true=t, y_pred=p, scores=s)
    known = t != -1
    _need_both(known, "oscr")
    correct = known & (p == t)
    n_correct, n_false = _cumulative_counts(s, correct, ~known)
    return (np.r_[0.0, n_false / np.count_nonzero(~known)], np.r_[0.0, n_correct / np.count_nonzero(known)])


def open_set_predictions(closed_pred: Any, scores: Any, threshold: float) -> np.ndarray:
    """Open-set predictions: the closed-set label where ``score >= threshold``, else -1.

    Args:
        closed_pred: shape ``(N,)``, closed-set predictions (argmax, never -1).
        scores: shape ``(N,)``, higher = more likely known.
        threshold: acceptance threshold (e.g. from :func:`threshold_at_tpr`); may be
            ``-inf`` (accept all) or ``+inf`` (reject all), not NaN.

    Returns:
        int64 array of shape ``(N,)`` with labels in ``{-1, 0, ..., K-1}``.
    """
    p = _closed_pred(closed_pred, "closed_pred")
    s = _scores(scores)
    _same_length(closed_pred=p, scores=s)
    try:
        thr = float(threshold)
    except (TypeError, ValueError) as exc:
        raise DataError(f"threshold must be a number, got {threshold!r}") from exc
    if math.isnan(thr):
        raise DataError("threshold is NaN")
    return np.where(s >= thr, p, -1).astype(np.int64)
