"""An image folder indexed, not loaded: :class:`FolderImages`.

Only the paths and labels are held in memory; the pixels are read and decoded when a
stage asks for them, in batches, by the worker processes of a
``torch.utils.data.DataLoader`` (``num_workers``; 0 decodes in the calling process).
Every image is converted exactly as :func:`gradosr.data.folders.read_images` converts
it (to the folder's format: its first image's size and channel count, or
``image_size``; then, in a cross protocol, to the known images' format), so a streamed
image equals the one the in-memory reader returns, byte for byte.

Unreadable files (docs/design.md, "Streaming"): when the folder is indexed, every file's
header is opened with Pillow (no pixel is decoded); a file whose header cannot be read
is skipped and counted exactly as the in-memory reader skips it, or refused with
``strict``. A file whose header reads but whose pixels do not decode (a truncated
file) is found only when it is streamed: its label is counted by then, so it stops the
run with a DataError naming the file (with or without ``strict``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gradosr.data.imageset import ImageSource
from gradosr.errors import DataError

#: a pass over fewer rows is decoded in the calling process: starting worker processes
#: costs more than decoding a few hundred small images (and a pass is many chunks)
WORKER_MIN_ROWS = 1024


def default_workers() -> int:
    """Decoding worker processes by default: one per core but one, at most 4 (1 on 2 cores)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


#: a format an image is converted to: ((H, W), C)
Format = tuple[tuple[int, int], int]


def decode(path: str, formats: tuple[Format, ...]) -> np.ndarray:
    """The image file ``path`` converted through ``formats`` in turn, uint8 H×W×C."""
    from gradosr.data.folders import _as_array, _open
    from gradosr.preprocess import convert_uint8

    try:
        img = _open(Path(path))
    except DataError as exc:
        raise DataError(f"{exc} (it was readable when the folder was indexed)") from None
    (size, channels), rest = formats[0], formats[1:]
    arr = convert_uint8(_as_array(img, channels)[None], size, channels)
    for size, channels in rest:
        arr = convert_uint8(arr, size, channels)
    return arr[0]


class _Decoded(Dataset):
    """Item i: the decoded, converted image of path i (uint8 H×W×C)."""

    def __init__(self, paths: np.ndarray, chain: np.ndarray, chains: tuple[tuple[Format, ...], ...]):
        self.paths, self.chain, self.chains = paths, chain, chains

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode(os.fsdecode(self.paths[i]), self.chains[int(self.chain[i])])


def _stack(items: list[np.ndarray]) -> np.ndarray:
    return np.stack(items)


class FolderImages(ImageSource):
    """Paths, labels and target formats of images read on demand (module docstring).

    Attributes:
        paths: N file paths (a NumPy array of bytes, ``os.fsencode``).
        labels: int64 N.
        chain: int N, the index into ``chains`` of each image's conversions.
        chains: the conversion chains, each a tuple of ((H, W), C); all end in one format.
        num_workers: decoding processes of a multi-batch read (0: in this process).
    """

    def __init__(self, paths, labels, chains: tuple[tuple[Format, ...], ...], chain=None,
                 num_workers: int | None = None):
        # bytes (one per character: 4 times smaller than NumPy's str), decoded when read
        self.paths = np.asarray([os.fsencode(p) for p in paths] if len(paths) and not isinstance(
            paths, np.ndarray) else paths, dtype=bytes)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.chains = tuple(tuple(((int(s[0][0]), int(s[0][1])), int(s[1])) for s in c) for c in chains)
        self.chain = np.zeros(len(self.paths), np.int64) if chain is None else np.asarray(chain, np.int64)
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        if len(self.labels) != len(self.paths) or len(self.chain) != len(self.paths):
            raise DataError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if len({c[-1] for c in self.chains}) > 1:
            raise DataError(f"the images of one source must end in one format, got {self.chains}")

    @property
    def shape(self) -> tuple[int, int, int]:
        (h, w), c = self.chains[0][-1]
        return h, w, c

    def _new(self, index=None, labels=None, chains=None) -> "FolderImages":
        index = slice(None) if index is None else index
        return FolderImages(self.paths[index], self.labels[index] if labels is None else labels,
                            self.chains if chains is None else chains, self.chain[index], self.num_workers)

    def subset(self, index) -> "FolderImages":
        return self._new(np.asarray(index))

    def with_labels(self, labels) -> "FolderImages":
        return self._new(labels=np.asarray(labels, dtype=np.int64))

    def converted(self, size, channels) -> "FolderImages":
        fmt = ((int(size[0]), int(size[1])), int(channels))
        if self.chains[0][-1] == fmt:
            return self
        return self._new(chains=tuple(c + (fmt,) for c in self.chains))

    @classmethod
    def concat(cls, parts: list["FolderImages"]) -> "FolderImages":
        chains, chain = [], []
        for p in parts:
            lookup = []
            for c in p.chains:
                if c not in chains:
                    chains.append(c)
                lookup.append(chains.index(c))
            chain.append(np.asarray(lookup, np.int64)[p.chain] if len(p.chain) else p.chain)
        return cls(np.concatenate([p.paths for p in parts]), np.concatenate([p.labels for p in parts]),
                   tuple(chains), np.concatenate(chain), parts[0].num_workers)

    def take(self, index) -> np.ndarray:
        """The images at ``index``, decoded in this process."""
        index = np.asarray(index, dtype=np.int64)
        if not len(index):
            return np.zeros((0, *self.shape), np.uint8)
        return np.stack([decode(os.fsdecode(self.paths[i]), self.chains[int(self.chain[i])]) for i in index])

    def batches(self, index_batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Each index batch decoded by ``num_workers`` processes (prefetched, in order);
        in this process for a pass of fewer than :data:`WORKER_MIN_ROWS` rows."""
        batches = [np.asarray(b, dtype=np.int64) for b in index_batches]
        if self.num_workers == 0 or len(batches) < 2 or sum(len(b) for b in batches) < WORKER_MIN_ROWS:
            for b in batches:
                yield self.take(b)
            return
        empty = [i for i, b in enumerate(batches) if not len(b)]
        loader = DataLoader(_Decoded(self.paths, self.chain, self.chains),
                            batch_sampler=[b.tolist() for b in batches if len(b)], collate_fn=_stack,
                            num_workers=self.num_workers, worker_init_fn=_one_thread,
                            # its own generator: starting the workers must not draw from the global RNG
                            # (training's dropout stream), or streamed training would differ from in-memory
                            generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        for i in range(len(batches)):
            yield np.zeros((0, *self.shape), np.uint8) if i in empty else next(it)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a decoding worker must not compete with the main process's threads


def index_files(files: list[tuple[Path, int]], size: tuple[int, int], channels: int, strict: bool,
                num_workers: int | None = None) -> tuple[FolderImages, list[tuple[Path, str]]]:
    """The :class:`FolderImages` of ``files`` whose header Pillow reads, and the (path,
    reason) of each file skipped; with ``strict`` the first unreadable one raises."""
    from PIL import Image, UnidentifiedImageError

    keep, skipped = [], []
    for path, label in files:
        try:
            with Image.open(path) as img:
                img.size  # the header only
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            reason = f"cannot read image {path}: {exc}"
            if strict:
                raise DataError(f"{reason} (--strict refuses unreadable files)") from None
            skipped.append((path, reason))
            continue
        keep.append((str(path), label))
    paths = [p for p, _ in keep]
    labels = np.array([label for _, label in keep], dtype=np.int64)
    return FolderImages(paths, labels, ((((size[0], size[1]), channels),),), num_workers=num_workers), skipped
