"""Input validation shared by the metrics (see :mod:`gradosr.metrics`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradosr.errors import DataError


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


