"""The one interface of every scoring method: :class:`Scorer`.

Baselines, the paper's MLP detector, the fused ``plus`` detector and its signals all
subclass it (one file per method in this package, registered by method id in
:mod:`gradosr.detectors.registry`).

- ``fit(data, labels)`` learns from known *training* samples: ``data`` is one
  :class:`gradosr.detectors.inputs.ScorerInputs` with ``labels`` (N, 0..K-1; the binary
  MLP detector takes 1 = known, 0 = unknown), or an iterable of ``(ScorerInputs,
  labels)`` chunks. ``partial_fit(chunk, labels)`` adds one chunk to what was seen.
  A chunked fit gives the scorer a one-shot fit would give (tested for every registered
  scorer). By default the chunks are kept and the scorer is fitted on their
  concatenation when it is first needed; a scorer whose state is a sum over samples
  can override :meth:`Scorer._accumulate` / :meth:`Scorer._finalize` to stream.
- ``score_samples(inputs)`` returns float64 N, higher = more likely known;
  :class:`gradosr.errors.NotFittedError` before ``fit`` when the method learns.
- ``get_params()`` / ``set_params(**p)`` (scikit-learn's conventions: the constructor's
  arguments, stored as given); fitted attributes end with an underscore.
- ``state()`` / ``from_state(tensors, meta)``: the fitted scorer as safetensors tensors
  and JSON metadata (no pickle); the attributes listed in ``_state_tensors`` and
  ``_state_meta``.
- ``params``: the hyperparameters recorded in results (fixed without looking at
  unknowns), including fitted choices such as kNN's k.
"""

from __future__ import annotations

import inspect
from typing import Iterable

import numpy as np
import torch

from gradosr.detectors.inputs import ScorerInputs
from gradosr.errors import CheckpointError, ConfigError, DataError, NotFittedError


