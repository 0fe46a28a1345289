"""Tests for gradosr.train (closed-set training, determinism, resume, augmentation)
and gradosr.runs.ensure_classifier (reuse / refusal of stored classifiers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradosr.runs as runs
from gradosr.classifier import Classifier
from gradosr.data.imageset import ImageSet
from gradosr.data.protocols import OSRData, ProtocolSpec
from gradosr.errors import CheckpointError, ConfigError
from gradosr.preprocess import Preprocessing
from gradosr.runs import classifier_identity, ensure_classifier
from gradosr.train import TrainConfig, augment_batch, default_train_config, train_classifier

PRE = Preprocessing.default((28, 28), 1)
CLASSES = [0, 1, 2]


def make_images(n_per_class: int, seed: int, num_classes: int = 3) -> ImageSet:
    """28×28×1 uint8 images: class c has a bright horizontal band at rows 9c..9c+8, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), 28, 28, 1))
    for c in range(num_classes):
        images[labels == c, 9 * c:9 * c + 9, :, 0] += 180
    return ImageSet(np.clip(images, 0, 255).astype(np.uint8), labels)


TRAIN = make_images(16, seed=1)
VAL = make_images(4, seed=2)


def cfg(**kw) -> TrainConfig:
    base = dict(model="lenet", epochs=2, batch_size=16, optimizer="adam", lr=1e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def train(config: TrainConfig, **kw) -> Classifier:
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda line: None)
    return train_classifier(TRAIN, VAL, CLASSES, config, PRE, **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class Crash(RuntimeError):
    pass


def crash_at_line(n: int):
    """A ``log`` callback that raises when it receives its n-th epoch line.

    ``train_classifier`` logs an epoch's line before writing that epoch's checkpoint,
    so crashing at line 2 leaves the checkpoint of epoch 1 on disk.
    """
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if len(lines) == n:
            raise Crash(line)

    return log


# ------------------------------------------------------------------ determinism


def test_same_seed_same_weights_other_seed_other_weights():
    a = train(cfg(seed=3))
    b = train(cfg(seed=3))
    assert_same_weights(a.model, b.model)
    c = train(cfg(seed=4))
    other = dict(c.model.named_parameters())
    assert all(not torch.equal(p, other[name]) for name, p in a.model.named_parameters())
    # training did something: the model separates the bands
    logits = a.logits(VAL.images)
    assert (logits.argmax(1).numpy() == VAL.labels).mean() > 0.5


def test_training_records_history_and_metadata(tmp_path):
    lines = []
    clf = train(cfg(), out_dir=tmp_path, log=lines.append, meta={"protocol": {"name": "x"}})
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["complete"] is True and meta["epoch"] == 2
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["train"] == cfg().to_dict() and meta["protocol"] == {"name": "x"}
    assert meta["arch"] == "lenet" and meta["class_ids"] == CLASSES
    loaded = Classifier.load(tmp_path)
    assert_same_weights(loaded.model, clf.model)


def test_training_rejects_bad_labels():
    bad = ImageSet(TRAIN.images, np.where(TRAIN.labels == 2, 3, TRAIN.labels))
    with pytest.raises(ConfigError):
        train_classifier(bad, None, CLASSES, cfg(epochs=1), PRE, progress=False, log=lambda s: None)


# ------------------------------------------------------------------------ resume


def test_resume_after_crash_gives_the_uninterrupted_weights(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    config = cfg(epochs=3)
    full = train(config, out_dir=a_dir)

    with pytest.raises(Crash):
        train(config, out_dir=b_dir, log=crash_at_line(2))
    stored = json.loads((b_dir / "model.json").read_text())
    assert stored["epoch"] == 1 and stored["complete"] is False

    resumed = train(config, out_dir=b_dir, resume=True)
    assert_same_weights(resumed.model, full.model)
    assert resumed.meta["epoch"] == 3 and resumed.meta["complete"] is True
    assert [h["epoch"] for h in resumed.meta["history"]] == [1, 2, 3]
    assert_same_weights(Classifier.load(b_dir).model, full.model)


def test_resume_with_other_config_or_identity_is_refused(tmp_path):
    config = cfg(epochs=3)
    with pytest.raises(Crash):
        train(config, out_dir=tmp_path, log=crash_at_line(2), meta={"protocol": {"name": "p"}})
    with pytest.raises(CheckpointError, match="lr"):
        train(cfg(epochs=3, lr=2e-3), out_dir=tmp_path, resume=True, meta={"protocol": {"name": "p"}})
    with pytest.raises(CheckpointError, match="protocol"):
        train(config, out_dir=tmp_path, resume=True, meta={"protocol": {"name": "q"}})
    # the matching identity still resumes
    clf = train(config, out_dir=tmp_path, resume=True, meta={"protocol": {"name": "p"}})
    assert clf.meta["complete"] is True


def test_resume_of_a_complete_run_keeps_it_complete(tmp_path):
    config = cfg(epochs=2)
    full = train(config, out_dir=tmp_path)
    again = train(config, out_dir=tmp_path, resume=True, log=crash_at_line(1))  # no epoch left to run
    assert_same_weights(again.model, full.model)
    assert again.meta["complete"] is True and again.meta["epoch"] == 2
    assert len(again.meta["history"]) == 2


def test_resume_needs_a_folder():
    with pytest.raises(ConfigError):
        train(cfg(), resume=True)


# ------------------------------------------------------------------ augmentation


def test_augment_crop_matches_naive_crop():
    x = torch.randn(5, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, "crop", torch.Generator().manual_seed(42))
    assert out.shape == x.shape

    g = torch.Generator().manual_seed(42)
    dy = torch.randint(0, 9, (5,), generator=g)
    dx = torch.randint(0, 9, (5,), generator=g)
    for i in range(5):
        padded = torch.zeros(2, 6 + 8, 7 + 8)
        padded[:, 4:10, 4:11] = x[i]
        expected = padded[:, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7]
        assert torch.equal(out[i], expected)
    # the offsets really vary: some samples are shifted, so the output differs from x
    assert not torch.equal(out, x)


def test_augment_crop_flip_matches_naive():
    x = torch.randn(16, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, "crop-flip", torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 9, (16,), generator=g)
    dx = torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert 0 < int(flip.sum()) < 16
    for i in range(16):
        padded = F.pad(x[i], (4, 4, 4, 4))
        expected = padded[:, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_augment_none_is_identity():
    x = torch.randn(3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(augment_batch(x, "none", g), x)
    assert torch.equal(g.get_state(), state)  # draws nothing


# --------------------------------------------------------------- default configs


def test_default_train_configs():
    m = default_train_config("mnist-sample")
    assert (m.model, m.optimizer, m.lr, m.batch_size, m.epochs) == ("lenet", "adam", 1e-3, 128, 15)
    assert (m.augment, m.weight_decay, m.schedule, m.seed) == ("none", 0.0, "none", 0)
    f = default_train_config("fashion-mnist")
    assert (f.model, f.optimizer, f.lr, f.batch_size, f.epochs) == ("lenet", "adam", 1e-3, 128, 10)
    c = default_train_config("cifar10")
    assert (c.model, c.optimizer, c.lr, c.momentum, c.weight_decay, c.schedule, c.epochs, c.augment) == (
        "cnn32", "sgd", 0.1, 0.9, 5e-4, "cosine", 100, "crop-flip")
    assert default_train_config("svhn").augment == "crop"


def test_default_train_config_overrides():
    o = default_train_config("mnist-sample", epochs=3, lr=0.01, seed=5, batch_size=None, model=None)
    assert (o.model, o.epochs, o.lr, o.seed, o.batch_size) == ("lenet", 3, 0.01, 5, 128)
    with pytest.raises(ConfigError):
        default_train_config("no-such-dataset")
    with pytest.raises(ConfigError):
        default_train_config("mnist-sample", optimizer="rmsprop")


# ------------------------------------------------------------- ensure_classifier


SPEC = ProtocolSpec("custom", "mnist-sample", (0, 1, 2), (3,), "mnist-sample")


def make_data() -> OSRData:
    unknown = make_images(2, seed=4, num_classes=2)
    return OSRData(SPEC, TRAIN, VAL, make_images(4, seed=3),
                   ImageSet(unknown.images, np.full(len(unknown), 3)), ("0", "1", "2"))


def test_ensure_classifier_trains_then_reuses(tmp_path, monkeypatch):
    data, config = make_data(), cfg()
    out = tmp_path / "classifier"
    clf, reused = ensure_classifier(data, config, out, progress=False, log=lambda s: None)
    assert reused is False
    meta = json.loads((out / "model.json").read_text())
    expected_acc = float((clf.logits(data.known_test.images).argmax(1).numpy() == data.known_test.labels).mean())
    assert meta["test_acc"] == pytest.approx(expected_acc)
    assert meta["protocol"] == SPEC.to_dict() and meta["train"] == config.to_dict()
    assert meta["val_acc"] == meta["history"][-1]["val_acc"]
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("must not retrain")

    monkeypatch.setattr(runs, "train_classifier", boom)
    again, reused = ensure_classifier(data, config, out, progress=False)
    assert reused is True
    assert_same_weights(again.model, clf.model)
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_ensure_classifier_refuses_another_identity(tmp_path):
    data = make_data()
    out = tmp_path / "classifier"
    ensure_classifier(data, cfg(), out, progress=False, log=lambda s: None)
    with pytest.raises(CheckpointError, match=r"train\.lr"):
        ensure_classifier(data, cfg(lr=5e-3), out, progress=False)
    with pytest.raises(CheckpointError, match=r"train\.seed"):
        ensure_classifier(data, cfg(seed=1), out, progress=False)
    other = OSRData(ProtocolSpec("custom", "mnist-sample", (0, 1, 3), (4,), "mnist-sample"),
                    data.known_train, data.val, data.known_test, data.unknown_test, data.class_names)
    with pytest.raises(CheckpointError, match=r"protocol\.known"):
        ensure_classifier(other, cfg(), out, progress=False)
    # other unknowns on the same known data: what trains the classifier is the same, so it is reused
    spec = data.spec
    same_known = OSRData(ProtocolSpec(spec.name, spec.dataset, spec.known, (9,), spec.unknown_dataset, spec.split,
                                      spec.split_seed, spec.seed),
                         data.known_train, data.val, data.known_test, data.unknown_test, data.class_names)
    first = Classifier.load(out)
    clf, reused = ensure_classifier(same_known, cfg(), out, progress=False)
    assert reused
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, clf.model.state_dict()[k])


def test_ensure_classifier_unfinished_needs_resume(tmp_path):
    data, config = make_data(), cfg(epochs=3)
    out = tmp_path / "classifier"
    with pytest.raises(Crash):
        ensure_classifier(data, config, out, progress=False, log=crash_at_line(2))
    with pytest.raises(CheckpointError, match="unfinished"):
        ensure_classifier(data, config, out, progress=False)
    clf, reused = ensure_classifier(data, config, out, resume=True, progress=False, log=lambda s: None)
    assert reused is False and clf.meta["complete"] is True and "test_acc" in clf.meta
    full = train(config, meta={"protocol": SPEC.to_dict()})
    assert_same_weights(clf.model, full.model)


def test_ensure_classifier_completes_a_run_missing_only_test_acc(tmp_path):
    """A complete training whose test accuracy was never recorded (crash after the last
    epoch) is finished without retraining, and stays marked complete."""
    data, config = make_data(), cfg()
    out = tmp_path / "classifier"
    full = train_classifier(data.known_train, data.val, CLASSES, config, PRE, out_dir=out, progress=False,
                            log=lambda s: None, meta={"protocol": SPEC.to_dict()}, class_names=["0", "1", "2"])
    assert set(classifier_identity(SPEC, config)) <= set(full.meta)
    clf, reused = ensure_classifier(data, config, out, progress=False, log=crash_at_line(1))
    assert reused is False
    assert_same_weights(clf.model, full.model)
    meta = json.loads((out / "model.json").read_text())
    assert meta["complete"] is True and "test_acc" in meta and meta["val_acc"] is not None
    _, reused = ensure_classifier(data, config, out, progress=False)
    assert reused is True


def test_image_size_option_sets_the_preprocessing():
    from gradosr.train import default_preprocessing, default_train_config

    cfg = default_train_config("tiny-imagenet", image_size=64)
    assert (cfg.model, cfg.epochs, cfg.image_size) == ("cnn32", 100, 64)
    assert default_preprocessing("tiny-imagenet", cfg.model, cfg.image_size).size == (64, 64)
    assert default_preprocessing("tiny-imagenet", "cnn32").size == (32, 32)
    assert default_preprocessing("fashion-mnist", "lenet").size == (28, 28)
    assert default_preprocessing("fashion-mnist", "cnn32").size == (32, 32)
    with pytest.raises(ConfigError):
        default_train_config("cifar10", image_size=4)
