"""Tests for the ``gradosr`` command, run in-process through ``gradosr.cli.main``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gradosr.cli import EXIT_ERROR, main

RESULT_KEYS = {"method", "split", "auroc", "aupr_in", "aupr_out", "fpr95", "macro_f1", "macro_f1_tpr95", "oscr",
               "closed_acc", "threshold", "threshold_rule"}
METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "macro_f1", "macro_f1_tpr95", "oscr", "closed_acc")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, fragment):
    assert code == EXIT_ERROR == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradosr: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in err and "Traceback" not in out


# -------------------------------------------------------------------------- errors


def test_unknown_protocol(capsys, tmp_path):
    code, out, err = run_cli(capsys, "fit", "--protocol", "no-such-protocol", "--out", tmp_path / "r")
    assert_one_line_error(code, out, err, "no-such-protocol")
    assert not (tmp_path / "r").exists()


def test_overlapping_known_unknown(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2",
                             "--unknown", "2,3", "--out", tmp_path / "r")
    assert_one_line_error(code, out, err, "[2]")
    assert not (tmp_path / "r").exists()


def test_evaluate_missing_run(capsys, tmp_path):
    code, out, err = run_cli(capsys, "evaluate", "--run", tmp_path / "nothing-here")
    assert_one_line_error(code, out, err, "nothing-here")


def test_split_out_of_range(capsys, tmp_path):
    code, out, err = run_cli(capsys, "fit", "--protocol", "mnist-sample", "--split", "7", "--out", tmp_path / "r")
    assert_one_line_error(code, out, err, "7")
    assert "0..4" in err


def test_predict_missing_run(capsys, tmp_path):
    code, out, err = run_cli(capsys, "predict", "--run", tmp_path / "none", "x.png")
    assert_one_line_error(code, out, err, "osr.json")


def test_debug_shows_the_exception(tmp_path):
    from gradosr.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["fit", "--protocol", "nope", "--out", str(tmp_path / "r"), "--debug"])


# ----------------------------------------------------------------- help, datasets


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gradosr")
    for command in ("datasets", "train", "fit", "predict", "evaluate"):
        assert command in out


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0 and out.startswith("usage: gradosr")


def test_datasets(capsys, tmp_path):
    code, out, err = run_cli(capsys, "datasets", "--data-dir", tmp_path)
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) >= {"mnist-sample", "mnist", "fashion-mnist", "cifar10", "svhn", "tiny-imagenet"}
    assert rows["mnist-sample"].split()[1] == "found"
    assert rows["mnist"].split()[1] == "missing"  # an empty data dir holds no MNIST
    assert rows["cifar10"].split()[1] == "missing"


# -------------------------------------------------------------------- end to end


def write_digits(tmp_path):
    from PIL import Image

    from gradosr.data.mnist_sample import load_mnist_sample

    _, test = load_mnist_sample()
    paths = []
    for name, cls in (("a.png", 0), ("b.png", 4)):  # a known digit, an unknown digit
        img = test.images[np.flatnonzero(test.labels == cls)[0], :, :, 0]
        Image.fromarray(img).save(tmp_path / name)
        paths.append(tmp_path / name)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image \x00\x01\x02" * 10)
    return paths + [bad]


@pytest.mark.slow
def test_fit_evaluate_predict_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    fit_args = ["fit", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "3,4",
                "--epochs", "1", "--out", run, "--no-progress", "--device", "cpu", "--preset", "paper"]
    code, out, err = run_cli(capsys, *fit_args)
    assert code == 0, err
    for rel in ("classifier/model.safetensors", "classifier/model.json", "proxy/model.safetensors",
                "proxy/model.json", "detector/detector.safetensors", "detector/detector.json", "osr.json"):
        assert (run / rel).is_file(), rel
    osr_meta = json.loads((run / "osr.json").read_text())
    proxy_unknown = json.loads((run / "detector" / "detector.json").read_text())["members"][0]["proxy_unknown"]
    assert len(proxy_unknown) == 1  # max(1, round(3/3)) of the 3 knowns
    assert osr_meta["threshold"] == 0.95 and osr_meta["train"]["epochs"] == 1
    proxy_meta = json.loads((run / "proxy" / "model.json").read_text())
    assert proxy_meta["num_classes"] == 2
    assert sorted(proxy_meta["class_ids"] + [[0, 1, 2][proxy_unknown[0]]]) == [0, 1, 2]

    # evaluate
    eval_json = tmp_path / "e.json"
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--json", eval_json, "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert f"results written to {eval_json}" in out
    doc = json.loads(eval_json.read_text())
    assert doc["schema"] == 1
    assert doc["command"].startswith("gradosr evaluate --run ") and str(eval_json) in doc["command"]
    assert {"gradosr", "python", "torch", "numpy", "scikit-learn"} <= set(doc["versions"])
    records = {r["method"]: r for r in doc["results"]}
    assert [r["method"] for r in doc["results"]] == ["paper", "msp"]
    for method, record in records.items():
        assert RESULT_KEYS <= set(record), method  # schema keys, plus timing
        assert record["split"] == 0
        for key in METRICS:
            assert 0.0 <= record[key] <= 1.0, (method, key)
        assert set(doc["summary"][method]) == set(METRICS)
        for key in METRICS:
            stats = doc["summary"][method][key]
            assert stats["mean"] == pytest.approx(record[key]) and stats["std"] == 0.0
    assert records["paper"]["threshold"] == 0.95
    assert records["paper"]["threshold_rule"] != records["msp"]["threshold_rule"]
    assert records["paper"]["closed_acc"] == records["msp"]["closed_acc"]  # the same classifier
    clf_meta = json.loads((run / "classifier" / "model.json").read_text())
    assert records["msp"]["closed_acc"] == pytest.approx(clf_meta["test_acc"])
    assert records["msp"]["auroc"] > 0.5

    # predict
    files = write_digits(tmp_path)
    code, out, err = run_cli(capsys, "predict", "--run", run, *[f.name for f in files], "--no-progress",
                             "--device", "cpu")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3, out
    for line, name in zip(lines[:2], ("a.png", "b.png")):
        path, label, score = line.split("\t")
        assert path == name
        assert label in {"0", "1", "2", "unknown"}
        assert 0.0 <= float(score) <= 1.0 and math.isfinite(float(score))
    path, tag, message = lines[2].split("\t", 2)
    assert (path, tag) == ("bad.png", "error") and "bad.png" in message
    assert "Traceback" not in err

    # the same fit again: nothing to do
    mtime = (run / "osr.json").stat().st_mtime_ns
    code, out, err = run_cli(capsys, *fit_args)
    assert code == 0, err
    assert "nothing to do" in out
    assert (run / "osr.json").stat().st_mtime_ns == mtime
