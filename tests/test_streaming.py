"""Datasets larger than memory (docs/design.md, "Streaming"): an indexed folder streams the
images the in-memory reader returns, every stage reads them in chunks and gives the
numbers of a one-shot pass, and the Python API takes torch Datasets and DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradosr.classifier import Classifier
from gradosr.data import imageset
from gradosr.data.by_path import load_path_dataset
from gradosr.data.folders import load_folder
from gradosr.data.indexed import FolderImages
from gradosr.data.protocols import load_protocol, resolve_protocol
from gradosr.detectors import ScorerInputs
from gradosr.detectors.registry import make_scorer
from gradosr.errors import DataError
from gradosr.evaluation.scoring import classifier_outputs, score_split, split_records
from gradosr.osr import GradientOSR
from gradosr.preprocess import Preprocessing
from gradosr.streams import SourceInputs, as_model_inputs, zip_labels
from gradosr.train import TrainConfig, train_classifier
from your_data import CLASSES, class_images, image_folder, write_png

METHODS = ["msp", "mahalanobis", "knn", "energy"]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so that tiny data crosses many chunk boundaries."""
    monkeypatch.setattr(imageset, "CHUNK_ROWS", 16)
    return 16


def _folder(tmp_path, n_per_class=12):
    root = image_folder(tmp_path / "imgs", n_per_class=n_per_class)
    # an image of another size and mode, converted bilinearly to the folder's format
    grey = (np.arange(20 * 30) % 251).astype(np.uint8).reshape(20, 30)
    Image.fromarray(grey).save(root / "ant" / "zz_grey.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("image_size", [None, 12])
def test_streamed_folder_images_equal_the_in_memory_ones(tmp_path, workers, image_size, monkeypatch):
    from gradosr.data import indexed

    monkeypatch.setattr(indexed, "WORKER_MIN_ROWS", 0)  # the workers decode even this tiny folder
    root = _folder(tmp_path)
    memory = load_folder(root, image_size=image_size)
    streamed = load_folder(root, image_size=image_size, stream=True, num_workers=workers)
    assert memory[2] == streamed[2]
    for m, s in zip(memory[:2], streamed[:2]):
        assert isinstance(s, FolderImages) and s.shape == m.shape
        np.testing.assert_array_equal(s.labels, m.labels)
        np.testing.assert_array_equal(np.concatenate(list(s.chunks(5))), m.images)
        order = np.random.default_rng(0).permutation(len(m))
        got = np.concatenate(list(s.batches(np.array_split(order, 4))))
        np.testing.assert_array_equal(got, m.images[order])
        before = torch.get_rng_state()
        list(s.batches(np.array_split(order, 3)))
        assert torch.equal(torch.get_rng_state(), before)  # the workers leave the global RNG alone


def test_streamed_cross_protocol_converts_the_unknowns_like_the_in_memory_one(tmp_path):
    known = _folder(tmp_path)
    other = tmp_path / "other"
    for i in range(15):
        write_png(other / f"{i}.png", np.full((9, 11, 1), 17 * i, np.uint8))
    spec = resolve_protocol("cross", known_dataset=f"folder:{known}", unknown_dataset=f"folder:{other}")
    memory, streamed = load_protocol(spec), load_protocol(spec, stream=True, num_workers=0)
    for part in ("known_train", "val", "known_test", "unknown_test"):
        m, s = getattr(memory, part), getattr(streamed, part)
        np.testing.assert_array_equal(s.materialise().images, m.images)
        np.testing.assert_array_equal(s.labels, m.labels)


def test_unreadable_files_are_skipped_at_indexing_and_truncated_ones_stop_the_stream(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", n_per_class=5)
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    good = sorted((root / "cat").glob("*.png"))[0].read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[:len(good) // 2])
    train, test, _ = load_path_dataset(f"folder:{root}", stream=True, num_workers=0)
    assert len(train) + len(test) == 31  # the header-only check keeps the truncated file
    assert "skipped 1 unreadable image file(s)" in capsys.readouterr().err
    whole = FolderImages.concat([train, test])
    with pytest.raises(DataError, match="truncated.png"):
        whole.materialise()
    with pytest.raises(DataError, match="--strict"):
        load_folder(root, stream=True, strict=True)


def _model(k=4, seed=0, double=True):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16, k))
    return model.double() if double else model


def _classifier(k=4, seed=0):
    return Classifier(_model(k, seed), "custom", Preprocessing.default((16, 16), 3), list(range(k)))


def test_chunked_outputs_and_fits_equal_one_shot_in_float64(tmp_path, small_chunks):
    x, y = class_images(10, 0, k=4)
    clf = _classifier()
    source = imageset.ImageSet(x, y)
    whole = classifier_outputs(clf, clf.inputs(x))
    parts = [classifier_outputs(clf, xb) for xb, _ in zip_labels(SourceInputs(source, clf.inputs), y)]
    assert len(parts) == 3
    chunked = ScorerInputs.concat(parts)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-10, atol=0)
    torch.testing.assert_close(chunked.features, whole.features, rtol=1e-10, atol=0)
    d64 = ScorerInputs(whole.logits.double(), whole.features.double(), head_weight=whole.head_weight.double(),
                       head_bias=whole.head_bias.double())
    chunks = [(d64.rows(slice(s, s + 16)), y[s:s + 16]) for s in range(0, len(y), 16)]
    for method in ("mahalanobis", "rmds", "vim", "knn"):
        one = make_scorer(method).fit(d64, y).score_samples(d64)
        many = make_scorer(method).fit(iter(chunks)).score_samples(d64)
        np.testing.assert_allclose(many, one, rtol=1e-10, atol=1e-12, err_msg=method)


