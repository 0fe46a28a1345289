"""Configuration without collisions, seeds, the default preset, generated CLI flags, the
run layout and classifier identity (issue 16's bugs, each shown fixed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradosr import GradientOSR
from gradosr.cli import _method_options, build_parser, main
from gradosr.cli.method_flags import method_flags
from gradosr.errors import ConfigError
from gradosr.methods.config import DEFAULT_PRESET, make_config, option_fields
from test_osr import X, X_VAL, Y, Y_VAL, make_osr, trained_model


def test_the_extraction_batch_size_is_settable_and_reaches_the_extraction(monkeypatch):
    import gradosr.methods.detector_inputs as di

    assert make_config("paper", extraction__batch_size=7).extraction.batch_size == 7
    seen = []
    real = di.extract

    def spy(model, x, rep, batch_size, *a, **k):
        seen.append(batch_size)
        return real(model, x, rep, batch_size, *a, **k)

    monkeypatch.setattr(di, "extract", spy)
    a = make_osr(trained_model(), max_epochs=2, extraction__batch_size=16).fit(X, Y, X_VAL, Y_VAL)
    assert seen and set(seen) == {16}
    b = make_osr(trained_model(), max_epochs=2).fit(X, Y, X_VAL, Y_VAL)
    assert 256 in seen  # the default
    np.testing.assert_allclose(a.score_samples(X_VAL), b.score_samples(X_VAL), rtol=1e-5, atol=1e-6)


def test_an_ambiguous_flat_name_is_refused_naming_its_candidates():
    with pytest.raises(ConfigError, match="ambiguous.*detector__batch_size.*extraction__batch_size"):
        make_config("paper", batch_size=32)
    with pytest.raises(ConfigError, match="ambiguous"):
        GradientOSR(batch_size=32)
    assert make_config("paper", detector__batch_size=32).detector.batch_size == 32
    assert make_config("paper", hidden=8).detector.hidden == 8  # unambiguous flat names still work


def test_the_method_seed_reaches_the_detector():
    assert GradientOSR(seed=7).resolved_config().detector.seed == 7
    assert GradientOSR(seed=7, detector__seed=3).resolved_config().detector.seed == 3  # explicit wins
    model = trained_model()
    seven = make_osr(model, max_epochs=3, seed=7).fit(X, Y, X_VAL, Y_VAL)
    assert seven.method_.members_[0].detector.settings.seed == 7
    # the same detector as seed 0 with detector__seed=7 (the proxy split differs with the seed: fixed here)
    zero = make_osr(model, max_epochs=3, seed=7, detector__seed=0).fit(X, Y, X_VAL, Y_VAL)
    assert not np.array_equal(seven.score_samples(X_VAL), zero.score_samples(X_VAL))


def test_one_default_preset_everywhere():
    from gradosr.evaluation.benchmark import BenchmarkSettings

    assert DEFAULT_PRESET == "plus"
    assert GradientOSR().preset == DEFAULT_PRESET and make_config().preset == DEFAULT_PRESET
    assert BenchmarkSettings("mnist-sample", [0], "out").preset == DEFAULT_PRESET
    assert build_parser().parse_args(["fit", "--out", "x"]).preset == DEFAULT_PRESET
    import inspect

    assert inspect.signature(GradientOSR.from_classifier).parameters["preset"].default == DEFAULT_PRESET


def test_cli_flags_are_generated_from_the_config_fields():
    flags = {name: flag for flag, name, _ in method_flags()}
    cli_fields = [name for name, f in option_fields() if f.metadata.get("cli")]
    assert sorted(flags) == sorted(cli_fields)
    assert flags["detector__batch_size"] == "--detector-batch-size"
    assert flags["extraction__batch_size"] == "--extraction-batch-size"
    assert flags["representation__log"] == "--no-log" and flags["detector__hidden"] == "--hidden"
    args = build_parser().parse_args(["fit", "--out", "x", "--batch-size", "64", "--detector-batch-size", "32",
                                      "--extraction-batch-size", "16", "--no-log", "--seed", "3"])
    assert args.batch_size == 64 and args.seed == 3  # the training flags keep their meaning
    opts = _method_options(args)
    assert opts == {"detector__batch_size": 32, "extraction__batch_size": 16, "representation__log": False}
    cfg = make_config("paper", seed=args.seed, **opts)
    assert (cfg.detector.batch_size, cfg.extraction.batch_size, cfg.representation.log, cfg.detector.seed) == \
        (32, 16, False, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--out", "x", "--standardize", "sometimes"])  # choices from the config


def test_cli_fit_seed_reaches_the_detector_and_evaluate_takes_the_run_positionally(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "3,4",
              "--epochs", "1", "--no-progress", "--device", "cpu"]
    assert main(["fit", *common, "--preset", "paper", "--seed", "5", "--max-epochs", "3", "--out", str(run)]) == 0
    assert json.loads((run / "osr.json").read_text())["config"]["detector"]["seed"] == 5
    assert main(["evaluate", str(run), "--methods", "paper,msp", "--no-progress", "--device", "cpu"]) == 0
    def metrics():
        timings = {"seconds", "fit_s", "score_s", "score_ms_per_1k", "forward_ms_per_1k"}
        return [{k: v for k, v in r.items() if k not in timings}
                for r in json.loads((run / "eval.json").read_text())["results"]]

    positional = metrics()
    assert main(["evaluate", "--run", str(run), "--methods", "paper,msp", "--no-progress", "--device", "cpu"]) == 0
    assert metrics() == positional
    capsys.readouterr()
    from PIL import Image

    png = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert main(["predict", str(run), str(png), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(str(png) + "\t")
    assert main(["predict", str(run), "--device", "cpu"]) == 2  # no files: one clear line
    assert "needs image files" in capsys.readouterr().err


def fake_idx_dataset(folder, seed: int, n_test: int = 60) -> None:
    """An MNIST-format dataset (the four IDX files) of random 28×28 images."""
    from idx_files import write_idx

    rng = np.random.default_rng(seed)
    for stem, n in (("train", 40), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


def test_one_classifier_serves_several_unknown_sets(tmp_path, monkeypatch, no_debian):
    import gradosr.runs as runs
    from gradosr.evaluation.benchmark import BenchmarkSettings, run_benchmark

    for name, seed in (("mnist", 1), ("fashion-mnist", 2)):
        fake_idx_dataset(tmp_path / "data" / name, seed)
    trained = []
    real = runs.train_classifier
    monkeypatch.setattr(runs, "train_classifier", lambda *a, **k: trained.append(1) or real(*a, **k))

    def bench(unknown, out):
        settings = BenchmarkSettings("cross", [0], tmp_path / out, methods=["msp", "mls"], data_dir=str(tmp_path / "data"),
                                     protocol_args={"known_dataset": "mnist-sample", "unknown_dataset": unknown},
                                     train_overrides={"epochs": 1}, progress=False, command="t")
        return run_benchmark(settings, log=lambda s: None)

    docs = bench("mnist,fashion-mnist", "both")
    assert len(trained) == 1 and set(docs) == {"mnist", "fashion-mnist"}
    for name, doc in docs.items():
        assert json.loads((tmp_path / "both" / name / "results.json").read_text())["results"] == doc["results"]
        assert doc["splits"][0]["protocol"]["unknown_dataset"] == name
    assert docs["mnist"]["results"][0]["auroc"] != docs["fashion-mnist"]["results"][0]["auroc"]
    # a later benchmark of another unknown set in the same folder reuses the classifier too
    alone = bench("fashion-mnist", "both")
    assert len(trained) == 1
    assert [r["auroc"] for r in alone["results"]] == [r["auroc"] for r in docs["fashion-mnist"]["results"]]


@pytest.mark.slow
def test_torchrun_evaluate_takes_the_run_folder_positionally(tmp_path):
    from test_distributed import torchrun

    run = tmp_path / "run"
    assert main(["fit", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "3,4",
                 "--epochs", "1", "--no-progress", "--device", "cpu", "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--methods", "plus,msp", "--no-progress", "--device", "cpu",
                 "--json", str(tmp_path / "one.json")]) == 0
    proc = torchrun("evaluate", str(run), "--methods", "plus,msp", "--no-progress", "--device", "cpu",
                    "--json", str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text())["results"] for f in ("one.json", "two.json"))
    for a, b in zip(one, two):
        assert a["method"] == b["method"] and a["auroc"] == pytest.approx(b["auroc"], abs=1e-9)
