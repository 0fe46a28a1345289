"""Image folders as datasets: the torchvision ``ImageFolder`` layout, read with Pillow.

Layouts (``folder:PATH``):

- ``PATH/<class>/**/*.png|jpg|jpeg|bmp|webp``: one sub-folder per class, searched
  recursively; classes sorted by folder name give the ids 0..C-1 (torchvision's rule);
- the same under ``PATH/train/`` and ``PATH/test/`` (the same class folders in both);
  without them a stratified 20% of each class (seed 0, :data:`TEST_FRACTION`) is the
  test part, so a folder always splits the same way;
- ``PATH/*.png…`` with no class folders: an *unlabeled* set, usable only as unknowns.

Images are converted (:func:`gradosr.preprocess.convert_uint8`) to the size and
channel count of the first image (in sorted path order), or to ``image_size`` ×
``image_size``; 1-channel modes stay grey, every other mode becomes RGB. A file that
Pillow cannot read is skipped and counted (one line on stderr), or refused with
``strict``. Other files (no image suffix) are ignored. With ``stream`` the folder is
indexed instead (:mod:`gradosr.data.indexed`: paths and labels in memory, pixels
decoded in chunks by worker processes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradosr.data.imageset import ImageSet, ImageSource
from gradosr.errors import DataError
from gradosr.preprocess import convert_uint8
from gradosr.progress import progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
#: Pillow modes read as one grey channel (every other mode is converted to RGB)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La")


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursive), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class FolderLayout:
    """What a folder holds, found without reading any image.

    Attributes:
        root: the folder.
        classes: class folder names in id order (empty: an unlabeled folder).
        parts: ``{"train": files, "test": files}`` or ``{"all": files}``; ``files`` is
            a list of (path, label), label -1 in an unlabeled folder.
    """

    root: Path
    classes: tuple[str, ...]
    parts: dict[str, list[tuple[Path, int]]]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def first_file(self) -> Path:
        return next(iter(self.parts.values()))[0][0]


def _class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _labelled_files(root: Path, where: str) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    folders = _class_folders(root)
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        found = image_files(folder)
        if not found:
            raise DataError(f"{where}: class folder {folder.name!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        files += [(p, label) for p in found]
    return tuple(f.name for f in folders), files


def scan_folder(root: str | Path) -> FolderLayout:
    """The :class:`FolderLayout` of ``root``; DataError for a folder with no images, an
    empty class folder, class folders beside loose images, or train/ and test/ with
    different classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no such folder: {root}")
    names = {p.name for p in root.iterdir() if p.is_dir()}
    if {"train", "test"} <= names:
        classes, train = _labelled_files(root / "train", f"{root}/train")
        test_classes, test = _labelled_files(root / "test", f"{root}/test")
        if classes != test_classes:
            raise DataError(f"{root}: train/ and test/ must hold the same class folders, got "
                            f"{list(classes)} and {list(test_classes)}")
        if not classes:
            raise DataError(f"{root}/train holds no class folders")
        return FolderLayout(root, classes, {"train": train, "test": test})
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if _class_folders(root):
        if loose:
            raise DataError(f"{root} holds both class folders and {len(loose)} loose images (e.g. {loose[0].name}); "
                            "move the images into class folders, or point to a folder of images only")
        classes, files = _labelled_files(root, str(root))
        return FolderLayout(root, classes, {"all": files})
    if not loose:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders")
    return FolderLayout(root, (), {"all": [(p, -1) for p in sorted(loose)]})


def _open(path: Path):
    """The decoded Pillow image of ``path``; DataError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def image_format(path: Path, image_size: int | None) -> tuple[tuple[int, int], int]:
    """((H, W), channels) that a folder whose first image is ``path`` is converted to."""
    img = _open(path)
    channels = 1 if img.mode in _GREY_MODES else 3
    return ((image_size, image_size) if image_size else (img.height, img.width)), channels


def _as_array(img, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    arr = np.array(img.convert(mode) if img.mode != mode else img, dtype=np.uint8)  # a writable copy
    return arr[..., None] if arr.ndim == 2 else arr


def read_images(files: list[tuple[Path, int]], size: tuple[int, int], channels: int, strict: bool,
                where: str, progress: bool = False) -> tuple[ImageSet, list[tuple[Path, str]]]:
    """The images of ``files`` converted to ``size`` × ``channels`` (uint8 N×H×W×C), and the
    (path, reason) of each unreadable file skipped; with ``strict`` the first one raises."""
    images = np.empty((len(files), *size, channels), np.uint8)
    labels = np.empty(len(files), np.int64)
    skipped: list[tuple[Path, str]] = []
    n = 0
    for path, label in progress_bar(files, desc=f"reading {where}", disable=not progress, unit="img"):
        try:
            img = _open(path)
        except DataError as exc:
            if strict:
                raise DataError(f"{exc} (--strict refuses unreadable files)") from None
            skipped.append((path, str(exc)))
            continue
        arr = _as_array(img, channels)
        images[n] = convert_uint8(arr[None], size, channels)[0]
        labels[n] = label
        n += 1
    return ImageSet(images[:n], labels[:n]), skipped


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices (:data:`TEST_FRACTION`, seed :data:`SPLIT_SEED`);
    classes with a single image stay in train."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(TEST_FRACTION * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def split_train_test(data: ImageSource) -> tuple[ImageSource, ImageSource]:
    """A labelled set without its own test part, split by :func:`_split`; an unlabeled set
    is all test (its train part is empty)."""
    if len(data) and data.labels.min() < 0:
        return data.subset(np.zeros(len(data), bool)), data
    train, test = _split(data.labels)
    return data.subset(train), data.subset(test)


def load_folder(root: str | Path, image_size: int | None = None, strict: bool = False,
                progress: bool = False, stream: bool = False,
                num_workers: int | None = None) -> tuple[ImageSource, ImageSource, tuple[str, ...]]:
    """(train, test, class names) of the image folder ``root`` (see the module docstring):
    ImageSets read into memory, or with ``stream`` indexed
    :class:`gradosr.data.indexed.FolderImages` whose pixels are decoded on demand by
    ``num_workers`` processes (the same images, byte for byte)."""
    from gradosr.data.indexed import index_files

    layout = scan_folder(root)
    size, channels = image_format(layout.first_file(), image_size)
    parts, skipped = {}, []
    for name, files in layout.parts.items():
        if stream:
            parts[name], lost = index_files(files, size, channels, strict, num_workers)
        else:
            parts[name], lost = read_images(files, size, channels, strict, f"{layout.root}", progress)
        skipped += lost
    if skipped:
        print(f"gradosr: skipped {len(skipped)} unreadable image file(s) under {layout.root} (first: "
              f"{skipped[0][1]}); --strict refuses them", file=sys.stderr)
    if "all" in parts:
        if not len(parts["all"]):
            raise DataError(f"{layout.root}: none of its images could be read")
        train, test = split_train_test(parts["all"])
    else:
        train, test = parts["train"], parts["test"]
    if layout.labelled:
        missing = sorted(set(range(len(layout.classes))) - set(np.unique(train.labels).tolist()))
        if missing:
            raise DataError(f"{layout.root}: class folder(s) {[layout.classes[c] for c in missing]} have no "
                            "readable training images")
    return train, test, layout.classes
