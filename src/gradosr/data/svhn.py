"""Reader for SVHN, format 2: cropped 32×32 digits (Netzer et al. 2011).

Files: ``train_32x32.mat`` (73,257 images) and ``test_32x32.mat`` (26,032), MATLAB
files read with :func:`scipy.io.loadmat`. ``X`` is uint8 32×32×3×N and ``y`` is N×1,
with the label 10 standing for the digit 0 (returned as 0). The ``extra`` set is not
used.

Looked for in ``<root>/svhn/`` and in ``<root>/`` (torchvision's SVHN root).

``scipy.io.loadmat`` crashes the interpreter (segmentation fault) on some corrupt
files (scipy 1.17: a data element of type 0, a sparse class flag, ...), so it runs in a
child process that hands the two arrays back as ``.npy`` files (read with
``allow_pickle=False``): a corrupt file gives a DataError, never a crash.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gradosr.data.imageset import ImageSet
from gradosr.errors import DataError

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def svhn_folders(root: Path) -> list[Path]:
    """The folders searched for the .mat files, in order."""
    return [root / "svhn", root]


def find_svhn_file(root: Path, split: str) -> Path | None:
    """The first existing ``<split>_32x32.mat``, or None."""
    for folder in svhn_folders(root):
        if (folder / SVHN_FILES[split]).is_file():
            return folder / SVHN_FILES[split]
    return None


# Run by ``python -c`` with argv = [path, out folder]; exit 3 with a one-line reason on stderr.
_LOADMAT_CHILD = r"""
import sys
sys.path = [p for p in sys.path if p not in ("", ".")]  # never import from the working directory
import numpy as np
from scipy.io import loadmat
path, out = sys.argv[1], sys.argv[2]
try:
    mat = loadmat(path, variable_names=["X", "y"])
except Exception as exc:  # scipy raises ValueError, TypeError, OSError, ... on corrupt files
    sys.stderr.write(f"{type(exc).__name__}: {exc}".replace("\n", " "))
    sys.exit(3)
for key in ("X", "y"):
    if key in mat:
        value = np.asarray(mat[key])
        if value.dtype.kind not in "biuf":
            sys.stderr.write(f"{key} holds MATLAB data of type {value.dtype}, not numbers")
            sys.exit(3)
        np.save(f"{out}/{key}.npy", value, allow_pickle=False)
"""


def _loadmat_isolated(path: Path) -> dict[str, np.ndarray]:
    """The variables X and y (those present) of a MATLAB file, read by scipy.io.loadmat
    in a child process; DataError when the file is unreadable or crashes the reader."""
    with tempfile.TemporaryDirectory(prefix="gradosr-mat-") as tmp:
        try:
            proc = subprocess.run([sys.executable, "-c", _LOADMAT_CHILD, str(path), tmp],
                                  capture_output=True, text=True, errors="replace")
        except OSError as exc:
            raise DataError(f"cannot start a process to read {path}: {exc}") from None
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            why = (f"the reader crashed with signal {-proc.returncode}" if proc.returncode < 0
                   else lines[-1].strip() if lines else f"exit status {proc.returncode}")
            raise DataError(f"{path} is not a readable MATLAB .mat file ({why})")
        out = {}
        for key in ("X", "y"):
            npy = Path(tmp) / f"{key}.npy"
            if npy.is_file():
                out[key] = np.load(npy, allow_pickle=False)
        return out


def read_svhn_mat(path: Path) -> ImageSet:
    """One SVHN .mat file as uint8 N×32×32×3 images and int64 labels 0-9.

    Raises:
        DataError: naming ``path``, if it is not a readable MATLAB file, lacks ``X`` or
            ``y``, or holds arrays of the wrong shape, type or values.
    """
    mat = _loadmat_isolated(Path(path))
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise DataError(f"{path} lacks the variable(s) {missing}; is it an SVHN *_32x32.mat file?")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: X must be a uint8 array 32×32×3×N, got {x.dtype} of shape {x.shape}")
    n = x.shape[3]
    if y.ndim not in (1, 2) or y.size != n or (y.ndim == 2 and 1 not in y.shape):
        raise DataError(f"{path}: y must be an N×1 label vector for N = {n} images, got shape {y.shape}")
    y = y.reshape(-1)
    if y.size and (y.dtype.kind not in "iuf" or not np.all(y == np.round(y))):
        raise DataError(f"{path}: y must hold integer labels, got {y.dtype}")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DataError(f"{path}: labels must lie in 0..10 (10 = digit 0), found {labels.min()}..{labels.max()}")
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return ImageSet(images, labels)


def load_svhn(root: Path, how_to_get: str = "") -> tuple[ImageSet, ImageSet]:
    """SVHN as (train, test) ImageSets."""
    parts = []
    for split in ("train", "test"):
        path = find_svhn_file(root, split)
        if path is None:
            looked = " or ".join(str(f / SVHN_FILES[split]) for f in svhn_folders(root))
            raise DataError(f"missing {SVHN_FILES[split]}: looked for {looked}. {how_to_get}")
        parts.append(read_svhn_mat(path))
    return parts[0], parts[1]
