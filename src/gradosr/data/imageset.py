"""The image sources every reader returns: :class:`ImageSet` (in memory) and the
interface it shares with an indexed folder (:class:`gradosr.data.indexed.FolderImages`).

An image source has int64 ``labels`` (N, in memory), a ``shape`` (H, W, C), and yields
its pixels as uint8 arrays n×H×W×C: :meth:`ImageSource.batches` for given index
batches (training draws them in a shuffled order), :meth:`ImageSource.chunks` for
consecutive rows. ``subset``, ``with_labels`` and ``converted`` give new sources
without reading a pixel; :meth:`ImageSource.materialise` reads all of them into an
ImageSet (what a stage that needs every image at once does: a synthetic set built from
the known images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from gradosr.errors import DataError

#: rows per chunk when a stage streams a source; a pass in batches of B reads chunks of
#: the smallest multiple of B holding this many rows (:func:`gradosr.streams.chunk_rows`),
#: so that its batches are those of a one-shot pass. Small, because a chunk's buffers
#: (the decoded images, their model inputs, the workers' prefetched chunks) are most of
#: a streamed pass's memory: 1024 rows of 32×32×3 images cost about 50 MB more than 128
#: (benchmarks/memory.py)
CHUNK_ROWS = 128


class ImageSource:
    """What :class:`ImageSet` and the indexed folder share (see the module docstring)."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        raise NotImplementedError

    def batches(self, index_batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """uint8 n×H×W×C images of each index batch, in order."""
        raise NotImplementedError

    def take(self, index) -> np.ndarray:
        """The images at ``index`` (integer array), uint8 n×H×W×C."""
        return next(iter(self.batches([np.asarray(index, dtype=np.int64)])))

    def chunks(self, rows: int | None = None, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive images ``start:stop`` in chunks of ``rows`` (default
        :data:`CHUNK_ROWS`; the last one shorter)."""
        rows = rows or CHUNK_ROWS
        stop = len(self) if stop is None else stop
        return self.batches(np.arange(lo, min(lo + rows, stop)) for lo in range(start, stop, rows))

    def subset(self, index) -> "ImageSource":
        raise NotImplementedError

    def with_labels(self, labels: np.ndarray) -> "ImageSource":
        raise NotImplementedError

    def converted(self, size: tuple[int, int], channels: int) -> "ImageSource":
        """The images converted to ``size`` × ``channels`` (:func:`gradosr.preprocess.convert_uint8`)."""
        raise NotImplementedError

    def materialise(self) -> "ImageSet":
        """Every image read into memory."""
        parts = list(self.chunks())
        h, w, c = self.shape
        images = np.concatenate(parts) if parts else np.zeros((0, h, w, c), np.uint8)
        return ImageSet(images, self.labels)


@dataclass(frozen=True)
class ImageSet(ImageSource):
    """Images and labels held in memory.

    Attributes:
        images: uint8 array N×H×W×C (C = 1 or 3).
        labels: int64 array N.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 array N×H×W×C, got dtype {self.images.dtype} "
                f"and shape {self.images.shape}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must be a 1-D array of length {len(self.images)}, got shape "
                f"{self.labels.shape}"
            )
        if self.labels.dtype != np.int64:
            object.__setattr__(self, "labels", self.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])

    def batches(self, index_batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for idx in index_batches:
            idx = np.asarray(idx)
            if len(idx) and idx.ndim == 1 and np.all(np.diff(idx) == 1):
                yield self.images[idx[0]:idx[-1] + 1]  # a view, not a copy
            else:
                yield self.images[idx]

    def subset(self, index: np.ndarray) -> "ImageSet":
        """The samples at ``index`` (an integer or boolean array), as a new ImageSet."""
        return ImageSet(self.images[index], self.labels[index])

    def with_labels(self, labels: np.ndarray) -> "ImageSet":
        """The same images with other labels (length N)."""
        return ImageSet(self.images, np.asarray(labels, dtype=np.int64))

    def converted(self, size: tuple[int, int], channels: int) -> "ImageSet":
        from gradosr.preprocess import convert_uint8

        return ImageSet(convert_uint8(self.images, size, channels), self.labels)

    def materialise(self) -> "ImageSet":
        return self


class ConcatImages(ImageSource):
    """The rows of several sources of one shape, one after another (the test set
    [known test; unknown test] when its parts are of different kinds)."""

    def __init__(self, parts: list[ImageSource]):
        self.parts = list(parts)
        self.labels = np.concatenate([p.labels for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.parts[0].shape

    def batches(self, index_batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        h, w, c = self.shape
        for idx in index_batches:
            idx = np.asarray(idx, dtype=np.int64)
            out = np.empty((len(idx), h, w, c), np.uint8)
            part = np.searchsorted(self._starts, idx, side="right") - 1
            for p in np.unique(part):
                mine = part == p
                out[mine] = self.parts[p].take(idx[mine] - self._starts[p])
            yield out

    def subset(self, index) -> ImageSource:
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index
        return _Indexed(self, index.astype(np.int64))

    def with_labels(self, labels: np.ndarray) -> ImageSource:
        return _Indexed(self, np.arange(len(self)), np.asarray(labels, dtype=np.int64))

    def converted(self, size, channels) -> ImageSource:
        return ConcatImages([p.converted(size, channels) for p in self.parts])


class _Indexed(ImageSource):
    """Some rows of a source (with other labels, when given)."""

    def __init__(self, base: ImageSource, index: np.ndarray, labels: np.ndarray | None = None):
        self.base, self.index = base, index
        self.labels = base.labels[index] if labels is None else labels

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def batches(self, index_batches):
        return self.base.batches(self.index[np.asarray(i, dtype=np.int64)] for i in index_batches)

    def subset(self, index) -> ImageSource:
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index
        return _Indexed(self.base, self.index[index], self.labels[index])

    def with_labels(self, labels) -> ImageSource:
        return _Indexed(self.base, self.index, np.asarray(labels, dtype=np.int64))

    def converted(self, size, channels) -> ImageSource:
        return _Indexed(self.base.converted(size, channels), self.index, self.labels)


def concat_sources(parts: list[ImageSource]) -> ImageSource:
    """The rows of ``parts`` one after another: an ImageSet when all are in memory, one
    indexed folder when all are folders, else a :class:`ConcatImages`."""
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        from gradosr.errors import ConfigError

        raise ConfigError(f"sources of different image shapes {sorted(shapes)} cannot be concatenated; "
                          "cross-dataset protocols need images of one size")
    if all(isinstance(p, ImageSet) for p in parts):
        return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))
    from gradosr.data.indexed import FolderImages

    if all(isinstance(p, FolderImages) for p in parts):
        return FolderImages.concat(parts)
    return ConcatImages(parts)
