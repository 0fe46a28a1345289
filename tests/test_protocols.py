"""Tests for open-set protocols: class lists, seeded splits, and the loaded images."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import gradosr.data.registry as registry
from gradosr.data import load_dataset, load_protocol, parse_index_list, resolve_protocol
from gradosr.data.protocols import ProtocolSpec, parse_class_list
from gradosr.errors import ConfigError, DataError
from idx_files import write_idx

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "osr_splits.json"
REPO_SPLITS = Path(__file__).resolve().parents[1] / "src" / "gradosr" / "data" / "osr_splits.json"


@pytest.fixture(scope="module")
def splits_json() -> dict:
    path = SHARED_SPLITS if SHARED_SPLITS.is_file() else REPO_SPLITS
    return json.loads(path.read_text())


# protocol -> (dataset, unknown dataset, classes in dataset, known key, unknown key or None)
EXPECTED = {
    "mnist": ("mnist", "mnist", 10, "mnist", None),
    "mnist-sample": ("mnist-sample", "mnist-sample", 10, "mnist", None),
    "fashion-mnist": ("fashion-mnist", "fashion-mnist", 10, "mnist", None),
    "svhn": ("svhn", "svhn", 10, "svhn", None),
    "cifar10": ("cifar10", "cifar10", 10, "cifar10", None),
    "cifar+10": ("cifar10", "cifar100", 10, "cifar_plus_known", "cifar_plus_10_unknown"),
    "cifar+50": ("cifar10", "cifar100", 10, "cifar_plus_known", "cifar_plus_50_unknown"),
    "tiny-imagenet": ("tiny-imagenet", "tiny-imagenet", 200, "tiny_imagenet", None),
}


# --- class lists ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("split", range(5))
def test_standard_splits_match_json(splits_json, name, split):
    ds, uds, n, kkey, ukey = EXPECTED[name]
    spec = resolve_protocol(name, split=split)
    known = [int(c) for c in splits_json[kkey][split]]
    if ukey is None:
        unknown = [c for c in range(n) if c not in known]
    else:
        unknown = [int(c) for c in splits_json[ukey][split]]
    assert list(spec.known) == known
    assert sorted(spec.unknown) == sorted(unknown)
    assert spec.dataset == ds and spec.unknown_dataset == uds
    assert spec.split == split and spec.seed == split and spec.split_seed is None
    assert spec.num_known == len(known)
    assert ProtocolSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_split_list_sizes(splits_json):
    # sanity of the reference itself: the sizes the literature uses
    assert all(len(k) == 6 for k in splits_json["mnist"])
    assert all(len(k) == 4 for k in splits_json["cifar_plus_known"])
    assert all(len(u) == 10 for u in splits_json["cifar_plus_10_unknown"])
    assert all(len(u) == 50 for u in splits_json["cifar_plus_50_unknown"])
    assert all(len(k) == 20 for k in splits_json["tiny_imagenet"])
    assert len(resolve_protocol("tiny-imagenet", split=2).unknown) == 180


def test_default_split_is_zero():
    assert resolve_protocol("mnist") == resolve_protocol("mnist", split=0)


def test_package_json_equals_shared():
    text = resources.files("gradosr.data").joinpath("osr_splits.json").read_text()
    if not SHARED_SPLITS.is_file():
        pytest.skip("no shared copy of osr_splits.json on this machine")
    assert json.loads(text) == json.loads(SHARED_SPLITS.read_text())


@pytest.mark.parametrize("name", ["mnist", "mnist-sample", "fashion-mnist", "svhn", "cifar10"])
def test_split_seed(name):
    specs = {}
    for seed in range(12):
        spec = resolve_protocol(name, split_seed=seed)
        assert len(spec.known) == 6 and len(spec.unknown) == 4
        assert not set(spec.known) & set(spec.unknown)
        assert sorted(spec.known + spec.unknown) == list(range(10))
        assert spec.split is None and spec.split_seed == seed and spec.seed == seed
        assert resolve_protocol(name, split_seed=seed) == spec  # deterministic
        specs[seed] = spec.known
    assert len(set(specs.values())) > 1  # different seeds, different splits


def test_split_seed_errors():
    with pytest.raises(ConfigError, match="not both"):
        resolve_protocol("mnist", split=1, split_seed=3)
    for name in ("cifar+10", "cifar+50", "tiny-imagenet"):
        with pytest.raises(ConfigError):
            resolve_protocol(name, split_seed=0)


@pytest.mark.parametrize("split", [-1, 5, 17])
def test_split_out_of_range(split):
    with pytest.raises(ConfigError, match="0..4"):
        resolve_protocol("mnist", split=split)


def test_unknown_protocol():
    with pytest.raises(ConfigError, match="unknown protocol"):
        resolve_protocol("imagenet")


def test_custom_protocol():
    spec = resolve_protocol("custom", dataset="fashion-mnist", known="0,2,4,6", unknown="1,3")
    assert spec.name == "custom"
    assert spec.known == (0, 2, 4, 6) and spec.unknown == (1, 3)
    assert spec.dataset == spec.unknown_dataset == "fashion-mnist"
    spec = resolve_protocol("custom", dataset="cifar100", known=(99, 7, 0), unknown=(5,))
    assert spec.known == (99, 7, 0) and spec.unknown == (5,)  # order kept: label i = known[i]
    spec = resolve_protocol("custom", dataset="mnist", known="6-9", unknown="0-1,3")
    assert spec.known == (6, 7, 8, 9) and spec.unknown == (0, 1, 3)
    # no split_seed: seed 0; with it, that seed
    assert spec.seed == 0
    assert resolve_protocol("custom", dataset="mnist", known="0,1", unknown="2", split_seed=4).seed == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(known="0,1,2", unknown="2,3"), "both known and unknown"),
        (dict(known="0,1,10", unknown="3"), "out of range"),
        (dict(known="0,1", unknown="-1"), "out of range"),
        (dict(known="0", unknown="3"), "at least 2"),
        (dict(known="0,1,1", unknown="3"), "duplicates"),
        (dict(known="0,1", unknown="3,3"), "duplicates"),
        (dict(known="a,b", unknown="3"), "invalid"),
        (dict(known="0,1", unknown="x"), "invalid"),
        (dict(known="0,1", unknown=""), "empty"),
        (dict(known="4-2", unknown="3"), "invalid"),
        (dict(known="0,1", unknown=None), "needs"),
    ],
)
def test_custom_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resolve_protocol("custom", dataset="mnist", **kwargs)


def test_custom_needs_dataset_and_standard_refuses_lists():
    with pytest.raises(ConfigError):
        resolve_protocol("custom", known="0,1", unknown="2")
    with pytest.raises(ConfigError):
        resolve_protocol("custom", dataset="no-such-dataset", known="0,1", unknown="2")
    with pytest.raises(ConfigError, match="custom"):
        resolve_protocol("mnist", known="0,1", unknown="2")


def test_cross_spec():
    spec = resolve_protocol("cross", known_dataset="mnist-sample", unknown_dataset="fashion-mnist", split=3)
    assert spec.known == tuple(range(10)) and spec.unknown == tuple(range(10))
    assert spec.dataset == "mnist-sample" and spec.unknown_dataset == "fashion-mnist"
    assert spec.seed == 3
    with pytest.raises(ConfigError):
        resolve_protocol("cross", known_dataset="mnist", unknown_dataset="mnist")
    with pytest.raises(ConfigError):
        resolve_protocol("cross", known_dataset="mnist")


@pytest.mark.parametrize(
    "text, expected",
    [("0-4", [0, 1, 2, 3, 4]), ("0,2", [0, 2]), ("1,3-5", [1, 3, 4, 5]), (" 7 ", [7]),
     ("5,1", [5, 1]), ("2-2", [2])],
)
def test_parse_index_list(text, expected):
    assert parse_index_list(text) == expected
    assert parse_class_list(text) == tuple(expected)


@pytest.mark.parametrize("text", ["a,b", "1-", "3-1", "", ",", "1.5", "0-x", "1--3"])
def test_parse_index_list_errors(text):
    with pytest.raises(ConfigError):
        parse_index_list(text)


# --- loaded images: mnist-sample ------------------------------------------------------


@pytest.fixture(scope="module")
def sample_sets():
    train, test = load_dataset("mnist-sample")
    train.images.setflags(write=False)
    test.images.setflags(write=False)
    return train, test


@pytest.fixture
def sample(sample_sets, monkeypatch):
    """mnist-sample, with the registry answering from the module's copy (no 2 s reload)."""
    monkeypatch.setattr(registry, "load_mnist_sample", lambda: sample_sets)
    return sample_sets


