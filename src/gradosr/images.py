"""Reading user image files (PNG, JPEG, ... via Pillow) for ``predict``."""

from __future__ import annotations

import os

import numpy as np

from gradosr.errors import DataError
from gradosr.preprocess import Preprocessing


def read_image(path: str | os.PathLike, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """One image file as uint8 1×H×W×C, converted to the preprocessing's channel count
    (grey 'L' or 'RGB'); DataError naming the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = "L" if preprocessing is not None and preprocessing.channels == 1 else "RGB"
            arr = np.array(img.convert(mode), dtype=np.uint8)  # a writable copy
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"image {path} is empty")
    return arr[None]