def _trained(tmp_path, stream, rows=None):
    root = image_folder(tmp_path / "imgs", n_per_class=25)
    spec = resolve_protocol("custom", dataset=f"folder:{root}", known="0-3", unknown="4,5")
    data = load_protocol(spec, stream=stream, num_workers=0)
    cfg = TrainConfig(model="custom", epochs=2, batch_size=16, image_size=16)
    clf = train_classifier(data.known_train, data.val, list(spec.known), cfg, Preprocessing.default((16, 16), 3),
                           progress=False, log=lambda _: None, model=_model(double=False))
    return data, clf


def test_streamed_evaluation_equals_the_in_memory_one(tmp_path, small_chunks):
    """Training from the stream, chunked baseline fits and scores, and the plus preset:
    the numbers of the in-memory path (AUROC to 1e-6, scores to float32 rounding)."""
    results = {}
    for stream in (False, True):
        data, clf = _trained(tmp_path, stream)
        osr = GradientOSR("plus", classifier=clf, extraction__batch_size=8, fusion__k=5).fit(data)
        y, closed, scores = score_split(clf, data, METHODS + ["plus"], osr)
        results[stream] = (y, closed, scores, split_records(data.spec, y, closed, scores))
    (ym, cm, sm, rm), (ys, cs, ss, rs) = results[False], results[True]
    np.testing.assert_array_equal(ys, ym)
    np.testing.assert_array_equal(cs, cm)
    for m in METHODS + ["plus"]:
        np.testing.assert_allclose(ss[m].test, sm[m].test, rtol=1e-5, atol=1e-6, err_msg=m)
        np.testing.assert_allclose(ss[m].val, sm[m].val, rtol=1e-5, atol=1e-6, err_msg=m)
    for a, b in zip(rm, rs):
        assert abs(a["auroc"] - b["auroc"]) <= 1e-6, a["method"]


def test_no_stage_reads_all_images_at_once(tmp_path, small_chunks, monkeypatch):
    """Memory bound without timing: the largest number of images preprocessed at once
    (training, evaluation, the plus preset's fit and scores) is a chunk or a batch."""
    seen = []
    original = Preprocessing.__call__

    def counted(self, images):
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(Preprocessing, "__call__", counted)
    data, clf = _trained(tmp_path, stream=True)
    osr = GradientOSR("plus", classifier=clf, extraction__batch_size=8, fusion__k=5).fit(data)
    score_split(clf, data, METHODS + ["plus"], osr)
    n = len(data.known_train) + len(data.known_test) + len(data.unknown_test)
    assert max(seen) <= 16 < len(data.known_train) and sum(seen) > 2 * n


