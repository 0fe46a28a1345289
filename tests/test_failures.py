"""A catalogue of bad inputs (issue 8): each gets the project's exception type (or, via
the CLI, exit status 2 and exactly one line ``gradosr: error: …`` on stderr, no
traceback), a message naming the problem, no partial output (no new file, no *.tmp),
and no change to the files already there (bytes and mtimes compared).

Cases (ids in brackets; some are also covered elsewhere, e.g. test_data.py,
test_readers.py, test_checkpoint.py, test_cli.py, test_osr.py):

 1 [missing-dataset]      missing dataset files (API and CLI)
 2 [truncated-gz]         truncated .gz IDX file
 3 [idx-magic]            wrong IDX magic number
 4 [idx-dims]             wrong IDX dimensions (2-D images)
 5 [idx-count]            images and labels of different lengths
 6 [cifar-malformed]      malformed (truncated) CIFAR pickle
 7 [cifar-payload]        CIFAR pickle with a code-executing payload (2 payloads): refused, marker never created
 8 [svhn-keys]            SVHN .mat without the y variable
 9 [svhn-crash]           SVHN .mat on which scipy's reader segfaults: a DataError, the process survives
10 [tiny-annotations]     TinyImageNet without val/val_annotations.txt
11 [empty-class]          a known class without images (protocol and fit on arrays)
12 [overlap]              overlapping known/unknown classes (API and CLI)
13 [class-range]          out-of-range class ids
14 [few-known]            fewer than 2 known classes; 2 known classes for GradientOSR (needs 3)
15 [resize]               images of another size/channel count are converted like the Preprocessing rules say
16 [unconvertible]        inputs that cannot be converted (8 shapes/dtypes)
17 [nan-inf]              NaN / Inf inputs (and finite float64 that overflow float32)
18 [empty-batch]          an empty batch gives empty results; metrics of empty inputs fail cleanly
19 [predict-corrupt]      corrupt / truncated / missing images in `gradosr predict`: reported per file, the others answered
20 [arch-mismatch]        checkpoint whose architecture does not match its weights
21 [classes-mismatch]     checkpoint whose class count does not match its weights
22 [sha256]               weights whose sha256 does not match (classifier and detector)
23 [pickle]               a torch.save .pt handed as a checkpoint / run / weights file: refused ("pickle")
24 [n-ones]               confounding n = 1; n larger than the proxy classifier's outputs
25 [no-head]              a model with no nn.Linear head
26 [newer-version]        run written by a newer format version (osr.json, model.json, detector.json)
27 [bad-json]             corrupt model.json
28 [other-proxy]          fitting into a run folder that holds another proxy classifier
29 [out-is-file]          --out naming a file
30 [metrics]              metrics on NaN scores, length mismatch, one-class inputs
31 [empty-class-folder]   an image folder with an empty class folder
32 [no-images]            a folder with no images (and a folder holding class folders beside loose images)
33 [npz-key]              an .npz without a key it needs
34 [npz-labels]           non-integer, negative or out-of-range labels (a class without training images)
35 [npz-unconvertible]    arrays that are not images (5-D, 2 channels, floats outside [0, 1], NaN, strings)
36 [strict]               an unreadable image file under --strict
37 [weights-pickle]       --weights naming a .pt/.pth pickle, or a torch.save file renamed .safetensors (refused with how to convert), or a missing file
38 [user-model]           --model that cannot be imported or called, a head that cannot be found, a bad --head
39 [model-again]          evaluate/predict of a user-model run without --model, or with another one
40 [weights-mismatch]     evaluate/predict with --weights other than the run's
41 [unlabeled-known]      an unlabeled folder or a synthetic set as the known data
42 [one-split-weights]    benchmark --weights over more than one split; --splits with --split-seeds
43 [predict-output]       predict --output with a suffix other than .csv/.jsonl
44 [too-few-images]       too few known training images for the stratified validation split
"""

from __future__ import annotations

import gzip
import json
import pathlib
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import gradosr.metrics as M
from gradosr.classifier import Classifier
from gradosr.cli import main
from gradosr.data.protocols import load_protocol, resolve_protocol
from gradosr.data.registry import load_dataset
from gradosr.errors import CheckpointError, ConfigError, DataError, GradOSRError
from gradosr.images import read_image
from gradosr.osr import GradientOSR
from gradosr.train import TrainConfig
from idx_files import idx_bytes, write_idx
from image_reference import bilinear, luma
from tiny_runs import PRE, TRAIN, TRAIN_CONFIG, VAL, K, build_run, crashing_mat, snapshot


# ----------------------------------------------------------------------- helpers


