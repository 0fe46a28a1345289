"""Readers for the python versions of CIFAR-10 and CIFAR-100 (Krizhevsky 2009).

On disk (as extracted from ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``):

- ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5`` (10,000 images each) and
  ``test_batch``; each a pickled dict with ``data`` (N×3072 uint8: the 1,024 red values,
  then green, then blue, each 32×32 row-major) and ``labels`` (N ints 0-9).
- ``cifar-100-python/``: ``train`` and ``test``; the same ``data``, with ``fine_labels``
  (0-99, used here) and ``coarse_labels``.

The files are Python 2 pickles, so their keys load as bytes (``encoding="bytes"``);
pickles re-saved by Python 3 with str keys are read as well. They are read with a
restricted unpickler that creates plain data and numpy arrays only: any other global
is refused before anything runs.

The batches folder is looked for in ``<root>/`` (torchvision's root) and in
``<root>/cifar10/`` (``<root>/cifar100/`` for CIFAR-100).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from gradosr.data.imageset import ImageSet
from gradosr.errors import DataError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)

_PIXELS = 3 * 32 * 32

REFUSED = "only plain data and numpy arrays are allowed"


def _latin1_encode(text, encoding="latin1"):
    """What Python 3 writes for ``bytes`` in protocol-2 pickles (``_codecs.encode``),
    admitted for the latin-1 case only."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: numpy's array and dtype reconstruction.

    The functions are taken from numpy's own pickling (``__reduce__``), so that the old
    (``numpy.core``) and new (``numpy._core``) module names map to the same object
    without importing any module named in the file.
    """
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]
    frombuffer = probe.__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds containers, bytes/str, numbers and numpy arrays only.

    Every global (class or function) named by the stream goes through
    :meth:`find_class`; anything outside :func:`_allowed_globals` raises DataError
    before it is called.
    """

    def __init__(self, file, path: Path | str = "<pickle>"):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"refused to unpickle {module}.{name} in {self._path}: {REFUSED}") from None

    def persistent_load(self, pid):
        raise DataError(f"refused to unpickle a persistent id in {self._path}: {REFUSED}")


def restricted_load(path: Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    Raises:
        DataError: the file cannot be read, is not a (complete) pickle, or names a
            global other than numpy's array reconstruction (nothing of it is run).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    stream = io.BytesIO(raw)
    try:
        obj = RestrictedUnpickler(stream, path).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupt pickle can fail in many ways
        raise DataError(f"{path} is not a valid pickle file (truncated or corrupt: "
                        f"{type(exc).__name__}: {exc})") from None
    if stream.tell() != len(raw):
        raise DataError(f"{path} is not a valid pickle file ({len(raw) - stream.tell()} bytes after its end)")
    return obj


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> ImageSet:
    """One CIFAR batch file as an ImageSet of uint8 N×32×32×3 images and int64 labels.

    Raises:
        DataError: naming ``path``, if the file is not a pickle, is refused, lacks
            ``data`` or ``label_key``, or holds arrays of the wrong type or size.
    """
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path} must hold a pickled dict, got {type(obj).__name__}")
    entries = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in ("data", label_key) if k not in entries]
    if missing:
        raise DataError(f"{path} lacks the key(s) {missing} (it holds {sorted(map(str, entries))}); "
                        "is it a CIFAR batch of the right dataset?")
    data, labels = entries["data"], entries[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array N×{_PIXELS}, got {what}")
    if isinstance(labels, (bytes, str)):
        raise DataError(f"{path}: {label_key!r} must be a list of ints, got {type(labels).__name__}")
    try:
        labels = np.asarray(labels)
    except Exception:
        raise DataError(f"{path}: {label_key!r} must be a list of ints") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {label_key!r} must be a list of ints, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path} has {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ImageSet(images, labels.astype(np.int64))


def cifar_folders(root: Path, dirname: str, subdir: str) -> list[Path]:
    """Where the batches folder ``dirname`` is looked for, in order."""
    return [root / dirname, root / subdir / dirname]


def find_cifar_dir(root: Path, dirname: str, subdir: str, marker: str) -> Path | None:
    """The first batches folder that holds ``marker`` (a training file), or None."""
    for folder in cifar_folders(root, dirname, subdir):
        if (folder / marker).is_file():
            return folder
    return None


def _read_files(root: Path, dirname: str, subdir: str, names: tuple[str, ...], label_key: str,
                num_classes: int, how_to_get: str) -> ImageSet:
    candidates = cifar_folders(root, dirname, subdir)
    # the first folder holding every file, else the first that exists (to name what it lacks)
    folder = next((f for f in candidates if all((f / n).is_file() for n in names)), None)
    folder = folder or next((f for f in candidates if f.is_dir()), None)
    if folder is None:
        looked = " or ".join(str(f) for f in candidates)
        raise DataError(f"missing {dirname}/: looked for {looked}. {how_to_get}")
    parts = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"missing {path} (expected {', '.join(names)} in {folder}). {how_to_get}")
        parts.append(read_cifar_batch(path, label_key, num_classes))
    if len(parts) == 1:
        return parts[0]
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def load_cifar10(root: Path, how_to_get: str = "") -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 as (train, test): 50,000 and 10,000 images 32×32×3, labels 0-9."""
    return (_read_files(root, CIFAR10_DIR, "cifar10", CIFAR10_TRAIN, "labels", 10, how_to_get),
            _read_files(root, CIFAR10_DIR, "cifar10", CIFAR10_TEST, "labels", 10, how_to_get))


def load_cifar100(root: Path, how_to_get: str = "") -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 as (train, test): 50,000 and 10,000 images 32×32×3, fine labels 0-99."""
    return (_read_files(root, CIFAR100_DIR, "cifar100", ("train",), "fine_labels", 100, how_to_get),
            _read_files(root, CIFAR100_DIR, "cifar100", ("test",), "fine_labels", 100, how_to_get))


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