class Scorer:
    """Base class of every scoring method (see the module docstring).

    Subclasses set ``method_id``, ``family`` and ``paper`` (the registry reads them),
    ``needs`` (the :class:`ScorerInputs` fields they read) and ``needs_fit``, and
    implement :meth:`score_samples` and, when they learn, :meth:`_fit`.
    """

    method_id: str = ""
    #: ``logit``, ``feature``, ``activation``, ``gradient`` or ``detector``
    family: str = ""
    #: the paper the method comes from
    paper: str = ""
    #: fields of ScorerInputs read by fit and score_samples
    needs: tuple[str, ...] = ("logits",)
    #: whether fit must see known training samples first
    needs_fit: bool = False
    #: hyperparameters recorded in results (subclasses set their own)
    params: dict = {}
    #: fitted array attributes saved by state() (tensors) and JSON attributes (meta)
    _state_tensors: tuple[str, ...] = ()
    _state_meta: tuple[str, ...] = ()

    @property
    def needs_model(self) -> bool:
        """Whether score_samples runs the model itself (needs ``model`` and ``inputs``)."""
        return "model" in self.needs

    # ------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments, as given."""
        return {n: getattr(self, n) for n in self._param_names()}

    def set_params(self, **params) -> "Scorer":
        """Re-run the constructor with ``params`` changed (the scorer is then unfitted)."""
        bad = sorted(set(params) - set(self._param_names()))
        if bad:
            raise ConfigError(f"{self.method_id or type(self).__name__} has no parameters {bad}; "
                              f"it has {self._param_names()}")
        self.__init__(**{**self.get_params(), **params})
        return self

    # ------------------------------------------------------------------- fit
    def fit(self, data, labels=None) -> "Scorer":
        """Fit on known training samples: one ScorerInputs with ``labels``, or an
        iterable of (ScorerInputs, labels) chunks."""
        self._chunks: list[tuple[ScorerInputs, np.ndarray | None]] = []
        self.fitted_ = False
        self._start_fit()
        for chunk, y in iter_chunks(data, labels):
            self._accumulate(chunk, y)
        self._finalize()
        return self

    def partial_fit(self, chunk: ScorerInputs, labels=None) -> "Scorer":
        """Add one chunk of known training samples to those seen so far."""
        if not hasattr(self, "_chunks"):
            self._chunks = []
        self._accumulate(chunk, labels)
        self.fitted_ = False
        return self

    def _start_fit(self) -> None:
        """Forget what an earlier fit accumulated (scorers that stream override it)."""

    def _pending(self) -> bool:
        """Whether partial fits have added samples that :meth:`_finalize` has not used."""
        return bool(getattr(self, "_chunks", None))

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        if self.needs_fit:
            self._chunks.append((chunk, None if labels is None else np.asarray(labels)))

    def _finalize(self) -> None:
        if self.needs_fit:
            chunks = getattr(self, "_chunks", [])
            if not chunks:
                raise DataError(f"{self.method_id}: fit needs at least one training sample")
            ys = [y for _, y in chunks]
            labels = None if any(y is None for y in ys) else np.concatenate(ys)
            self._fit(ScorerInputs.concat([c for c, _ in chunks]), labels)
        self._chunks = []
        self.fitted_ = True

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """Learn from all training samples at once (methods with ``needs_fit``)."""

    def check_fitted(self) -> None:
        """NotFittedError unless the scorer is ready to score (partial fits are
        finalised here)."""
        if not self.needs_fit:
            return
        if not getattr(self, "fitted_", False):
            if self._pending():
                self._finalize()
                return
            raise NotFittedError(f"{self.method_id or type(self).__name__}: call fit on known training samples "
                                 "before scoring")

    # ----------------------------------------------------------------- score
    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """Scores N (float64), higher = more likely known."""
        raise NotImplementedError

    # ----------------------------------------------------------- persistence
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON metadata) of the fitted scorer."""
        self.check_fitted()
        tensors = {n: torch.as_tensor(np.asarray(getattr(self, n))).contiguous() for n in self._state_tensors}
        meta = {"method_id": self.method_id, "params": _jsonable(self.get_params()),
                "fitted": {n: _jsonable(getattr(self, n)) for n in self._state_meta}}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Scorer":
        """The fitted scorer that :meth:`state` described."""
        try:
            self = cls(**meta.get("params", {}))
            for n in cls._state_tensors:
                setattr(self, n, tensors[n].to(torch.float64) if tensors[n].is_floating_point() else tensors[n])
            for n in cls._state_meta:
                setattr(self, n, meta["fitted"][n])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the stored {cls.method_id or cls.__name__} scorer is incomplete: {exc}") from None
        self._restored()
        self.fitted_ = True
        return self

    def _restored(self) -> None:
        """Recompute derived attributes after :meth:`from_state`."""


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def iter_chunks(data, labels=None) -> Iterable[tuple[ScorerInputs, np.ndarray | None]]:
    """(ScorerInputs, labels) chunks of ``data``: one ScorerInputs (with ``labels``) or
    an iterable of (ScorerInputs, labels) pairs."""
    if isinstance(data, ScorerInputs):
        yield data, labels
        return
    if labels is not None:
        raise ConfigError("fit on chunks takes (inputs, labels) pairs, not a separate labels argument")
    for item in data:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], ScorerInputs)):
            raise ConfigError("fit takes ScorerInputs with labels, or an iterable of (ScorerInputs, labels) chunks")
        yield item


def check_labels(labels, n: int, outputs: ScorerInputs) -> tuple[np.ndarray, int]:
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


def class_counts(y: np.ndarray, k: int, method: str, counted: bool = False) -> np.ndarray:
    """Training samples per class (K); DataError naming ``method`` if a class has none.
    ``counted``: ``y`` already holds the K counts."""
    counts = np.asarray(y) if counted else np.bincount(y, minlength=k)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0).tolist()
        raise DataError(f"{method} needs training samples of every class; none for {missing}")
    return counts


def float_rows(inputs: ScorerInputs, name: str, method: str) -> np.ndarray:
    """The field ``name`` of ``inputs`` as a float64 N×D NumPy array; DataError naming
    ``method`` when it was not computed, is not a matrix or holds NaN or infinite values."""
    return _finite(matrix_field(inputs, name, method).cpu().to(torch.float64).numpy(), name, method)


#: rows per chunk of :func:`float_row_chunks` (at D = 2048, 512 MB in float64)
ROW_CHUNK = 1 << 15


def matrix_field(inputs: ScorerInputs, name: str, method: str) -> torch.Tensor:
    """The field ``name`` of ``inputs`` as a tensor (not copied); DataError unless it is N×D."""
    x = torch.as_tensor(inputs.get(name, method)).detach()
    if x.ndim != 2:
        raise DataError(f"{method}: {name} must be N×D, got shape {tuple(x.shape)}")
    return x


def float_row_chunks(inputs: ScorerInputs, name: str, method: str, rows: int = ROW_CHUNK):
    """:func:`float_rows` streamed: (start, float64 n×D NumPy chunk) for consecutive
    chunks of ``rows`` rows, so that no float64 copy of the whole field is formed (the
    same checks, chunk by chunk)."""
    x = matrix_field(inputs, name, method)
    for start in range(0, len(x), rows):
        yield start, _finite(x[start:start + rows].cpu().to(torch.float64).numpy(), name, method)


def float_row_blocks(parts: list[ScorerInputs], name: str, method: str, rows: int = ROW_CHUNK):
    """The rows of the field ``name`` of every part, one part after another, as float64
    NumPy blocks of exactly ``rows`` rows (the last one shorter): the same blocks
    however the rows were split into parts, so sums over blocks do not depend on it."""
    from gradosr.streams import rechunk

    chunks = (x for part in parts for _, x in float_row_chunks(part, name, method, rows))
    yield from rechunk(chunks, rows, np.concatenate)


def _finite(x: np.ndarray, name: str, method: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise DataError(f"{method}: {name} contain NaN or infinite values")
    return x


def head_rows(inputs: ScorerInputs, n_classes: int, dim: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The classification head's weight (K×D) and bias (K; zeros for a head without a
    bias) as float64, checked against the logits' K and the features' D."""
    w = torch.as_tensor(inputs.get("head_weight", method)).detach().cpu().to(torch.float64).numpy()
    if w.shape != (n_classes, dim):
        raise DataError(f"{method}: head_weight must be K×D = {n_classes}×{dim}, got shape {tuple(w.shape)}")
    b = (np.zeros(n_classes) if inputs.head_bias is None
         else torch.as_tensor(inputs.head_bias).detach().cpu().to(torch.float64).numpy().reshape(-1))
    if b.shape != (n_classes,):
        raise DataError(f"{method}: head_bias must have {n_classes} entries, got shape {tuple(b.shape)}")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise DataError(f"{method}: the head's weight or bias contain NaN or infinite values")
    return w, b



def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax of the rows of z (float64), accurate also for a probability close to 1:
    with m the row's maximum and s = Σ_{j ≠ argmax} exp(z_j − m), log p = (z − m) − log1p(s)
    (no rounding of 1 + s). Finite for finite logits."""
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    e[np.arange(len(z)), z.argmax(axis=1)] = 0.0
    return shifted - np.log1p(e.sum(axis=1, keepdims=True))