def keys(imageset) -> Counter:
    """Multiset of (image bytes, label)."""
    return Counter((img.tobytes(), int(lab)) for img, lab in zip(imageset.images, imageset.labels))


def image_keys(images: np.ndarray) -> Counter:
    return Counter(img.tobytes() for img in images)


def test_load_protocol_mnist_sample(sample):
    train, test = sample
    spec = resolve_protocol("mnist-sample", split=0)
    known = list(spec.known)
    assert known == [2, 4, 5, 9, 8, 3]
    data = load_protocol(spec)
    assert data.num_known == 6
    assert data.class_names == tuple(str(c) for c in known)

    # known test: label i holds exactly the test images of class known[i]
    assert set(np.unique(data.known_test.labels)) == set(range(6))
    for i, c in enumerate(known):
        got = data.known_test.images[data.known_test.labels == i]
        assert image_keys(got) == image_keys(test.images[test.labels == c])
    assert len(data.known_test) == 600

    # unknown test: exactly the test images of the other classes, original labels
    unknown_mask = ~np.isin(test.labels, known)
    assert keys(data.unknown_test) == keys(test.subset(unknown_mask))
    assert set(np.unique(data.unknown_test.labels)) == {0, 1, 6, 7}

    # training images of the known classes, with their remapped labels
    expected_train = Counter()
    for i, c in enumerate(known):
        expected_train += Counter((img.tobytes(), i) for img in train.images[train.labels == c])
    assert len(expected_train) == 2400  # no duplicate images: disjointness below is meaningful
    kt, val = keys(data.known_train), keys(data.val)
    assert kt + val == expected_train
    assert not set(kt) & set(val)

    # 20% stratified validation
    assert len(data.val) == 480 and len(data.known_train) == 1920
    np.testing.assert_array_equal(np.bincount(data.val.labels, minlength=6), [80] * 6)
    np.testing.assert_array_equal(np.bincount(data.known_train.labels, minlength=6), [320] * 6)


