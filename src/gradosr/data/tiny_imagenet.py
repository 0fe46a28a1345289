"""Reader for Tiny ImageNet (200 classes of 64×64 colour images, ``tiny-imagenet-200.zip``).

Layout under ``<root>/tiny-imagenet-200/``:

- ``wnids.txt``: the 200 WordNet ids, one per line (if absent, the folder names under
  ``train/`` are used). Class index = position of the wnid in sorted order.
- ``train/<wnid>/images/*.JPEG``: 500 training images per class.
- ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (tab-separated: file name,
  wnid, bounding box): 50 per class. The val split serves as the test set, as usual in
  open-set recognition; the unlabelled ``test/`` folder is not used.

Images are decoded with Pillow and converted to RGB (a few are greyscale); an image
that is not 64×64 is resized bilinearly. Decoding the 110,000 files takes a while: a
progress bar is shown on a terminal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradosr.data.imageset import ImageSet
from gradosr.errors import DataError

TINY_DIR = "tiny-imagenet-200"
SIZE = 64
_EXTENSIONS = (".jpeg", ".jpg", ".png")


def tiny_folder(root: Path) -> Path:
    """Where the dataset folder is looked for."""
    return root / TINY_DIR


def find_tiny_imagenet(root: Path) -> Path | None:
    """The dataset folder if it holds ``train/``, else None."""
    folder = tiny_folder(root)
    return folder if (folder / "train").is_dir() else None


def read_wnids(folder: Path) -> list[str]:
    """The class wnids in sorted order (from ``wnids.txt``, else the ``train/`` folders)."""
    path = folder / "wnids.txt"
    if path.is_file():
        try:
            wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if len(set(wnids)) != len(wnids):
            raise DataError(f"{path} lists a wnid more than once")
    else:
        train = folder / "train"
        wnids = [p.name for p in train.iterdir() if p.is_dir()] if train.is_dir() else []
    if not wnids:
        raise DataError(f"no classes found: {path} is missing or empty and {folder / 'train'} has no class folders")
    return sorted(wnids)


def decode_image(path: Path) -> np.ndarray:
    """One image file as uint8 64×64×3 RGB (resized bilinearly if of another size)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (SIZE, SIZE):
                im = im.resize((SIZE, SIZE), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


def _decode_all(paths: list[Path], desc: str) -> np.ndarray:
    from gradosr.progress import progress_bar

    out = np.empty((len(paths), SIZE, SIZE, 3), dtype=np.uint8)
    for i, path in enumerate(progress_bar(paths, desc=desc, unit="img", disable=None, leave=False)):
        out[i] = decode_image(path)
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTENSIONS and p.is_file())


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for index, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise DataError(f"missing {images} (class {wnid} of {folder / 'wnids.txt'})")
        files = _image_files(images)
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataError(f"missing {annotations}: it gives the classes of the val images. "
                        "Unzip tiny-imagenet-200.zip again to restore it")
    try:
        lines = annotations.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {annotations}: {exc}") from None
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations} line {number}: expected 'file<TAB>wnid<TAB>box…', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"{annotations} line {number}: wnid {wnid!r} is not one of the {len(wnids)} classes")
        path = folder / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"missing {path} (listed in {annotations} line {number})")
        paths.append(path)
        labels.append(index[wnid])
    return paths, np.asarray(labels, dtype=np.int64)


def load_tiny_imagenet(root: Path, how_to_get: str = "") -> tuple[ImageSet, ImageSet]:
    """Tiny ImageNet as (train, test = val) ImageSets of uint8 64×64×3 images."""
    folder = tiny_folder(root)
    if not (folder / "train").is_dir():
        raise DataError(f"missing {folder / 'train'}: looked for {folder}. {how_to_get}")
    wnids = read_wnids(folder)
    train_paths, train_labels = _train_files(folder, wnids)
    val_paths, val_labels = _val_files(folder, wnids)
    train = ImageSet(_decode_all(train_paths, "tiny-imagenet train"), train_labels)
    test = ImageSet(_decode_all(val_paths, "tiny-imagenet val"), val_labels)
    return train, test