@contextmanager
def fails(exc_type: type[GradOSRError], phrase: str, *folders: Path):
    """The block raises ``exc_type`` (a GradOSRError) whose one-line message contains
    ``phrase`` (a regular expression), and leaves ``folders`` exactly as they were."""
    assert issubclass(exc_type, GradOSRError)
    before = [snapshot(f) for f in folders]
    with pytest.raises(exc_type) as info:
        yield info
    msg = str(info.value)
    assert re.search(phrase, msg), msg
    assert "\n" not in msg, msg
    for folder, snap in zip(folders, before):
        assert snapshot(folder) == snap, f"{folder} changed"


def cli_fails(capsys, phrase: str, folders: list[Path], *argv) -> None:
    """``gradosr argv`` exits with 2 and one line ``gradosr: error: …phrase…`` on stderr,
    no traceback, and leaves ``folders`` exactly as they were."""
    before = [snapshot(f) for f in folders]
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradosr: error: "), err
    assert re.search(phrase, lines[0]), lines[0]
    assert "Traceback" not in out + err
    for folder, snap in zip(folders, before):
        assert snapshot(folder) == snap, f"{folder} changed"


@pytest.fixture(scope="module")
def built_run(tmp_path_factory) -> Path:
    """A fitted tiny run folder (never modified: tests work on copies)."""
    run = tmp_path_factory.mktemp("built") / "run"
    build_run(run)
    return run


