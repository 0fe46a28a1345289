"""Tests for the CIFAR-10/100, SVHN and Tiny ImageNet readers, on small files in each
dataset's exact on-disk format written here by hand."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from gradosr.data import load_dataset, load_protocol, locate_dataset, resolve_protocol
from gradosr.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, read_cifar_batch, restricted_load
from gradosr.data.registry import dataset_info
from gradosr.errors import DataError

REFUSAL = "only plain data and numpy arrays are allowed"


# --- writers --------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did (protocol 2): bytes and str become py2
    ``str`` (SHORT_BINSTRING/BINSTRING), which Python 3 loads as bytes with
    ``encoding="bytes"``. This is the format of the CIFAR files as distributed."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (and the original files) name numpy.core, not numpy._core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def random_images(rng, labels: np.ndarray, size: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(len(labels), size, size, 3), dtype=np.uint8)


def shuffled_labels(rng, per_class: int, classes: int) -> np.ndarray:
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    return labels


def cifar_data(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 -> the stored N×3072 rows: all red values, then green, then blue."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_pickle(path: Path, obj, style: str) -> None:
    """style: 'py2' (the distributed format), or 'p2'/'p4'/'p5' (Python 3 protocols, str keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if style == "py2":
        path.write_bytes(py2_pickle(obj))
    else:
        obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(style[1:]))


def write_cifar10(folder: Path, n_train: int = 3, n_test: int = 2, seed: int = 0, style: str = "py2"):
    """Write cifar-10-batches-py files into ``folder``; return {'train': (images, labels), 'test': ...}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = shuffled_labels(rng, per_class, 10)
        images = random_images(rng, labels)
        out[split] = (images, labels)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        for name, index in zip(names, np.array_split(np.arange(len(labels)), len(names))):
            write_pickle(folder / name, {
                b"batch_label": f"{name} of 5".encode(),
                b"labels": [int(c) for c in labels[index]],
                b"data": cifar_data(images[index]),
                b"filenames": [f"img_{i}.png".encode() for i in index],
            }, style)
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}))
    return out


def write_cifar100(folder: Path, n_train: int = 1, n_test: int = 1, seed: int = 1, style: str = "py2"):
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in (("train", n_train), ("test", n_test)):
        labels = shuffled_labels(rng, per_class, 100)
        images = random_images(rng, labels)
        out[split] = (images, labels)
        write_pickle(folder / split, {
            b"filenames": [f"x{i}.png".encode() for i in range(len(labels))],
            b"batch_label": split.encode(),
            b"fine_labels": [int(c) for c in labels],
            b"coarse_labels": [int(c) // 5 for c in labels],  # differ from the fine labels
            b"data": cifar_data(images),
        }, style)
    return out


def assert_set(imageset, images: np.ndarray, labels: np.ndarray) -> None:
    assert imageset.images.dtype == np.uint8 and imageset.labels.dtype == np.int64
    assert imageset.images.shape == images.shape
    np.testing.assert_array_equal(imageset.images, images)
    np.testing.assert_array_equal(imageset.labels, labels)


# --- CIFAR ----------------------------------------------------------------------------


def test_cifar10_distributed_format(tmp_path):
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_dataset("cifar10", data_dir=tmp_path)
    assert_set(train, *written["train"])  # batches 1..5 in order
    assert_set(test, *written["test"])
    assert train.images.shape == (30, 32, 32, 3) and train.images.flags.c_contiguous
    # channel-major rows, checked pixel by pixel against the stored bytes
    raw = restricted_load(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    row = raw[b"data"][0]
    for r, c in ((0, 0), (0, 31), (5, 7), (31, 0), (31, 31)):
        assert tuple(train.images[0, r, c]) == (row[r * 32 + c], row[1024 + r * 32 + c], row[2048 + r * 32 + c])
    assert locate_dataset("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert dataset_info("cifar10").class_names == CIFAR10_CLASSES


@pytest.mark.parametrize("style", ["p2", "p4", "p5"])
def test_cifar10_python3_pickles_in_subfolder(tmp_path, style):
    written = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py", seed=2, style=style)
    train, test = load_dataset("cifar10", data_dir=tmp_path)
    assert_set(train, *written["train"])
    assert_set(test, *written["test"])
    assert locate_dataset("cifar10", tmp_path) == tmp_path / "cifar10" / "cifar-10-batches-py"


def test_cifar100_fine_labels_torchvision_root(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python", n_train=2, n_test=1)
    train, test = load_dataset("cifar100", data_dir=tmp_path)
    assert_set(train, *written["train"])
    assert_set(test, *written["test"])
    assert set(train.labels.tolist()) == set(range(100))
    assert locate_dataset("cifar100", tmp_path) == tmp_path / "cifar-100-python"
    names = dataset_info("cifar100").class_names
    assert len(set(names)) == 100 and list(names) == sorted(names) == list(CIFAR100_CLASSES)


def test_cifar_missing_files(tmp_path):
    for name, dirname, sub in (("cifar10", "cifar-10-batches-py", "cifar10"),
                               ("cifar100", "cifar-100-python", "cifar100")):
        assert locate_dataset(name, tmp_path) is None
        with pytest.raises(DataError) as info:
            load_dataset(name, data_dir=tmp_path)
        msg = str(info.value)
        assert str(tmp_path / dirname) in msg and str(tmp_path / sub / dirname) in msg
        assert "tar.gz" in msg and "cifar.html" in msg  # how to get it
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)


class TouchMarker:
    """A pickle payload: unpickling it calls pathlib.Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _numpy_save_payload(marker: Path) -> bytes:
    # protocol 0 by hand: numpy.save(<marker>, 0), which would write <marker>
    return b"cnumpy\nsave\n(V" + str(marker).encode() + b"\nI0\ntR."


