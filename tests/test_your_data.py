"""Bring your own data, model and outliers (issue 18): image folders and .npz archives by
path, synthetic outlier sets, random splits in benchmarks, a user's model factory and
trained weights, and predictions on folders. Expectations are independent: images read
back with Pillow and converted by the NumPy transcription in image_reference.py, class
ids from sorted folder names, statistics of each synthetic generator's definition."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from torch import nn

from gradosr.cli import main
from gradosr.data.by_path import canonical_name
from gradosr.data.folders import TEST_FRACTION, load_folder
from gradosr.data.arrays import load_npz
from gradosr.data.protocols import load_protocol, resolve_protocol
from gradosr.data.registry import dataset_info
from gradosr.data.synthetic import GENERATORS, generate
from gradosr.models import find_head_name, set_head
from gradosr.osr import GradientOSR
from image_reference import bilinear, luma
from your_data import CLASSES, class_images, factory_module, image_folder, npz_archive, write_png


def run_cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    return out


# ------------------------------------------------------------------ folders


def test_folder_classes_sorted_and_stratified_test_split(tmp_path):
    root = image_folder(tmp_path / "imgs", n_per_class=10)
    train, test, names = load_folder(root)
    assert names == tuple(sorted(CLASSES))
    x, y = class_images(10, 0)
    # every image comes back once, with the label of its (sorted) folder
    assert len(train) + len(test) == len(y)
    assert np.bincount(test.labels).tolist() == [round(TEST_FRACTION * 10)] * 6
    by_bytes = {img.tobytes(): label for img, label in zip(x, y)}
    for part in (train, test):
        assert [by_bytes[img.tobytes()] for img in part.images] == part.labels.tolist()
    again = load_folder(root)
    assert np.array_equal(again[1].images, test.images)  # seeded: the same split every time


def test_folder_train_test_subroots(tmp_path):
    root = image_folder(tmp_path / "imgs", n_per_class=10, split=True)
    train, test, names = load_folder(root)
    n_test = sum(1 for _ in (root / "test").rglob("*.png"))
    assert len(test) == n_test and len(train) == 60 - n_test and names == CLASSES


def test_mixed_sizes_and_channels_are_converted_to_the_first_image(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "mixed"
    first = rng.integers(0, 256, (12, 10), dtype=np.uint8)  # a grey 12×10 image, first in sorted order
    rgb = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(first).save(root / "a" / "0.png")
    Image.fromarray(rgb).save(root / "b" / "1.png")
    Image.fromarray(rgba, "RGBA").save(root / "b" / "2.png")
    Image.fromarray(first).save(root / "a" / "3.bmp")
    train, test, _ = load_folder(root)
    everything = np.concatenate([train.images, test.images])
    assert everything.shape == (4, 12, 10, 1)
    grey_rgb = np.rint(np.clip(bilinear(luma(rgb[None])[0], 12, 10), 0, 1) * 255)
    grey_rgba = np.rint(luma(rgba[None])[0] * 255)
    got = [img[..., 0].astype(float) for img in everything]
    for want in (first.astype(float), grey_rgb, grey_rgba):
        assert min(np.abs(g - want).max() for g in got) <= 1.0


def test_image_size_option_resizes_every_image(tmp_path):
    root = image_folder(tmp_path / "imgs", n_per_class=5)
    train, _, _ = load_folder(root, image_size=8)
    assert train.images.shape[1:] == (8, 8, 3)
    one = np.asarray(Image.open(sorted((root / "ant").glob("*.png"))[0]))
    want = np.stack([bilinear(one[..., c] / 255.0, 8, 8) for c in range(3)], -1)
    got = min(np.abs(img / 255.0 - want).max() for img in train.images[train.labels == 0])
    assert got <= 1 / 255 + 1e-9


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    root = image_folder(tmp_path / "imgs", n_per_class=5)
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("ignored: no image suffix")
    train, test, _ = load_folder(root)
    assert len(train) + len(test) == 30
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s)" in err and "--strict" in err


def test_unlabeled_folder_is_unknowns_only(tmp_path):
    root = tmp_path / "outliers"
    for i in range(7):
        write_png(root / f"{i}.png", np.full((16, 16, 3), i * 30, np.uint8))
    train, test, names = load_folder(root)
    assert len(train) == 0 and len(test) == 7 and names == () and set(test.labels) == {-1}
    assert not dataset_info(f"folder:{root}").labelled


# ------------------------------------------------------------------ arrays


def test_npz_layouts_and_conversions(tmp_path):
    x, y = class_images(10, 1)
    path = npz_archive(tmp_path / "a.npz", n_per_class=10, seed=1)
    train, test, names = load_npz(path)
    assert len(train) + len(test) == 60 and names == tuple(str(c) for c in range(6))
    # floats in [0, 1] are scaled by 255 and rounded; N×H×W becomes N×H×W×1; float labels that are integers pass
    xf = x[:, :, :, 0] / 255.0
    np.savez(tmp_path / "f.npz", x_train=xf, y_train=y.astype(np.float32), x_test=xf[:6], y_test=y[:6],
             class_names=np.array(CLASSES))
    train, test, names = load_npz(tmp_path / "f.npz")
    assert train.images.shape == (60, 16, 16, 1) and np.array_equal(train.images[..., 0], x[..., 0])
    assert names == CLASSES and train.labels.dtype == np.int64
    # 4 channels: alpha dropped; int16 in 0..255 accepted
    x4 = np.concatenate([x, np.full((*x.shape[:3], 1), 7, np.uint8)], -1).astype(np.int16)
    np.savez(tmp_path / "c.npz", x=x4, y=y)
    train, test, _ = load_npz(tmp_path / "c.npz")
    assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
    # x alone: unknowns only
    np.savez(tmp_path / "u.npz", x=x)
    train, test, names = load_npz(tmp_path / "u.npz")
    assert len(train) == 0 and len(test) == 60 and names == ()


def test_dataset_names_resolve_to_absolute_paths(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "imgs", n_per_class=7)
    monkeypatch.chdir(tmp_path)
    assert canonical_name("imgs") == canonical_name("folder:imgs") == f"folder:{root.resolve()}"
    assert canonical_name("mnist-sample-like") is None
    (tmp_path / "mnist-sample").mkdir()
    spec = resolve_protocol("mnist-sample")  # a registered name wins over a folder of that name
    assert spec.dataset == "mnist-sample"
    spec = resolve_protocol("custom", dataset="imgs", known="0-3", unknown="4,5")
    assert spec.dataset == f"folder:{root.resolve()}"
    data = load_protocol(spec)
    assert data.class_names == CLASSES[:4] and data.num_known == 4


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def like():
    return np.random.default_rng(0).integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)


def test_synthetic_sets_follow_their_definitions(like):
    for name in GENERATORS:
        a, b = generate(f"synthetic-{name}", like, 0), generate(f"synthetic-{name}", like, 0)
        assert a.shape == like.shape and a.dtype == np.uint8 and np.array_equal(a, b)
        assert not np.array_equal(a, generate(f"synthetic-{name}", like, 1))
    g = generate("synthetic-gaussian", like, 0).astype(float)
    # N(0.5, 1) clipped to [0, 1]: P(x <= 0) = P(x >= 1) = Φ(-0.5)
    assert abs((g == 0).mean() - norm.cdf(-0.5)) < 0.01 and abs((g == 255).mean() - norm.cdf(-0.5)) < 0.01
    u = generate("synthetic-uniform", like, 0).astype(float) / 255
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    r = generate("synthetic-rademacher", like, 0)
    assert set(np.unique(r)) == {0, 255} and abs((r == 255).mean() - 0.5) < 0.01
    p = generate("synthetic-permuted", like, 0)
    for i in range(5):  # the same pixels (as C-vectors), in another order
        src, out = like[i].reshape(-1, 3), p[i].reshape(-1, 3)
        assert sorted(map(tuple, src)) == sorted(map(tuple, out)) and not np.array_equal(src, out)
    blobs = generate("synthetic-blobs", like, 0).astype(float) / 255
    assert blobs.min() == 0 and ((blobs > 0) & (blobs < 0.75 - 1 / 255)).sum() == 0  # below 0.75 is set to 0
    s = generate("synthetic-smooth", like, 0)
    assert (s.reshape(len(s), -1).min(1) == 0).all() and (s.reshape(len(s), -1).max(1) == 255).all()


def test_cross_protocol_against_a_synthetic_set(tmp_path):
    root = image_folder(tmp_path / "imgs", n_per_class=10)
    spec = resolve_protocol("cross", known_dataset=str(root), unknown_dataset="synthetic-blobs", split=3)
    data = load_protocol(spec)
    assert len(data.unknown_test) == len(data.known_test)
    assert data.unknown_test.images.shape[1:] == data.known_test.images.shape[1:]
    assert np.array_equal(data.unknown_test.images, generate("synthetic-blobs", data.known_test.images, 3))


def test_cross_protocol_unknowns_converted_to_the_known_format(tmp_path):
    root = image_folder(tmp_path / "imgs", n_per_class=10)
    outliers = tmp_path / "out"
    for i in range(30):
        write_png(outliers / f"{i}.png", np.full((24, 24, 1), 8 * i, np.uint8))
    data = load_protocol(resolve_protocol("cross", known_dataset=str(root), unknown_dataset=str(outliers)))
    assert data.unknown_test.images.shape[1:] == (16, 16, 3) and len(data.unknown_test) == len(data.known_test)
    img = data.unknown_test.images[0]
    assert (img == img[0, 0, 0]).all()  # a flat grey image stays flat, repeated over RGB


def test_datasets_command_lists_synthetic_sets(capsys):
    out = run_cli(capsys, "datasets")
    for name in GENERATORS:
        assert f"synthetic-{name}" in out
    assert "folder:PATH" in out and "npz:PATH" in out


# -------------------------------------------------------------------- heads


class TorchvisionLike(nn.Module):
    """ResNet-style: `fc` is the head, but an auxiliary Linear is registered after it."""

    def __init__(self, k=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, k)
        self.aux = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


class TimmLike(nn.Module):
    """timm-style: `head` is a module holding a norm and `fc`."""

    def __init__(self, k=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential()
        self.head.add_module("norm", nn.LayerNorm(4))
        self.head.add_module("fc", nn.Linear(4, k))

    def forward(self, x):
        return self.head(self.stem(x))


def test_heads_of_look_alike_architectures():
    vgg = nn.Module()
    vgg.features = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    vgg.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 5))
    effnet = nn.Module()
    effnet.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8, 5))
    effnet.extra = nn.Linear(3, 3)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5))
    pretrained = nn.Module()
    pretrained.last_linear = nn.Linear(8, 5)
    pretrained.later = nn.Linear(2, 2)
    assert find_head_name(TorchvisionLike()) == "fc"
    assert find_head_name(TimmLike()) == "head.fc"
    assert find_head_name(vgg) == "classifier.3"
    assert find_head_name(effnet) == "classifier.1"
    assert find_head_name(seq) == "3"
    assert find_head_name(pretrained) == "last_linear"


def test_set_head_names_the_layer_whose_input_is_the_feature():
    from gradosr.classifier import batched_outputs

    model = TorchvisionLike()
    set_head(model, "fc")
    x = torch.randn(4, 3, 6, 6)
    logits, feats = batched_outputs(model, x, features=True)
    with torch.no_grad():
        want = model.pool(model.conv(x)).flatten(1)
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(logits, model(x))


# ------------------------------------------------------ the whole CLI, your data


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    return factory_module(tmp_path / "src", monkeypatch) + ":make"


TRAIN_ARGS = ("--epochs", "6", "--optimizer", "adam", "--lr", "0.01", "--batch-size", "16", "--no-progress")


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_cli_on_your_data_and_your_model(tmp_path, capsys, user_model, kind):
    """train, fit, evaluate, benchmark --methods all and predict on an image folder and an
    .npz of 6 classes, with a user model given as module:factory whose head is inside
    `classifier`."""
    source = (f"folder:{image_folder(tmp_path / 'imgs')}" if kind == "folder"
              else f"npz:{npz_archive(tmp_path / 'arr.npz')}")
    proto = ("--protocol", "custom", "--dataset", source, "--known", "0-3", "--unknown", "4,5")
    model = ("--model", user_model)
    run = tmp_path / "run"
    out = run_cli(capsys, "train", *proto, *model, *TRAIN_ARGS, "--out", run)
    assert "closed-set test accuracy" in out
    meta = json.loads((run / "classifier" / "model.json").read_text())
    assert meta["arch"] == user_model and meta["protocol"]["dataset"] == source.replace(
        source.split(":", 1)[1], str(Path(source.split(":", 1)[1]).resolve()))
    run_cli(capsys, "fit", *proto, *model, *TRAIN_ARGS, "--out", run)
    assert (run / "osr.json").is_file()
    run_cli(capsys, "evaluate", run, *model, "--methods", "all", "--no-progress")
    records = json.loads((run / "eval.json").read_text())["results"]
    assert {"plus", "msp", "knn", "mahalanobis"} <= {r["method"] for r in records}
    bench = tmp_path / "bench"
    run_cli(capsys, "benchmark", *proto, *model, *TRAIN_ARGS, "--splits", "0", "--methods", "all", "--out", bench)
    doc = json.loads((bench / "results.json").read_text())
    from gradosr.detectors.registry import method_ids

    assert {r["method"] for r in doc["results"]} == set(method_ids("preset") + method_ids("baseline"))
    # predict: the unknown classes' images, answered like GradientOSR.predict on the same images
    images = tmp_path / "to_label"
    x, y = class_images(3, seed=9)
    for i, img in enumerate(x):
        write_png(images / ("nested" if i % 2 else "") / f"{i:02d}.png", img)
    out = run_cli(capsys, "predict", run, images, *model, "--output", tmp_path / "pred.csv", "--no-progress")
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == len(x) and set(rows[0]) == {"path", "label", "class_name", "score", "threshold",
                                                      "accepted", "error"}
    osr = GradientOSR.load(run, model_ref=user_model)
    files = [Path(r["path"]) for r in rows]
    arrays = np.concatenate([np.asarray(Image.open(f))[None] for f in files])
    labels, scores = osr.predict(arrays, return_scores=True)
    np.testing.assert_allclose([float(r["score"]) for r in rows], scores, rtol=1e-6)
    names = [osr.classifier_.class_names[c] if c >= 0 else "unknown" for c in labels]
    assert [r["class_name"] for r in rows] == names
    assert [r["accepted"] == "True" for r in rows] == (labels >= 0).tolist()
    if kind == "folder":
        assert set(names) - {"unknown"} <= set(CLASSES[:4])  # class names come from the folders
    assert len([ln for ln in out.splitlines() if "\t" in ln]) == len(x)


def test_cli_with_trained_weights(tmp_path, capsys, user_model):
    """--weights: an already-trained classifier (a safetensors file) is used, recorded by
    sha256, and checked again by evaluate and predict."""
    from safetensors.torch import save_file

    from gradosr.models import build_model

    src = image_folder(tmp_path / "imgs")
    proto = ("--protocol", "custom", "--dataset", src, "--known", "0-3", "--unknown", "4,5")
    torch.manual_seed(0)
    model = build_model(user_model, 4, 3)
    weights = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    run_cli(capsys, "fit", *proto, "--model", user_model, "--weights", weights, "--out", run, "--no-progress")
    meta = json.loads((run / "classifier" / "model.json").read_text())
    import hashlib

    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    osr = GradientOSR.load(run, model_ref=user_model)
    for name, value in model.state_dict().items():  # the weights as given, not trained further
        torch.testing.assert_close(osr.classifier_.model.state_dict()[name], value)
    run_cli(capsys, "evaluate", run, "--model", user_model, "--weights", weights, "--no-progress")
    run_cli(capsys, "predict", run, src / "ant", "--model", user_model, "--weights", weights, "--no-progress")


def test_predict_writes_jsonl_and_reports_unreadable_files(tmp_path, capsys):
    from tiny_runs import build_run, quadrant_images

    run = tmp_path / "run"
    build_run(run)
    folder = tmp_path / "imgs"
    imgs = quadrant_images(2, seed=5)
    for i, img in enumerate(imgs.images):
        write_png(folder / "a" / "b" / f"{i}.png", img)
    (folder / "bad.png").write_bytes(b"nope")
    code = main(["predict", str(run), str(folder), "--output", str(tmp_path / "p.jsonl"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1 and f"{folder / 'bad.png'}\terror" in out
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len(imgs) + 1 and rows[-1]["error"] and rows[0]["threshold"] == pytest.approx(
        GradientOSR.load(run).threshold_)


def test_benchmark_split_seeds_are_random_class_splits(tmp_path, capsys):
    out = tmp_path / "b"
    run_cli(capsys, "benchmark", "--protocol", "mnist-sample", "--split-seeds", "1001,2002", "--methods", "msp",
            "--epochs", "1", "--no-progress", "--out", out)
    doc = json.loads((out / "results.json").read_text())
    for split in doc["splits"]:
        want = resolve_protocol("mnist-sample", split_seed=split["split"])
        assert tuple(split["protocol"]["known"]) == want.known
    assert sorted({r["split"] for r in doc["results"]}) == [1001, 2002]
    assert (out / "runs" / "seed1001" / "classifier" / "model.json").is_file()


@pytest.mark.parametrize("command", ["benchmark", "ablate"])
def test_help_offers_no_refused_option(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--split-seeds" in text and "--splits" in text
    assert "--split " not in text and "--split-seed " not in text and "--split SPLIT" not in text


def test_a_method_that_cannot_fit_is_left_out_and_said(capsys):
    """On a classifier that gets no training sample of a class right, OpenMax has nothing
    to fit: with ``skipped`` it is left out (reason kept and printed), the others scored."""
    from gradosr.data.imageset import ImageSet
    from gradosr.data.protocols import OSRData
    from gradosr.errors import DataError
    from gradosr.evaluation.scoring import score_split
    from tiny_runs import TRAIN, VAL, build_run

    osr = build_run(None)
    spec = resolve_protocol("custom", dataset="mnist-sample", known="0-3", unknown="4")
    wrong = ImageSet(TRAIN.images, (osr.classifier_.logits(TRAIN.images).argmax(1).numpy() + 1) % 4)
    data = OSRData(spec, wrong, VAL, VAL, ImageSet(VAL.images[:5], np.full(5, 4)), ("0", "1", "2", "3"))
    skipped: dict = {}
    _, _, scores = score_split(osr.classifier_, data, ["msp", "openmax"], skipped=skipped)
    assert list(scores) == ["msp"] and "correctly classified" in skipped["openmax"]
    assert "openmax left out" in capsys.readouterr().err
    with pytest.raises(DataError, match="correctly classified"):
        score_split(osr.classifier_, data, ["msp", "openmax"])


def test_unknown_sets_of_a_split_share_the_fitted_baselines(tmp_path, capsys, monkeypatch):
    """Several synthetic sets on one classifier: each baseline is fitted once per split,
    and each set's scores equal those of a benchmark of that set alone."""
    from gradosr.detectors import KNN

    fits = []
    real = KNN._finalize  # once per fit, one-shot or chunked
    monkeypatch.setattr(KNN, "_finalize", lambda self: (fits.append(1), real(self))[1])
    common = ("benchmark", "--protocol", "cross", "--known-dataset", "mnist-sample", "--splits", "0", "--methods",
              "msp,knn", "--epochs", "1", "--no-progress")
    run_cli(capsys, *common, "--unknown-dataset", "synthetic-blobs,synthetic-uniform", "--out", tmp_path / "both")
    assert len(fits) == 1
    run_cli(capsys, *common, "--unknown-dataset", "synthetic-uniform", "--out", tmp_path / "one")
    both = json.loads((tmp_path / "both" / "synthetic-uniform" / "results.json").read_text())["results"]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"]
    assert [r["auroc"] for r in both] == [r["auroc"] for r in one]
