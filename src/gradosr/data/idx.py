"""Reader for the IDX format of MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017).

Files may be gzip-compressed (``.gz``) or raw, in a flat folder or in torchvision's
layout (``<root>/MNIST/raw/…``, ``<root>/FashionMNIST/raw/…``).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from gradosr.errors import DataError

# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: more dimensions than numpy arrays allow are refused (images and labels have 1 to 4)
MAX_DIMS = 32

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is not a valid gzip file (truncated or corrupt: {exc})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) into a numpy array of its stored shape.

    The header is a 4-byte magic number (two zero bytes, a type code, the number of
    dimensions d), then d big-endian uint32 sizes, then the data.

    Raises:
        DataError: the file is missing, truncated, or has a bad magic number or sizes.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path} has an unknown IDX type code 0x{code:02x}")
    if ndim == 0 or ndim > MAX_DIMS:
        raise DataError(f"{path} declares {ndim} dimensions (an IDX file of images or labels has 1 to {MAX_DIMS})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header of {header} bytes, file of {len(data)})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if len(data) - header != expected:
        raise DataError(
            f"{path} holds {len(data) - header} data bytes but its header {shape} "
            f"declares {expected}: the file is truncated or corrupt"
        )
    try:
        return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    except ValueError as exc:  # e.g. sizes (0, 2**31, 2**31): no data, but too large a shape for numpy
        raise DataError(f"{path} declares sizes {shape} that numpy cannot hold: {exc}") from None


def find_idx_file(folders: list[Path], stem: str) -> Path | None:
    """The first existing ``stem`` or ``stem.gz`` in ``folders``, or None."""
    for folder in folders:
        for name in (stem + ".gz", stem):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def read_idx_split(folders: list[Path], split: str, how_to_get: str):
    """Read the images (N×28×28×1 uint8) and labels (N int64) of ``split`` ('train'/'test').

    Searches ``folders`` in order. A missing file raises DataError that names the
    expected paths and ``how_to_get``.
    """
    from gradosr.data.imageset import ImageSet

    image_stem, label_stem = SPLIT_FILES[split]
    arrays = []
    for stem in (image_stem, label_stem):
        path = find_idx_file(folders, stem)
        if path is None:
            looked = ", ".join(str(f / (stem + "[.gz]")) for f in folders)
            raise DataError(f"missing {stem}: looked for {looked}. {how_to_get}")
        arrays.append((path, read_idx(path)))
    (ipath, images), (lpath, labels) = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{ipath} must hold uint8 images N×H×W, got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lpath} must hold a 1-D label vector, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels")
    return ImageSet(np.ascontiguousarray(images[..., None]), labels.astype(np.int64))
