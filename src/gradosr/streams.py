"""Model inputs streamed in chunks: :class:`ModelInputs` (docs/design.md, "Streaming").

Every stage that reads many images (training, logits and features, gradient
extraction, scorer fits, scoring) takes its model inputs (float N×C×H×W) chunk by chunk
from one of:

- :class:`TensorInputs`: a tensor already in memory (model inputs given by the caller);
- :class:`SourceInputs`: an image source (:class:`gradosr.data.imageset.ImageSource`:
  an in-memory ImageSet or an indexed folder), preprocessed chunk by chunk;
- :class:`LoaderInputs`: a ``torch.utils.data.Dataset`` (items ``image`` or ``(image,
  label)``) or ``DataLoader`` (batches of images or ``(images, labels)``) of uint8
  images H×W×C or float model inputs C×H×W. A DataLoader must give the same rows in the
  same order on every pass (no shuffling): it is read once for the labels and once per
  stage.

:func:`as_model_inputs` turns anything the Python API accepts into one. Chunks hold
:data:`gradosr.data.imageset.CHUNK_ROWS` rows (read when a pass starts) (a multiple of the batch sizes of the
forward and gradient passes, so their batches are those of a one-shot pass).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from gradosr.data import imageset
from gradosr.data.imageset import ImageSource
from gradosr.errors import DataError


class ModelInputs:
    """Rows of model inputs with their labels when known (see the module docstring)."""

    #: int64 N, or None when the rows carry no labels
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        """float n×C×H×W chunks of ``rows`` rows (the last one shorter), in row order."""
        raise NotImplementedError

    def require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise DataError("these inputs carry no labels: give y, or a Dataset of (image, label) items")
        return self.labels

    def subset(self, index) -> "ModelInputs":
        """The rows at ``index`` (a sorted integer array, or a boolean mask)."""
        raise NotImplementedError

    def tensor(self) -> torch.Tensor:
        """Every row at once (what a stage that keeps all inputs by definition reads)."""
        parts = list(self.chunks())
        return torch.cat(parts) if parts else self._empty()

    def _empty(self) -> torch.Tensor:
        raise DataError("no inputs")


def _index(index, n: int) -> np.ndarray:
    index = np.asarray(index)
    return np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)


class TensorInputs(ModelInputs):
    """Model inputs held in a tensor."""

    def __init__(self, x: torch.Tensor, labels: np.ndarray | None = None):
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        rows = rows or imageset.CHUNK_ROWS
        for start in range(0, len(self.x), rows):
            yield self.x[start:start + rows]

    def batches(self, index_batches: Iterable) -> Iterator[torch.Tensor]:
        """The rows of each index batch (random access: training's shuffled batches)."""
        for idx in index_batches:
            yield self.x[torch.as_tensor(idx)]

    def subset(self, index) -> "TensorInputs":
        idx = torch.as_tensor(_index(index, len(self)))
        return TensorInputs(self.x[idx], None if self.labels is None else self.labels[idx.numpy()])

    def tensor(self) -> torch.Tensor:
        return self.x


class SourceInputs(ModelInputs):
    """An image source's images preprocessed chunk by chunk by ``to_inputs`` (a
    classifier's :meth:`gradosr.classifier.Classifier.inputs`)."""

    def __init__(self, source: ImageSource, to_inputs: Callable, labelled: bool = True):
        self.source, self.to_inputs, self.labelled = source, to_inputs, labelled
        self.labels = source.labels if labelled else None

    def __len__(self) -> int:
        return len(self.source)

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        for images in self.source.chunks(rows):
            yield self.to_inputs(images)

    def batches(self, index_batches: Iterable) -> Iterator[torch.Tensor]:
        """The rows of each index batch, read from the source (its workers prefetch)."""
        for images in self.source.batches(np.asarray(idx) for idx in index_batches):
            yield self.to_inputs(images)

    def subset(self, index) -> "SourceInputs":
        return SourceInputs(self.source.subset(_index(index, len(self))), self.to_inputs, self.labelled)

    def _empty(self) -> torch.Tensor:
        h, w, c = self.source.shape
        return self.to_inputs(np.zeros((0, h, w, c), np.uint8))


def is_torch_data(x) -> bool:
    """Whether ``x`` is a ``torch.utils.data.Dataset`` or ``DataLoader``."""
    from torch.utils.data import DataLoader, Dataset

    return isinstance(x, (Dataset, DataLoader))


def _split_batch(batch) -> tuple[object, object]:
    if isinstance(batch, (list, tuple)):  # (images, labels), or (images,) from a TensorDataset
        if len(batch) not in (1, 2):
            raise DataError(f"a batch must be images or (images, labels), got {len(batch)} items")
        return batch[0], (batch[1] if len(batch) == 2 else None)
    return batch, None


class LoaderInputs(ModelInputs):
    """A torch Dataset or DataLoader (see the module docstring) read batch by batch."""

    def __init__(self, data, to_inputs: Callable, keep: np.ndarray | None = None, rows: int | None = None):
        from torch.utils.data import DataLoader

        self.data, self.to_inputs, self.keep = data, to_inputs, keep
        self.loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=rows or imageset.CHUNK_ROWS,
                                                                           shuffle=False)
        self._all_labels: np.ndarray | None | bool = False  # False: not read yet

    def _batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray | None]]:
        """(inputs, labels or None) of every batch of the loader, with only the kept rows."""
        start = 0
        for batch in self.loader:
            images, labels = _split_batch(batch)
            n = len(images)
            y = None if labels is None else np.asarray(torch.as_tensor(labels).numpy(), dtype=np.int64).reshape(-1)
            if self.keep is not None:
                lo, hi = np.searchsorted(self.keep, [start, start + n])
                mine = self.keep[lo:hi] - start
                start += n
                if not len(mine):
                    continue
                images = images[torch.as_tensor(mine)] if isinstance(images, torch.Tensor) else np.asarray(images)[mine]
                y = None if y is None else y[mine]
            else:
                start += n
            yield self.to_inputs(images), y

    def _read_labels(self) -> np.ndarray | None:
        if self._all_labels is False:
            ys, n = [], 0
            targets = getattr(self.data, "targets", None)
            if self.keep is None and targets is not None and not callable(targets):
                self._all_labels = np.asarray(targets, dtype=np.int64).reshape(-1)
                self._n = len(self._all_labels)
                return self._all_labels
            for x, y in self._batches():
                ys.append(y)
                n += len(x)
            self._n = n
            self._all_labels = None if any(y is None for y in ys) or not ys else np.concatenate(ys)
        return self._all_labels

    @property
    def labels(self) -> np.ndarray | None:  # read on first use (one pass over the data)
        return self._read_labels()

    def __len__(self) -> int:
        self._read_labels()
        return self._n

    def chunks(self, rows: int | None = None) -> Iterator[torch.Tensor]:
        return rechunk((x for x, _ in self._batches()), rows or imageset.CHUNK_ROWS)

    def subset(self, index) -> "LoaderInputs":
        idx = _index(index, len(self))
        keep = idx if self.keep is None else self.keep[idx]
        out = LoaderInputs(self.data, self.to_inputs, np.sort(keep))
        out.loader = self.loader
        return out

    def _empty(self) -> torch.Tensor:
        raise DataError("the Dataset or DataLoader holds no samples")