@pytest.fixture
def run(built_run, tmp_path) -> Path:
    """A fresh copy of the fitted run."""
    return Path(shutil.copytree(built_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def osr(built_run) -> GradientOSR:
    return GradientOSR.load(built_run)


def edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def mnist_files(folder: Path, train_labels: np.ndarray, test_labels: np.ndarray, gz: bool = True) -> None:
    """The four MNIST IDX files with random images for the given labels."""
    rng = np.random.default_rng(0)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        labels = np.asarray(labels, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)


ALL_LABELS = np.repeat(np.arange(10, dtype=np.uint8), 3)


# ---------------------------------------------------------------- 1-9: dataset files


def test_missing_dataset_files(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    with fails(DataError, r"missing train-images-idx3-ubyte.*Download the four MNIST", tmp_path):
        load_dataset("mnist", data_dir=data)
    cli_fails(capsys, "missing train-images-idx3-ubyte", [tmp_path], "train", "--protocol", "mnist",
              "--data-dir", data, "--out", tmp_path / "out", "--no-progress")
    assert not (tmp_path / "out").exists()


def test_truncated_gz(tmp_path):
    mnist_files(tmp_path / "mnist", ALL_LABELS, ALL_LABELS)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with fails(DataError, r"train-images-idx3-ubyte.gz is not a valid gzip file \(truncated", tmp_path):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_idx_magic(tmp_path):
    mnist_files(tmp_path / "mnist", ALL_LABELS, ALL_LABELS, gz=False)
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    with fails(DataError, r"t10k-labels-idx1-ubyte is not an IDX file \(bad magic number\)", tmp_path):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_idx_dimensions(tmp_path):
    mnist_files(tmp_path / "mnist", ALL_LABELS, ALL_LABELS)
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte", np.zeros((30, 784), np.uint8))  # flat, 2-D
    with fails(DataError, r"must hold uint8 images N×H×W, got uint8 \(30, 784\)", tmp_path):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_count_mismatch(tmp_path):
    mnist_files(tmp_path / "mnist", ALL_LABELS, ALL_LABELS)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", ALL_LABELS[:-1])
    with fails(DataError, r"has 30 images but .* has 29 labels", tmp_path):
        load_dataset("mnist", data_dir=tmp_path)


def cifar10_folder(root: Path) -> Path:
    """A small valid cifar-10-batches-py/ (Python 3 pickles with str keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def test_malformed_cifar_pickle(tmp_path):
    folder = cifar10_folder(tmp_path)
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:-50])
    with fails(DataError, r"data_batch_2 is not a valid pickle file \(truncated or corrupt", tmp_path):
        load_dataset("cifar10", data_dir=tmp_path)


class TouchPayload:
    """Unpickling it calls pathlib.Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class ExecPayload:
    """Unpickling it runs Python source that creates the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload, refused", [(TouchPayload, "pathlib"), (ExecPayload, "builtins.exec")])
def test_cifar_pickle_payload_is_never_run(tmp_path, payload, refused):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(payload(control)))  # the payload is live: plain pickle runs it
    assert control.exists()
    control.unlink()

    marker = tmp_path / "pwned"
    folder = cifar10_folder(tmp_path / "data")
    (folder / "test_batch").write_bytes(pickle.dumps(
        {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": payload(marker)}, protocol=4))
    with fails(DataError, rf"refused to unpickle {refused}.*only plain data and numpy arrays", tmp_path):
        load_dataset("cifar10", data_dir=tmp_path / "data")
    assert not marker.exists()


def test_svhn_mat_missing_keys(tmp_path):
    from scipy.io import savemat

    folder = tmp_path / "svhn"
    folder.mkdir()
    x = np.zeros((32, 32, 3, 2), np.uint8)
    savemat(folder / "train_32x32.mat", {"X": x, "y": np.array([[1], [10]], np.uint8)})
    savemat(folder / "test_32x32.mat", {"X": x})
    with fails(DataError, r"test_32x32.mat lacks the variable\(s\) \['y'\]", tmp_path):
        load_dataset("svhn", data_dir=tmp_path)


def test_svhn_mat_that_crashes_scipy(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    (folder / "train_32x32.mat").write_bytes(crashing_mat())  # scipy.io.loadmat segfaults on it in-process
    with fails(DataError, r"train_32x32.mat is not a readable MATLAB .mat file \(the reader crashed", tmp_path):
        load_dataset("svhn", data_dir=tmp_path)


def test_tiny_imagenet_missing_annotations(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        (folder / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG")
    (folder / "wnids.txt").write_text("n01\nn02\n")
    (folder / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "val" / "images" / "val_0.JPEG")
    with fails(DataError, r"missing .*val_annotations.txt: it gives the classes", tmp_path):
        load_dataset("tiny-imagenet", data_dir=tmp_path)


# --------------------------------------------------------------- 10-13: class lists


def test_empty_known_class(tmp_path, osr):
    train_labels = ALL_LABELS[ALL_LABELS != 2]  # no training image of digit 2
    mnist_files(tmp_path / "mnist", train_labels, ALL_LABELS)
    spec = resolve_protocol("custom", dataset="mnist", known="0,1,2", unknown="3")
    with fails(DataError, r"mnist train: classes \[2\] have no images", tmp_path):
        load_protocol(spec, tmp_path)
    # fitting on arrays without any sample of a known class: nothing trained or written
    keep = TRAIN.labels != 3
    fresh = GradientOSR("paper", classifier=osr.classifier_, train_config=TRAIN_CONFIG, max_epochs=5)
    with fails(DataError, r"known classes \[3\] have no training samples", tmp_path):
        fresh.fit(TRAIN.images[keep], TRAIN.labels[keep], VAL.images, VAL.labels, run_dir=tmp_path / "new-run")
    assert not (tmp_path / "new-run").exists()


def test_overlapping_known_unknown(tmp_path, capsys):
    with fails(ConfigError, r"classes \[2\] are both known and unknown"):
        resolve_protocol("custom", dataset="mnist-sample", known="0,1,2", unknown="2,3")
    cli_fails(capsys, r"classes \[2\] are both known and unknown", [tmp_path], "fit", "--protocol", "custom",
              "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "2,3", "--out", tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("known, unknown, phrase", [
    ("0,1,10", "3", r"known class ids \[10\] are out of range 0..9"),
    ("0,1,2", "-1", r"unknown class ids \[-1\] are out of range 0..9"),
])
def test_out_of_range_class_ids(known, unknown, phrase):
    with fails(ConfigError, phrase):
        resolve_protocol("custom", dataset="mnist-sample", known=known, unknown=unknown)


def test_fewer_than_two_known_classes(tmp_path):
    with fails(ConfigError, r"at least 2 known classes are needed, got \[4\]"):
        resolve_protocol("custom", dataset="mnist-sample", known="4", unknown="1,2")
    # the method's proxy split needs 3: a 2-class classifier is refused before any training
    two = TrainConfig(model="lenet", epochs=1, batch_size=32)
    from gradosr.train import train_classifier

    keep = TRAIN.labels < 2
    clf = train_classifier((PRE(TRAIN.images[keep]), TRAIN.labels[keep]), None, [0, 1], two, PRE, progress=False,
                           log=lambda line: None)
    with fails(ConfigError, r"the method needs at least 3 known classes", tmp_path):
        GradientOSR("paper", classifier=clf, train_config=two).fit(TRAIN.images[keep], TRAIN.labels[keep],
                                                          run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


# -------------------------------------------------------------------- 14-17: inputs


def by_hand(images: np.ndarray) -> np.ndarray:
    """What the stored preprocessing (28×28 grey, mean = std = 0.5) should make of ``images``."""
    grey = luma(images if images.ndim == 4 else images[..., None])
    resized = np.stack([bilinear(g, 28, 28) for g in grey])
    return ((resized - 0.5) / 0.5)[:, None].astype(np.float32)


@pytest.mark.parametrize("shape", [(5, 32, 32, 3), (5, 32, 32, 4), (5, 32, 32), (5, 20, 36, 1), (5, 28, 28, 3)])
def test_other_sizes_and_channels_are_converted(osr, shape):
    images = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    expected = by_hand(images)
    np.testing.assert_allclose(osr.classifier_.inputs(images).numpy(), expected, atol=2e-5)
    labels, scores = osr.predict(images, return_scores=True)
    labels_hand, scores_hand = osr.predict(expected, return_scores=True)
    np.testing.assert_allclose(scores, scores_hand, atol=1e-5)
    assert labels.tolist() == labels_hand.tolist()
    np.testing.assert_allclose(osr.score_samples(images), scores, rtol=0, atol=0)


@pytest.mark.parametrize("make, phrase", [
    (lambda: np.zeros((2, 28, 28, 5), np.uint8), r"1, 3 or 4 channels, got 5"),
    (lambda: np.zeros((28, 28), np.uint8), r"N×H×W×C or N×H×W, got shape \(28, 28\)"),
    (lambda: np.zeros((1, 2, 28, 28, 1), np.uint8), r"N×H×W×C or N×H×W"),
    (lambda: np.zeros((2, 0, 28, 1), np.uint8), r"at least 1×1 pixels"),
    (lambda: np.zeros((2, 3, 32, 32), np.float32), r"model inputs N×1×28×28 for this classifier, got shape \(2, 3, 32, 32\)"),
    (lambda: np.zeros((2, 28, 28, 1), np.int64), r"must be uint8 \(0..255\), got int64"),
    (lambda: np.array([["a", "b"]]), r"uint8 images or float model inputs, got dtype <U1"),
    (lambda: [[1, 2], [3]], r"could not be converted to an array"),
], ids=["5-channels", "2-D", "5-D", "zero-height", "float-wrong-shape", "int64", "strings", "ragged"])
def test_unconvertible_inputs(osr, tmp_path, make, phrase):
    for method in (osr.score_samples, osr.predict):
        with fails(DataError, phrase, tmp_path):
            method(make())


def test_custom_model_inputs_of_another_shape(tmp_path):
    """A model without preprocessing: the input shape seen by fit is recorded and enforced."""
    from tiny_runs import FlatNet

    x = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(K), 15)
    fitted = GradientOSR.from_classifier(FlatNet(), preset="paper", train_config=TrainConfig(model="custom", epochs=1),
                                         max_epochs=3).fit(x, y)
    assert fitted.classifier_.input_shape == (1, 8, 8)
    with fails(DataError, r"model inputs N×1×8×8 for this classifier, got shape \(2, 3, 8, 8\)", tmp_path):
        fitted.score_samples(np.zeros((2, 3, 8, 8), np.float32))
    with fails(DataError, r"no stored preprocessing", tmp_path):
        fitted.predict(np.zeros((2, 8, 8, 1), np.uint8))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e300], ids=["nan", "inf", "-inf", "float32-overflow"])
def test_nan_inf_inputs(osr, tmp_path, value):
    x = np.zeros((3, 1, 28, 28), np.float64)
    x[1, 0, 5, 5] = value
    for method in (osr.score_samples, osr.predict):
        with fails(DataError, r"NaN or Inf", tmp_path):
            method(x)


@pytest.mark.parametrize("empty", [np.zeros((0, 28, 28, 1), np.uint8), np.zeros((0, 32, 32, 3), np.uint8),
                                   np.zeros((0, 1, 28, 28), np.float32)], ids=["uint8", "uint8-resized", "float"])
def test_empty_batch(osr, empty):
    scores = osr.score_samples(empty)
    assert scores.shape == (0,) and scores.dtype == np.float64
    labels, scores = osr.predict(empty, return_scores=True)
    assert labels.shape == (0,) and labels.dtype == np.int64 and scores.shape == (0,)


@pytest.mark.parametrize("metric, args", [
    (M.auroc, ([], [])), (M.aupr_in, ([], [])), (M.aupr_out, ([], [])), (M.fpr_at_tpr, ([], [])),
    (M.threshold_at_tpr, ([],)), (M.macro_f1_open, ([], [])), (M.closed_set_accuracy, ([], [])),
    (M.oscr, ([], [], [])), (M.open_set_predictions, ([], [], 0.5)),
], ids=lambda v: getattr(v, "__name__", ""))
def test_metrics_of_empty_inputs(metric, args):
    with fails(DataError, r"is empty"):
        metric(*args)


# ------------------------------------------------------------ 18: predict, bad files


def test_predict_reports_bad_files_and_answers_the_others(run, tmp_path, capsys, osr):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    good_png, good_jpg = imgs / "good.png", imgs / "good.jpg"
    Image.fromarray(VAL.images[0, :, :, 0]).save(good_png)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(good_jpg)
    corrupt = imgs / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    truncated = imgs / "truncated.jpg"
    truncated.write_bytes(good_jpg.read_bytes()[: len(good_jpg.read_bytes()) // 2])
    sub = tmp_path / "folder" / "deeper"  # a folder given to predict: its images, recursively
    sub.mkdir(parents=True)
    (sub / "x.png").write_bytes(good_png.read_bytes())
    files = [good_png, corrupt, imgs / "missing.png", truncated, sub.parent, good_jpg]
    answered = [good_png, corrupt, imgs / "missing.png", truncated, sub / "x.png", good_jpg]
    before = snapshot(run), snapshot(imgs)

    code = main(["predict", "--run", str(run), *map(str, files), "--batch-size", "1"])
    out, err = capsys.readouterr()
    assert code == 1 and err == "" and "Traceback" not in out
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == [str(f) for f in answered]  # every file answered, in order
    for path, row in zip(answered, rows):
        if path in (good_png, good_jpg, sub / "x.png"):
            labels, scores = osr.predict(read_image(path, PRE), return_scores=True)
            assert row[1] == ("unknown" if labels[0] < 0 else str(labels[0]))
            assert float(row[2]) == pytest.approx(scores[0], abs=1e-6)
        else:
            assert row[1] == "error" and len(row) == 3
    assert "no such file" in rows[2][2] and "cannot read image" in rows[1][2]
    assert (snapshot(run), snapshot(imgs)) == before


# ------------------------------------------------------------ 19-27: checkpoints, runs


def test_architecture_mismatch(run, capsys):
    edit_json(run / "classifier" / "model.json", arch="cnn32")
    with fails(CheckpointError, r"weights do not fit architecture 'cnn32' with 4 classes", run):
        GradientOSR.load(run)
    cli_fails(capsys, r"do not fit architecture 'cnn32'", [run], "predict", "--run", run, "x.png")


def test_class_count_mismatch(run, capsys):
    edit_json(run / "classifier" / "model.json", num_classes=6, class_ids=list(range(6)),
              class_names=[str(i) for i in range(6)])
    with fails(CheckpointError, r"weights do not fit architecture 'lenet' with 6 classes", run):
        Classifier.load(run / "classifier")
    cli_fails(capsys, r"with 6 classes", [run], "evaluate", "--run", run)
    # a user's model instance of another class count
    from tiny_runs import FlatNet

    edit_json(run / "classifier" / "model.json", num_classes=4, class_ids=list(range(4)), arch="custom")
    with fails(CheckpointError, r"weights do not fit architecture 'custom' with 4 classes", run):
        GradientOSR.load(run, model=FlatNet(6))


@pytest.mark.parametrize("part", ["classifier/model.safetensors", "detector/detector.safetensors"])
def test_weights_sha256_mismatch(run, capsys, part):
    path = run / part
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    with fails(CheckpointError, rf"{part.split('/')[1]} does not match the sha256 recorded", run):
        GradientOSR.load(run)
    cli_fails(capsys, r"does not match the sha256", [run], "predict", "--run", run, "x.png")


def test_pickle_handed_as_checkpoint(run, tmp_path, capsys, osr):
    marker = tmp_path / "pwned"
    pt = tmp_path / "model.pt"
    torch.save({"state_dict": osr.classifier_.model.state_dict(), "trap": TouchPayload(marker)}, pt)
    phrase = r"looks like a pickle or torch.save \(.pt\) file; gradosr never unpickles"
    with fails(CheckpointError, phrase, tmp_path):
        GradientOSR.load(pt)
    with fails(CheckpointError, phrase, tmp_path):
        Classifier.load(pt)
    cli_fails(capsys, phrase, [tmp_path], "predict", "--run", pt, "x.png")
    cli_fails(capsys, phrase, [tmp_path], "evaluate", "--run", pt)
    # in place of the weights file of a run (its sha256 recorded or not)
    shutil.copy(pt, run / "classifier" / "model.safetensors")
    with fails(CheckpointError, phrase, tmp_path):
        GradientOSR.load(run)
    assert not marker.exists()


def test_confounding_n_ones(run, tmp_path, capsys, osr):
    with fails(ConfigError, r"n_ones=1 is not a confounding label"):
        GradientOSR(n_ones=1)
    cli_fails(capsys, r"n_ones=1 is not a confounding label", [tmp_path], "fit", "--n-ones", "1",
              "--out", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # more ones than the proxy classifier (K - round(K/3) = 3 outputs) has: refused before training
    fresh = GradientOSR("paper", classifier=osr.classifier_, train_config=TRAIN_CONFIG, n_ones=K)
    with fails(ConfigError, r"n_ones must be in \{0, 2, ..., 3\}, got 4 \(the proxy classifier has 3", tmp_path):
        fresh.fit(TRAIN.images, TRAIN.labels, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # a protocol split (6 known digits, 4 proxy knowns): refused before the classifier is trained
    cli_fails(capsys, r"got 5 \(the proxy classifier has 4 of the 6 known classes\)", [tmp_path], "fit",
              "--protocol", "mnist-sample", "--n-ones", "5", "--out", tmp_path / "r", "--no-progress",
              "--preset", "paper")
    assert not (tmp_path / "r").exists()
    # plus has no proxy: the bound is the final classifier's K = 6 outputs
    cli_fails(capsys, r"n_ones must be in \{0, 2, ..., 6\}, got 7", [tmp_path], "fit",
              "--protocol", "mnist-sample", "--n-ones", "7", "--out", tmp_path / "r", "--no-progress")
    assert not (tmp_path / "r").exists()


def test_model_without_linear_head():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with fails(ConfigError, r"cannot find the classification head of .*--head NAME"):
        GradientOSR.from_classifier(model)


@pytest.mark.parametrize("part", ["osr.json", "classifier/model.json", "detector/detector.json"])
def test_run_of_a_newer_format_version(run, capsys, part):
    edit_json(run / part, format_version=99)
    with fails(CheckpointError, r"written by a newer gradosr \(format version 99.*upgrade gradosr", run):
        GradientOSR.load(run)
    cli_fails(capsys, r"newer gradosr.*upgrade gradosr", [run], "predict", "--run", run, "x.png")
    if part != "detector/detector.json":  # evaluate reads the detector only for the paper method
        cli_fails(capsys, r"newer gradosr.*upgrade gradosr", [run], "evaluate", "--run", run)


def test_corrupt_model_json(run, capsys):
    path = run / "classifier" / "model.json"
    path.write_bytes(path.read_bytes()[:40])
    with fails(CheckpointError, r"model.json is not valid JSON", run):
        GradientOSR.load(run)
    cli_fails(capsys, r"model.json is not valid JSON", [run], "evaluate", "--run", run)


def test_fit_into_a_run_with_another_proxy(run, osr):
    other = TrainConfig(model="lenet", epochs=2, batch_size=32, seed=0)
    fresh = GradientOSR("paper", classifier=osr.classifier_, train_config=other, max_epochs=5)
    with fails(CheckpointError, r"holds another proxy classifier: train.epochs is 1 in the checkpoint but 2", run):
        fresh.fit(TRAIN.images, TRAIN.labels, VAL.images, VAL.labels, run_dir=run)


@pytest.mark.parametrize("command", ["train", "fit", "benchmark"])
def test_out_is_a_file(tmp_path, capsys, command):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    cli_fails(capsys, r"--out .*results.txt exists and is not a folder", [tmp_path], command, "--out", out,
              "--epochs", "1", "--no-progress", *(["--splits", "0"] if command == "benchmark" else []))


# ---------------------------------------------------------------------- 29: metrics


@pytest.mark.parametrize("call, error, phrase", [
    (lambda: M.auroc([0.1, np.nan, 0.3], [1, 0, 1]), DataError, r"scores contains 1 NaN or infinite"),
    (lambda: M.aupr_out([0.1, 0.2], [1, 0, 1]), DataError, r"length mismatch: scores has 2, is_known has 3"),
    (lambda: M.auroc([0.1, 0.2], [1, 1]), DataError, r"auroc is undefined: all samples are known"),
    (lambda: M.oscr([-1, -1], [0, 1], [0.2, 0.3]), DataError, r"oscr is undefined: all samples are unknown"),
    (lambda: M.fpr_at_tpr([0.1, 0.2], [1, 0], tpr=1.5), ConfigError, r"tpr must be in \(0, 1\]"),
    (lambda: M.macro_f1_open([0, 5], [0, 1], num_known=2), DataError, r"y_true has labels outside"),
    (lambda: M.closed_set_accuracy([0, 1], [0, -1]), DataError, r"must be closed-set predictions"),
], ids=["nan", "length", "all-known", "all-unknown", "tpr", "label-range", "closed-pred"])
def test_metrics_bad_inputs(call, error, phrase):
    with fails(error, phrase):
        call()


def test_catalogue_has_at_least_25_cases():
    cases = re.findall(r"^\s*(\d+) \[", __doc__, flags=re.M)
    assert len(cases) >= 25 and cases == [str(i) for i in range(1, len(cases) + 1)]


# ------------------------------------------------------------ 31-44: your data, your model


def _folder_with(root: Path, per_class: dict[str, int]) -> Path:
    from your_data import write_png

    for name, n in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_png(root / name / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    return root


def _fit_args(dataset, out, *more):
    return ("fit", "--protocol", "custom", "--dataset", dataset, "--known", "0,1", "--unknown", "2",
            "--epochs", "1", "--no-progress", "--out", out, *more)


def test_empty_class_folder(tmp_path, capsys):
    root = _folder_with(tmp_path / "imgs", {"a": 5, "b": 0, "c": 5})
    cli_fails(capsys, r"class folder 'b' has no images", [tmp_path], *_fit_args(root, tmp_path / "run"))


def test_folder_without_images(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "readme.txt").write_text("no images here")
    cli_fails(capsys, r"holds no images", [tmp_path], *_fit_args(tmp_path / "imgs", tmp_path / "run"))
    root = _folder_with(tmp_path / "mixed", {"a": 3, "b": 3, "c": 3})
    (root / "loose.png").write_bytes((root / "a" / "0.png").read_bytes())
    cli_fails(capsys, r"both class folders and 1 loose images", [tmp_path], *_fit_args(root, tmp_path / "run"))


def test_npz_missing_key(tmp_path, capsys):
    x = np.zeros((30, 8, 8), np.uint8)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=np.arange(30) % 3, x_test=x)
    cli_fails(capsys, r"lacks the key 'y_test'", [tmp_path], *_fit_args(f"npz:{tmp_path / 'a.npz'}", tmp_path / "run"))
    np.savez(tmp_path / "b.npz", images=x)
    cli_fails(capsys, r"has neither x_train.* nor x/y", [tmp_path], *_fit_args(tmp_path / "b.npz", tmp_path / "run"))


@pytest.mark.parametrize("labels, phrase", [
    (np.arange(30) % 3 + 0.5, r"integer class ids, found non-integer"),
    (np.arange(30) % 3 - 1, r"class ids must be >= 0, found -1"),
    (np.where(np.arange(30) % 3 == 2, 3, np.arange(30) % 3), r"\[2\] have none"),
    (np.array(["a"] * 30), r"integer class ids, got dtype <U1"),
], ids=["fractional", "negative", "gap", "strings"])
def test_npz_bad_labels(tmp_path, capsys, labels, phrase):
    np.savez(tmp_path / "a.npz", x=np.zeros((30, 8, 8), np.uint8), y=labels)
    cli_fails(capsys, phrase, [tmp_path], *_fit_args(f"npz:{tmp_path / 'a.npz'}", tmp_path / "run"))


@pytest.mark.parametrize("x, phrase", [
    (np.zeros((30, 2, 8, 8, 1), np.uint8), r"N×H×W or N×H×W×C with C = 1, 3 or 4, got shape \(30, 2, 8, 8, 1\)"),
    (np.zeros((30, 8, 8, 2), np.uint8), r"C = 1, 3 or 4, got shape \(30, 8, 8, 2\)"),
    (np.full((30, 8, 8), 1.5), r"float images must lie in \[0, 1\], found 1.5..1.5"),
    (np.full((30, 8, 8), np.nan), r"contains NaN or Inf"),
    (np.full((30, 8, 8), 300, np.int32), r"integer images must lie in 0..255"),
    (np.full((30, 8, 8), "a"), r"numeric images, got dtype <U1"),
], ids=["5-D", "2-channels", "float-range", "nan", "int-range", "strings"])
def test_npz_unconvertible_images(tmp_path, capsys, x, phrase):
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(30) % 3)
    cli_fails(capsys, phrase, [tmp_path], *_fit_args(f"npz:{tmp_path / 'a.npz'}", tmp_path / "run"))


def test_unreadable_image_under_strict(tmp_path, capsys):
    root = _folder_with(tmp_path / "imgs", {"a": 5, "b": 5, "c": 5})
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cli_fails(capsys, r"cannot read image .*broken.jpg.*--strict refuses", [tmp_path],
              *_fit_args(root, tmp_path / "run", "--strict"))


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    from your_data import factory_module

    return factory_module(tmp_path / "src", monkeypatch)


def test_weights_pickle_or_missing(tmp_path, capsys, user_models):
    root = _folder_with(tmp_path / "imgs", {"a": 5, "b": 5, "c": 5})
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    cli_fails(capsys, r"is a pickle checkpoint \(.pt\).*never loads.*save_file", [tmp_path],
              *_fit_args(root, tmp_path / "run", "--model", f"{user_models}:make", "--weights", tmp_path / "model.pt"))
    cli_fails(capsys, r"--weights: no such file", [tmp_path],
              *_fit_args(root, tmp_path / "run", "--model", f"{user_models}:make", "--weights", tmp_path / "no.safetensors"))
    # a torch.save file renamed .safetensors: refused by its content, with how to convert it
    shutil.copy(tmp_path / "model.pt", tmp_path / "renamed.safetensors")
    cli_fails(capsys, r"is a pickle or torch.save file by its content.*never loads.*save_file", [tmp_path],
              *_fit_args(root, tmp_path / "run", "--model", f"{user_models}:make", "--weights",
                         tmp_path / "renamed.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    cli_fails(capsys, r"not a readable safetensors file", [tmp_path],
              *_fit_args(root, tmp_path / "run", "--model", f"{user_models}:make", "--weights", tmp_path / "junk.safetensors"))


@pytest.mark.parametrize("model, more, phrase", [
    ("no_such_module_xyz:make", (), r"cannot import 'no_such_module_xyz'"),
    ("{m}:missing", (), r"has no attribute 'missing'"),
    ("{m}:broken", (), r"calling {m}:broken\(num_classes=2, in_channels=3\) failed: ValueError: no GPU here"),
    ("{m}:conv_head", (), r"cannot find the classification head of Sequential.*--head NAME"),
    ("{m}:make", ("--head", "body.0"), r"--head 'body.0' is a Conv2d, not an nn.Linear.*body.4, classifier.1"),
    ("{m}:make", ("--head", "body.4"), r"the head of {m}:make\(.*\) has 16 outputs, not 2"),
], ids=["import", "attribute", "raises", "no-head", "head-not-linear", "head-wrong-size"])
def test_user_model_errors(tmp_path, capsys, user_models, model, more, phrase):
    root = _folder_with(tmp_path / "imgs", {"a": 5, "b": 5, "c": 5})
    cli_fails(capsys, phrase.format(m=user_models), [tmp_path],
              *_fit_args(root, tmp_path / "run", "--model", model.format(m=user_models), *more))


@pytest.fixture
def user_run(tmp_path, user_models, capsys):
    """A fitted run of the user's model on a 3-class folder, and a weights file of it."""
    from safetensors.torch import save_file

    from gradosr.models import build_model

    root = _folder_with(tmp_path / "imgs", {"a": 6, "b": 6, "c": 6})
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(f"{user_models}:make", 2, 3).state_dict().items()},
              str(weights))
    run = tmp_path / "run"
    assert main([str(a) for a in _fit_args(root, run, "--model", f"{user_models}:make", "--weights", weights)]) == 0
    capsys.readouterr()
    return run, weights, root


def test_user_model_run_needs_its_model_again(tmp_path, capsys, user_run, user_models):
    run, _, root = user_run
    for command in (("evaluate", run), ("predict", run, root / "a" / "0.png")):
        cli_fails(capsys, rf"holds a user model built by {user_models}:make: pass --model {user_models}:make again",
                  [tmp_path], *command, "--no-progress")
        cli_fails(capsys, rf"holds a model built by {user_models}:make, but --model is lenet", [tmp_path],
                  *command, "--model", "lenet", "--no-progress")


def test_weights_other_than_the_runs(tmp_path, capsys, user_run, user_models):
    run, weights, root = user_run
    other = tmp_path / "other.safetensors"
    other.write_bytes(weights.read_bytes() + b" ")
    for command in (("evaluate", run), ("predict", run, root / "a" / "0.png")):
        cli_fails(capsys, r"is not the file this run was fitted with", [tmp_path], *command, "--model",
                  f"{user_models}:make", "--weights", other, "--no-progress")


def test_unlabeled_or_synthetic_set_as_known_data(tmp_path, capsys):
    from your_data import write_png

    for i in range(5):
        write_png(tmp_path / "out" / f"{i}.png", np.zeros((8, 8, 1), np.uint8))
    cli_fails(capsys, r"has no classes .*not --known-dataset", [tmp_path], "fit", "--protocol", "cross",
              "--known-dataset", tmp_path / "out", "--unknown-dataset", "mnist-sample", "--out", tmp_path / "run")
    cli_fails(capsys, r"synthetic-gaussian has no classes", [tmp_path], "fit", "--protocol", "custom",
              "--dataset", "synthetic-gaussian", "--known", "0,1", "--unknown", "2", "--out", tmp_path / "run")
    cli_fails(capsys, r"unknown synthetic set 'synthetic-plaid'; known: synthetic-gaussian", [tmp_path], "fit",
              "--protocol", "cross", "--known-dataset", "mnist-sample", "--unknown-dataset", "synthetic-plaid",
              "--out", tmp_path / "run")


def test_one_split_with_weights_and_one_split_option(tmp_path, capsys):
    (tmp_path / "w.safetensors").write_bytes(b"")
    cli_fails(capsys, r"--weights is one trained classifier, for one split; got splits \[0, 1\]", [tmp_path],
              "benchmark", "--splits", "0-1", "--weights", tmp_path / "w.safetensors", "--out", tmp_path / "b")
    cli_fails(capsys, r"either --splits or --split-seeds, not both", [tmp_path], "benchmark", "--splits", "0",
              "--split-seeds", "1,2", "--out", tmp_path / "b")
    cli_fails(capsys, r"cross protocol knows every class .*not --split-seed", [tmp_path], "benchmark", "--protocol",
              "cross", "--known-dataset", "mnist-sample", "--unknown-dataset", "synthetic-blobs", "--split-seeds",
              "1,2", "--out", tmp_path / "b")


def test_predict_output_suffix(tmp_path, capsys, run):
    cli_fails(capsys, r"--output .*p.txt must end in .csv or .jsonl", [tmp_path], "predict", run,
              run / "classifier" / "model.json", "--output", tmp_path / "p.txt")


def test_too_few_images_for_the_validation_split(tmp_path, capsys):
    root = _folder_with(tmp_path / "imgs", {"a": 3, "b": 3, "c": 3})
    cli_fails(capsys, r"too few for a stratified 20% validation split of 2 classes", [tmp_path],
              *_fit_args(root, tmp_path / "run"))