@pytest.mark.parametrize("payload", ["touch", "numpy.save"])
def test_restricted_unpickler_refuses_code(tmp_path, payload):
    marker = tmp_path / "pwned.npy"
    control = tmp_path / "control.npy"
    if payload == "touch":
        def make(m):
            return pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": TouchMarker(m)}, protocol=4)
    else:
        make = _numpy_save_payload
    # the payload is live: an ordinary unpickler runs it
    pickle.loads(make(control))
    assert control.exists()

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    path = folder / "data_batch_2"
    path.write_bytes(make(marker))
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(info.value)
    assert "refused to unpickle" in msg and REFUSAL in msg and str(path) in msg
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [set([1])], "x": len}))
    with pytest.raises(DataError, match="refused to unpickle builtins"):
        restricted_load(path)
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(DataError, match="not a valid pickle"):  # only the latin-1 use of _codecs.encode
        restricted_load(path)


def _good_batch(**changes):
    """A small valid CIFAR-10 batch (bytes keys); ``changes`` by str key, None drops the key."""
    batch = {"batch_label": b"x", "labels": [1, 2, 3], "data": np.zeros((3, 3072), np.uint8), "filenames": []}
    batch.update(changes)
    return {k.encode(): v for k, v in batch.items() if v is not None}


@pytest.mark.parametrize("case, fragment", [
    ("text", "not a valid pickle"),
    ("truncated", "not a valid pickle"),
    ("trailing", "after its end"),
    ("empty", "not a valid pickle"),
    ("list", "dict"),
    ("no labels", "labels"),
    ("no data", "data"),
    ("wrong size", "N×3072"),
    ("wrong dtype", "uint8"),
    ("float labels", "list of ints"),
    ("str labels", "list of ints"),
    ("count", "3 images but 2 labels"),
    ("range", "0..9"),
])
def test_cifar_malformed(tmp_path, case, fragment):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    path = folder / "test_batch"
    good = py2_pickle(_good_batch())
    content = {
        "text": b"this is not a pickle\n",
        "truncated": good[: len(good) // 2],
        "trailing": good + b"\x00junk",
        "empty": b"",
        "list": py2_pickle([1, 2, 3]),
        "no labels": py2_pickle(_good_batch(labels=None)),
        "no data": py2_pickle(_good_batch(data=None)),
        "wrong size": py2_pickle(_good_batch(data=np.zeros((3, 3000), np.uint8))),
        "wrong dtype": py2_pickle(_good_batch(data=np.zeros((3, 3072), np.int16))),
        "float labels": py2_pickle(_good_batch(labels=[1.0, 2.5, 3.0])),
        "str labels": py2_pickle(_good_batch(labels=b"123")),
        "count": py2_pickle(_good_batch(labels=[1, 2])),
        "range": py2_pickle(_good_batch(labels=[1, 2, 10])),
    }[case]
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(path) in str(info.value)


def test_cifar100_reader_needs_fine_labels(tmp_path):
    path = tmp_path / "train"
    path.write_bytes(py2_pickle(_good_batch()))  # a CIFAR-10 batch: no fine_labels
    with pytest.raises(DataError, match="fine_labels") as info:
        read_cifar_batch(path, "fine_labels", 100)
    assert str(path) in str(info.value)


# --- SVHN -----------------------------------------------------------------------------


def write_svhn(folder: Path, per_class: int = 2, seed: int = 3):
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", per_class), ("test", 1)):
        digits = shuffled_labels(rng, n, 10)
        images = random_images(rng, digits)
        stored = np.where(digits == 0, 10, digits).astype(np.float64)[:, None]  # N×1, 10 = digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": stored})
        out[split] = (images, digits)
    return out


@pytest.mark.parametrize("sub", ["svhn", None])
def test_svhn(tmp_path, sub):
    folder = tmp_path / sub if sub else tmp_path  # <root>/svhn/ or torchvision's <root>/
    written = write_svhn(folder)
    train, test = load_dataset("svhn", data_dir=tmp_path)
    assert_set(train, *written["train"])
    assert_set(test, *written["test"])
    assert 0 in train.labels and 10 not in train.labels
    assert locate_dataset("svhn", tmp_path) == folder


def test_svhn_errors(tmp_path):
    from scipy.io import savemat

    assert locate_dataset("svhn", tmp_path) is None
    with pytest.raises(DataError) as info:
        load_dataset("svhn", data_dir=tmp_path)
    assert str(tmp_path / "svhn" / "train_32x32.mat") in str(info.value) and "ufldl" in str(info.value)

    folder = tmp_path / "svhn"
    write_svhn(folder)
    path = folder / "test_32x32.mat"
    x = np.zeros((32, 32, 3, 4), np.uint8)
    cases = [
        ({"X": x}, "lacks"),
        ({"y": np.ones((4, 1))}, "lacks"),
        ({"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))}, "32×32×3×N"),
        ({"X": x.astype(np.float32), "y": np.ones((4, 1))}, "uint8"),
        ({"X": x, "y": np.ones((5, 1))}, "N×1"),
        ({"X": x, "y": np.full((4, 1), 11.0)}, "0..10"),
        ({"X": x, "y": np.full((4, 1), 1.5)}, "integer"),
    ]
    for content, fragment in cases:
        savemat(path, content)
        with pytest.raises(DataError, match=fragment) as info:
            load_dataset("svhn", data_dir=tmp_path)
        assert str(path) in str(info.value)
    path.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="not a readable") as info:
        load_dataset("svhn", data_dir=tmp_path)
    assert str(path) in str(info.value)


# --- Tiny ImageNet --------------------------------------------------------------------

WNIDS = ["n09999999", "n01443537", "n04067472"]  # sorted: n01443537 (0), n04067472 (1), n09999999 (2)


def _save_jpeg(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(array, mode).save(path, format="JPEG", quality=100)


def _pillow_rgb64(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (64, 64):
            im = im.resize((64, 64), Image.BILINEAR)
        return np.asarray(im)


def write_tiny(root: Path, with_wnids: bool = True, seed: int = 4):
    """Two training images per class (one greyscale, one 48×40), four val images."""
    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    if with_wnids:
        (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    order = sorted(WNIDS)
    train_paths, train_labels = [], []
    for wnid in order:  # the reader lists classes in sorted order, files sorted by name
        images = folder / "train" / wnid / "images"
        for i, shape in enumerate([(64, 64, 3), (64, 64), (40, 48, 3)]):
            path = images / f"{wnid}_{i}.JPEG"
            _save_jpeg(path, rng.integers(0, 256, size=shape, dtype=np.uint8))
            train_paths.append(path)
            train_labels.append(order.index(wnid))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val_paths, val_labels, lines = [], [], []
    for i, wnid in enumerate(["n04067472", "n09999999", "n01443537", "n04067472"]):
        path = folder / "val" / "images" / f"val_{i}.JPEG"
        _save_jpeg(path, rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
        val_paths.append(path)
        val_labels.append(order.index(wnid))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t3\t60\t61")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    expected = {
        "train": (np.stack([_pillow_rgb64(p) for p in train_paths]), np.array(train_labels)),
        "test": (np.stack([_pillow_rgb64(p) for p in val_paths]), np.array(val_labels)),
    }
    return folder, expected


@pytest.mark.parametrize("with_wnids", [True, False])
def test_tiny_imagenet(tmp_path, with_wnids):
    folder, expected = write_tiny(tmp_path, with_wnids)
    train, test = load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert train.images.shape == (9, 64, 64, 3) and test.images.shape == (4, 64, 64, 3)
    assert_set(train, *expected["train"])
    assert_set(test, *expected["test"])
    # the greyscale image is grey in RGB
    grey = train.images[1].astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert locate_dataset("tiny-imagenet", tmp_path) == folder


def test_tiny_imagenet_errors(tmp_path):
    assert locate_dataset("tiny-imagenet", tmp_path) is None
    with pytest.raises(DataError) as info:
        load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert str(tmp_path / "tiny-imagenet-200") in str(info.value) and "tiny-imagenet-200.zip" in str(info.value)

    folder, _ = write_tiny(tmp_path)
    annotations = folder / "val" / "val_annotations.txt"
    text = annotations.read_text()
    annotations.unlink()
    with pytest.raises(DataError, match="missing") as info:
        load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert str(annotations) in str(info.value)

    annotations.write_text(text.replace("n09999999", "n00000000"))
    with pytest.raises(DataError, match="n00000000") as info:
        load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert str(annotations) in str(info.value)

    annotations.write_text(text)
    bad = folder / "val" / "images" / "val_2.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode") as info:
        load_dataset("tiny-imagenet", data_dir=tmp_path)
    assert str(bad) in str(info.value)


# --- protocols ------------------------------------------------------------------------


def test_cifar_plus_10_protocol(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", n_train=5, n_test=2, seed=5)
    write_cifar100(tmp_path / "cifar100" / "cifar-100-python", n_train=1, n_test=2, seed=6)
    spec = resolve_protocol("cifar+10", split=0)
    data = load_protocol(spec, data_dir=tmp_path)
    known, unknown = spec.known, spec.unknown
    assert len(known) == 4 and len(unknown) == 10
    assert spec.dataset == "cifar10" and spec.unknown_dataset == "cifar100"
    # known classes: CIFAR-10 images, labels remapped to 0..3 in the order of spec.known
    assert len(data.known_train) + len(data.val) == 4 * 5 and len(data.known_test) == 4 * 2
    assert set(data.known_train.labels.tolist()) == set(data.val.labels.tolist()) == {0, 1, 2, 3}
    c10_test = load_dataset("cifar10", tmp_path)[1]
    for label, cls in enumerate(known):
        np.testing.assert_array_equal(data.known_test.images[data.known_test.labels == label],
                                      c10_test.images[c10_test.labels == cls])
    assert data.class_names == tuple(CIFAR10_CLASSES[c] for c in known)
    # unknowns: the CIFAR-100 test images of the 10 listed classes, original ids
    c100_test = load_dataset("cifar100", tmp_path)[1]
    assert sorted(set(data.unknown_test.labels.tolist())) == sorted(unknown)
    assert len(data.unknown_test) == 10 * 2
    np.testing.assert_array_equal(data.unknown_test.images, c100_test.images[np.isin(c100_test.labels, unknown)])
    # cifar+50 on the same files
    spec50 = resolve_protocol("cifar+50", split=3)
    data50 = load_protocol(spec50, data_dir=tmp_path)
    assert sorted(set(data50.unknown_test.labels.tolist())) == sorted(spec50.unknown) and len(spec50.unknown) == 50


# --- end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_fit_evaluate_cifar10(tmp_path, capsys):
    from gradosr.cli import main

    data_dir, run = tmp_path / "data", tmp_path / "run"
    write_cifar10(data_dir / "cifar-10-batches-py", n_train=8, n_test=4, seed=7)
    code = main(["fit", "--protocol", "cifar10", "--split", "0", "--data-dir", str(data_dir), "--model", "lenet",
                 "--epochs", "1", "--out", str(run), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    osr_meta = json.loads((run / "osr.json").read_text())
    assert osr_meta["train"]["model"] == "lenet" and osr_meta["train"]["epochs"] == 1
    code = main(["evaluate", "--run", str(run), "--data-dir", str(data_dir), "--no-progress", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((run / "eval.json").read_text())
    methods = [r["method"] for r in doc["results"]]
    assert methods == ["plus", "msp"]  # the default preset of fit, then msp
    for record in doc["results"]:
        assert 0.0 <= record["auroc"] <= 1.0 and 0.0 <= record["closed_acc"] <= 1.0