class _Images(Dataset):
    """(uint8 H×W×C image, label) items."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("preset", ["plus", "paper"])
def test_datasets_and_dataloaders_are_accepted_wherever_arrays_are(preset, small_chunks):
    x, y = class_images(30, 1, k=4)
    xt, yt = class_images(10, 2, k=len(CLASSES))
    clf = _classifier()
    opts = dict(extraction__batch_size=8) if preset == "plus" else dict(
        extraction__batch_size=8, detector__max_epochs=2, proxy_unknown=1)
    tc = TrainConfig(model="custom", epochs=1, batch_size=16)

    def fitted(data, labels=None):
        return GradientOSR.from_classifier(clf.model, clf.preprocessing, preset=preset, train_config=tc,
                                           **opts).fit(data, labels)

    by_array = fitted(x, y)
    want = by_array.score_samples(xt)
    for data in (_Images(x, y), DataLoader(_Images(x, y), batch_size=7)):
        osr = fitted(data)
        np.testing.assert_allclose(osr.score_samples(xt), want, rtol=1e-6, atol=1e-9)
        assert osr.threshold_ == pytest.approx(by_array.threshold_, rel=1e-6, abs=1e-9)
    for data in (TensorDataset(torch.as_tensor(xt)), DataLoader(_Images(xt, yt), batch_size=5),
                 as_model_inputs(xt, clf.inputs)):
        np.testing.assert_allclose(by_array.score_samples(data), want, rtol=1e-6, atol=1e-9)
        labels, scores = by_array.predict(data, return_scores=True)
        np.testing.assert_array_equal(labels, by_array.predict(xt))


def test_dataset_without_labels_needs_y():
    clf = _classifier()
    x, y = class_images(10, 1, k=4)
    with pytest.raises(Exception, match="labels"):
        GradientOSR.from_classifier(clf.model, clf.preprocessing).fit(TensorDataset(torch.as_tensor(x)))
    osr = GradientOSR.from_classifier(clf.model, clf.preprocessing, extraction__batch_size=8).fit(
        TensorDataset(torch.as_tensor(x)), y)
    assert len(osr.score_samples(x)) == len(x)


def test_mnist_sample_split0_streamed_agrees_with_in_memory(tmp_path, small_chunks):
    """A small case of mnist-sample split 0 (its known/unknown classes, 12 images per
    class written as PNGs): msp, mahalanobis and plus AUROC streamed = in memory to 1e-6."""
    from gradosr.data.registry import load_dataset

    try:
        train, _ = load_dataset("mnist-sample")
    except DataError as exc:
        pytest.skip(str(exc))
    base = resolve_protocol("mnist-sample", split=0)
    root = tmp_path / "mnist"
    for c in range(10):
        for i in np.flatnonzero(train.labels == c)[:12]:
            write_png(root / f"{c}" / f"{i:05d}.png", train.images[i])
    known = ",".join(map(str, base.known))
    spec = resolve_protocol("custom", dataset=f"folder:{root}", known=known,
                            unknown=",".join(map(str, base.unknown)))
    aurocs = {}
    for stream in (False, True):
        data = load_protocol(spec, stream=stream, num_workers=0)
        cfg = TrainConfig(model="lenet", epochs=1, batch_size=32)
        clf = train_classifier(data.known_train, data.val, list(spec.known), cfg, Preprocessing.default((28, 28), 1),
                               progress=False, log=lambda _: None)
        osr = GradientOSR("plus", classifier=clf, extraction__batch_size=8, fusion__k=5).fit(data)
        y, closed, scores = score_split(clf, data, ["msp", "mahalanobis", "plus"], osr)
        aurocs[stream] = {r["method"]: r["auroc"] for r in split_records(spec, y, closed, scores)}
    for m, a in aurocs[False].items():
        assert abs(a - aurocs[True][m]) <= 1e-6, m