def test_validation_split_seeded(sample):
    spec = resolve_protocol("mnist-sample", split=0)
    a, b = load_protocol(spec), load_protocol(spec)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    np.testing.assert_array_equal(a.val.labels, b.val.labels)
    np.testing.assert_array_equal(a.known_train.images, b.known_train.images)
    # the same classes with another seed: another validation part, the same union
    other = resolve_protocol("custom", dataset="mnist-sample", known=spec.known, unknown=spec.unknown, split_seed=1)
    c = load_protocol(other)
    assert keys(c.val) != keys(a.val)
    assert keys(c.val) + keys(c.known_train) == keys(a.val) + keys(a.known_train)
    assert keys(c.unknown_test) == keys(a.unknown_test)


def test_custom_protocol_load_order(sample):
    train, test = sample
    data = load_protocol(resolve_protocol("custom", dataset="mnist-sample", known="7,1,3", unknown="0"))
    for i, c in enumerate((7, 1, 3)):
        got = data.known_test.images[data.known_test.labels == i]
        assert image_keys(got) == image_keys(test.images[test.labels == c])
    assert keys(data.unknown_test) == keys(test.subset(test.labels == 0))


# --- synthetic fashion-mnist ----------------------------------------------------------


def write_fashion(root: Path, train_per_class, test_per_class, seed: int = 0) -> dict:
    """Write a synthetic Fashion-MNIST (random images) into root/fashion-mnist/."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class, stems in (
        ("train", train_per_class, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
        ("test", test_per_class, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    ):
        counts = [per_class] * 10 if np.isscalar(per_class) else list(per_class)
        labels = np.repeat(np.arange(10), counts).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(root / "fashion-mnist" / stems[0], images)
        write_idx(root / "fashion-mnist" / stems[1], labels)
        out[split] = (images[..., None], labels.astype(np.int64))
    return out


def cross(seed: int):
    return resolve_protocol("cross", known_dataset="mnist-sample", unknown_dataset="fashion-mnist", split=seed)


def test_cross_unknown_larger(sample, tmp_path, no_debian):
    train, test = sample
    fm = write_fashion(tmp_path, 2, 120)  # 1,200 unknown test images > 1,000 known
    fm_test = Counter((img.tobytes(), int(lab)) for img, lab in zip(*fm["test"]))
    data = load_protocol(cross(0), data_dir=tmp_path)
    assert data.num_known == 10
    # all known test images, labels unchanged (identity remap)
    assert keys(data.known_test) == keys(test)
    assert keys(data.known_train) + keys(data.val) == keys(train)
    assert len(data.val) == 800
    # a 1:1 sample of the unknown test set, without repeats
    assert len(data.unknown_test) == len(data.known_test) == 1000
    u = keys(data.unknown_test)
    assert max(u.values()) == 1 and not (u - fm_test)
    # seeded
    again = load_protocol(cross(0), data_dir=tmp_path)
    np.testing.assert_array_equal(again.unknown_test.images, data.unknown_test.images)
    other = load_protocol(cross(1), data_dir=tmp_path)
    assert keys(other.unknown_test) != u
    assert len(other.unknown_test) == 1000


def test_cross_unknown_smaller(sample, tmp_path, no_debian):
    _, test = sample
    fm = write_fashion(tmp_path, 2, 30)  # 300 unknown test images < 1,000 known
    fm_test = Counter((img.tobytes(), int(lab)) for img, lab in zip(*fm["test"]))
    data = load_protocol(cross(0), data_dir=tmp_path)
    assert keys(data.unknown_test) == fm_test  # all of them
    assert len(data.known_test) == 300
    k = keys(data.known_test)
    assert max(k.values()) == 1 and not (k - keys(test))  # a subsample of the known test set
    again = load_protocol(cross(0), data_dir=tmp_path)
    np.testing.assert_array_equal(again.known_test.images, data.known_test.images)
    np.testing.assert_array_equal(again.known_test.labels, data.known_test.labels)
    other = load_protocol(cross(2), data_dir=tmp_path)
    assert len(other.known_test) == 300 and keys(other.known_test) != k


def test_fashion_protocol_on_synthetic(tmp_path, no_debian):
    fm = write_fashion(tmp_path, 10, 4)
    spec = resolve_protocol("fashion-mnist", split=1)
    data = load_protocol(spec, data_dir=tmp_path)
    images, labels = fm["test"]
    for i, c in enumerate(spec.known):
        assert image_keys(data.known_test.images[data.known_test.labels == i]) == image_keys(images[labels == c])
    np.testing.assert_array_equal(np.bincount(data.val.labels), [2] * 6)
    assert data.class_names[0] == "Dress"  # known[0] = 3


def test_known_class_without_test_images(tmp_path, no_debian):
    spec = resolve_protocol("fashion-mnist", split=0)
    counts = [5] * 10
    counts[spec.known[2]] = 0
    write_fashion(tmp_path, 10, counts)
    with pytest.raises(DataError, match=rf"\[{spec.known[2]}\]"):
        load_protocol(spec, data_dir=tmp_path)


def test_unknown_class_without_test_images(tmp_path, no_debian):
    spec = resolve_protocol("fashion-mnist", split=0)
    counts = [5] * 10
    counts[spec.unknown[0]] = 0
    write_fashion(tmp_path, 10, counts)
    with pytest.raises(DataError, match="no images"):
        load_protocol(spec, data_dir=tmp_path)


def test_known_class_without_enough_training_images(tmp_path, no_debian):
    spec = resolve_protocol("fashion-mnist", split=0)
    counts = [10] * 10
    counts[spec.known[0]] = 0
    write_fashion(tmp_path, counts, 5)
    with pytest.raises(DataError):
        load_protocol(spec, data_dir=tmp_path)
    counts[spec.known[0]] = 1
    write_fashion(tmp_path, counts, 5)
    with pytest.raises(DataError, match="at least 2"):
        load_protocol(spec, data_dir=tmp_path)


def test_custom_protocol_splits_are_seeds():
    a = resolve_protocol("custom", dataset="mnist-sample", known="0,1,2", unknown="3,4", split=3)
    b = resolve_protocol("custom", dataset="mnist-sample", known="0,1,2", unknown="3,4")
    assert (a.seed, a.split, b.seed) == (3, 3, 0)
    assert a.known == b.known == (0, 1, 2) and a.label == "custom:mnist-sample/seed3"
    with pytest.raises(ConfigError):
        resolve_protocol("custom", dataset="mnist-sample", known="0,1,2", unknown="3,4", split=1, split_seed=2)