def rechunk(parts: Iterable, rows: int, cat: Callable = torch.cat) -> Iterator:
    """The rows of ``parts`` (tensors, or NumPy arrays with ``cat=np.concatenate``) in
    chunks of exactly ``rows`` rows (the last one shorter)."""
    pending, held = [], 0
    for part in parts:
        pending.append(part)
        held += len(part)
        while held >= rows:
            block = cat(pending) if len(pending) > 1 else pending[0]
            yield block[:rows]
            pending, held = ([block[rows:]] if len(block) > rows else []), len(block) - rows
    if held:
        yield cat(pending) if len(pending) > 1 else pending[0]


def as_model_inputs(x, to_inputs: Callable, y=None) -> ModelInputs:
    """``x`` as :class:`ModelInputs`: a ModelInputs as it is; an image source; a torch
    Dataset or DataLoader; else an array or tensor of uint8 images or float model inputs
    (``to_inputs`` converts and checks it). ``y``: labels of the rows, when given."""
    if isinstance(x, ModelInputs):
        out = x
    elif isinstance(x, ImageSource):
        out = SourceInputs(x, to_inputs, labelled=True)
    elif is_torch_data(x):
        out = LoaderInputs(x, to_inputs)
    else:
        out = TensorInputs(to_inputs(x))
    if y is not None:
        labels = np.asarray(torch.as_tensor(np.asarray(y)).numpy(), dtype=np.int64)
        if labels.ndim != 1 or len(labels) != len(out):
            raise DataError(f"y must hold one label per sample ({len(out)}), got shape {labels.shape}")
        out = _Relabelled(out, labels)
    return out


