"""Open-set recognition metrics.

Conventions (shared with the rest of gradosr):

- ``scores``: shape ``(N,)``, one real number per sample, **higher = more likely known**;
- ``is_known``: shape ``(N,)``, boolean (or 0/1), ``True`` for samples of a known class;
- labels: integers, ``0..K-1`` for the known classes and ``-1`` for unknown.

Every function accepts numpy arrays, Python lists or torch tensors, returns Python
floats (or a numpy array for :func:`open_set_predictions`), and raises
:class:`gradosr.errors.DataError` on invalid input (empty or non-1-D arrays, length
mismatch, NaN/Inf scores, a metric that is undefined for the given samples).
Invalid options (a ``tpr`` outside ``(0, 1]``, a negative ``num_known``) raise
:class:`gradosr.errors.ConfigError`.

The ranking metrics (AUROC, AUPR, OSCR) treat tied scores as one threshold: samples
with equal scores are accepted or rejected together.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from gradosr.errors import ConfigError, DataError

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "threshold_at_tpr",
    "fpr_at_tpr",
    "macro_f1_open",
    "oscr",
    "oscr_curve",
    "roc_curve",
    "closed_set_accuracy",
    "open_set_predictions",
]


# ---------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------


def _some(values: np.ndarray, limit: int = 10) -> str:
    """Up to ``limit`` distinct values of ``values``, on one line (for error messages)."""
    try:
        values = np.unique(values)
    except TypeError:  # objects that do not sort
        values = np.asarray(values).ravel()
    shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _as_1d(x: Any, name: str) -> np.ndarray:
    """Convert ``x`` (array, list or torch tensor) to a non-empty 1-D numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{name} could not be converted to an array: {exc}") from exc
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name} is empty")
    return arr


def _scores(x: Any, name: str = "scores") -> np.ndarray:
    """A non-empty 1-D float64 array of finite scores."""
    arr = _as_1d(x, name)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise DataError(f"{name} must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise DataError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def _is_known(x: Any, name: str = "is_known") -> np.ndarray:
    """A non-empty 1-D boolean array; accepts booleans or the numbers 0 and 1."""
    arr = _as_1d(x, name)
    if arr.dtype == np.bool_:
        return arr
    if not np.issubdtype(arr.dtype, np.number) or not np.all((arr == 0) | (arr == 1)):
        raise DataError(f"{name} must be boolean (or 0/1), got values {_some(arr)}")
    return arr.astype(bool)


def _labels(x: Any, name: str) -> np.ndarray:
    """A non-empty 1-D int64 array of labels, each -1 (unknown) or >= 0."""
    arr = _as_1d(x, name)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.any(arr < -1):
        raise DataError(f"{name} has labels below -1 (only -1 marks unknown): {_some(arr[arr < -1])}")
    return arr


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise DataError(f"length mismatch: {desc}")


def _need_both(is_known: np.ndarray, metric: str) -> None:
    if is_known.all():
        raise DataError(f"{metric} is undefined: all samples are known; it needs both known and unknown samples")
    if not is_known.any():
        raise DataError(f"{metric} is undefined: all samples are unknown; it needs both known and unknown samples")


def _binary_inputs(scores: Any, is_known: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores)
    k = _is_known(is_known)
    _same_length(scores=s, is_known=k)
    _need_both(k, metric)
    return s, k


# ---------------------------------------------------------------------------
# ranking metrics
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# classification metrics
# ---------------------------------------------------------------------------


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
