"""NumPy ``.npz`` archives as datasets (``npz:PATH``), read without unpickling.

Keys (``np.load(..., allow_pickle=False)``: an object array is refused, never run):

- ``x_train``, ``y_train``, ``x_test``, ``y_test``; or
- ``x`` and ``y``, split into train/test like an image folder (a stratified, seeded 20%
  to test, :func:`gradosr.data.folders.split_train_test`); or
- ``x`` alone: an unlabeled set, usable only as unknowns;
- optionally ``class_names``: a 1-D string array, one name per class.

Images are N×H×W or N×H×W×C (C = 1, 3 or 4; alpha is dropped), uint8, integers in
0..255, or floats in [0, 1] (scaled by 255 and rounded). Labels are integers 0..C-1
(floats with integral values are accepted); every class needs a training image. With
``image_size`` the images are resized to image_size × image_size
(:func:`gradosr.preprocess.convert_uint8`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from gradosr.data.folders import split_train_test
from gradosr.data.imageset import ImageSet
from gradosr.errors import DataError
from gradosr.preprocess import convert_uint8


def as_uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as uint8 N×H×W×C (C = 1 or 3); DataError saying why it cannot be."""
    if x.dtype == object or x.dtype.kind not in "buif":
        raise DataError(f"{what} must be numeric images, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or min(x.shape[1:3], default=0) < 1:
        raise DataError(f"{what} must be images N×H×W or N×H×W×C with C = 1, 3 or 4, got shape {x.shape}")
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise DataError(f"{what} contains NaN or Inf values")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{what}: float images must lie in [0, 1], found {x.min():g}..{x.max():g}")
        return np.rint(x * 255.0).astype(np.uint8)
    if x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{what}: integer images must lie in 0..255, found {x.min()}..{x.max()}")
    return x.astype(np.uint8)


def as_labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    """``y`` as int64 labels of length ``n``, all >= 0; DataError otherwise."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} must be a 1-D array of {n} labels, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{what} must hold integer class ids, found non-integer values")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{what} must hold integer class ids, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DataError(f"{what}: class ids must be >= 0, found {y.min()}")
    return y


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path} holds object arrays (pickles), which gradosr never loads; "
                            "store numeric arrays (and class_names as a string array)") from None
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None


def load_npz(path: str | Path, image_size: int | None = None) -> tuple[ImageSet, ImageSet, tuple[str, ...]]:
    """(train, test, class names) of the archive ``path`` (see the module docstring);
    an unlabeled archive gives an empty train part, labels -1 and no class names."""
    path = Path(path)
    arrays = _read(path)
    if {"x_train", "x_test"} & set(arrays):
        keys = ("x_train", "y_train", "x_test", "y_test")
    elif "x" in arrays:
        keys = ("x", "y") if "y" in arrays else ("x",)
    else:
        raise DataError(f"{path} has neither x_train/y_train/x_test/y_test nor x/y (found keys: "
                        f"{', '.join(arrays) or 'none'})")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks the key {missing[0]!r} (found keys: {', '.join(arrays)})")
    parts = []
    for xk, yk in zip(keys[::2], keys[1::2] + (None,) * (len(keys) == 1)):
        x = as_uint8_images(arrays[xk], f"{path.name}[{xk}]")
        y = as_labels(arrays[yk], len(x), f"{path.name}[{yk}]") if yk else np.full(len(x), -1, np.int64)
        parts.append((x, y))
    shapes = {x.shape[1:] for x, _ in parts}
    if len(shapes) > 1:
        raise DataError(f"{path}: train and test images differ in shape ({' vs '.join(map(str, shapes))})")
    if image_size is not None:
        parts = [(convert_uint8(x, (image_size, image_size), x.shape[-1]), y) for x, y in parts]
    if len(parts) == 1 or keys == ("x", "y"):
        if keys == ("x",):
            return ImageSet(parts[0][0][:0], parts[0][1][:0]), ImageSet(*parts[0]), ()
        train, test = split_train_test(ImageSet(*parts[0]))
    else:
        train, test = ImageSet(*parts[0]), ImageSet(*parts[1])
    if not len(train):
        raise DataError(f"{path}: no training images")
    num_classes = int(max(train.labels.max(), test.labels.max(initial=0))) + 1
    absent = sorted(set(range(num_classes)) - set(np.unique(train.labels).tolist()))
    if absent:
        raise DataError(f"{path}: class ids must be 0..{num_classes - 1} with a training image each; "
                        f"{absent} have none")
    names = arrays.get("class_names")
    if names is None:
        return train, test, tuple(str(c) for c in range(num_classes))
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) != num_classes:
        raise DataError(f"{path}[class_names] must be {num_classes} strings, got {names.dtype} shape {names.shape}")
    return train, test, tuple(str(n) for n in names)