class _Relabelled(ModelInputs):
    """Rows of another ModelInputs with the labels given by the caller."""

    def __init__(self, base: ModelInputs, labels: np.ndarray):
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.base)

    def chunks(self, rows: int | None = None):
        return self.base.chunks(rows)

    def subset(self, index) -> "_Relabelled":
        idx = _index(index, len(self))
        return _Relabelled(self.base.subset(idx), self.labels[idx])

    def tensor(self) -> torch.Tensor:
        return self.base.tensor()


def map_chunks(fn: Callable[[torch.Tensor], np.ndarray], inputs: ModelInputs, rows: int | None = None) -> np.ndarray:
    """``fn`` (a row-wise computation returning one value per row) over every chunk of
    ``inputs``, concatenated: float64 N."""
    out = [np.asarray(fn(x), dtype=np.float64) for x in inputs.chunks(rows)]
    return np.concatenate(out) if out else np.zeros(0)


def chunk_rows(batch_size: int, rows: int | None = None) -> int:
    """The chunk length for a pass in batches of ``batch_size``: the smallest multiple of
    it that holds ``rows`` rows (a chunk then splits into the batches of a one-shot pass)."""
    batch_size, rows = max(1, int(batch_size)), rows or imageset.CHUNK_ROWS
    return batch_size * max(1, -(-rows // batch_size))


def zip_labels(inputs: ModelInputs, labels: np.ndarray, rows: int | None = None):
    """(inputs chunk, its labels) of ``inputs`` with the labels ``labels`` (N)."""
    start = 0
    for x in inputs.chunks(rows):
        yield x, labels[start:start + len(x)]
        start += len(x)


class RowReservoir:
    """A uniform random sample of at most ``cap`` rows of a stream of tensors (Vitter's
    Algorithm R, "Random sampling with a reservoir", ACM TOMS 1985), seeded, so the
    same rows in the same chunks, or in any other chunking, give the same sample.

    While at most ``cap`` rows have been added, the sample is every row in order
    (a fit on data of that size is exactly the one-shot fit). Row i (0-based, i ≥ cap)
    replaces slot j = ⌊u·(i+1)⌋ when j < cap, with u ~ U[0, 1) one float64 draw per row
    (one draw each, so the stream of draws does not depend on the chunking). The sample
    is kept as the parts it was filled with (a replacement writes into the part holding
    its slot), so it is never copied whole: memory ``cap`` rows.
    """

    def __init__(self, cap: int, seed: int = 0) -> None:
        if not (isinstance(cap, int) and cap >= 1):
            raise ValueError(f"the reservoir size must be a positive integer, got {cap!r}")
        self.cap, self.seen = cap, 0
        self._rng = np.random.default_rng(seed)
        self._parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (N×…; a copy is kept of those sampled)."""
        n = len(x)
        fill = min(n, max(0, self.cap - self.seen))
        if fill:
            self._parts.append(x[:fill].clone())
        if fill < n:
            index = np.arange(self.seen + fill, self.seen + n)
            slot = np.floor(self._rng.random(len(index)) * (index + 1)).astype(np.int64)
            hit = np.flatnonzero(slot < self.cap)
            # a later row replaces an earlier one in the same slot: keep the last per slot
            last = len(hit) - 1 - np.unique(slot[hit][::-1], return_index=True)[1]
            hit = hit[last]
            target = slot[hit]
            ends = np.cumsum([len(p) for p in self._parts])
            part = np.searchsorted(ends, target, side="right")
            for p in np.unique(part):
                mine = part == p
                offset = target[mine] - (ends[p] - len(self._parts[p]))
                self._parts[p][torch.as_tensor(offset)] = x[torch.as_tensor(fill + hit[mine])]
        self.seen += n

    def parts(self) -> list[torch.Tensor]:
        """The sampled rows as consecutive parts (together min(seen, cap) rows)."""
        return list(self._parts)

    def rows(self) -> torch.Tensor | None:
        """The sampled rows in one tensor (a copy), or None when nothing was added."""
        return torch.cat(self._parts) if self._parts else None
