"""gradosr benchmark: records, summary, tables, plots, caching and resumption."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradosr.evaluation.benchmark import BenchmarkSettings, run_benchmark
from gradosr.evaluation.tables import markdown_table
from gradosr.errors import GradOSRError

METHODS = ["msp", "mls", "gradnorm"]


def settings(out, splits=(0, 1)):
    return BenchmarkSettings(protocol="mnist-sample", splits=list(splits), methods=METHODS, out=out,
                             train_overrides={"epochs": 1}, progress=False, command="test")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, run_benchmark(settings(out), log=lambda s: None)


def test_results_document(bench):
    out, doc = bench
    assert doc["schema"] == 1 and doc["command"] == "test"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == doc["results"]
    assert [(r["method"], r["split"]) for r in doc["results"]] == [(m, s) for s in (0, 1) for m in METHODS]
    for method in METHODS:
        for key in ("auroc", "macro_f1", "macro_f1_tpr95", "oscr", "fpr95"):
            vals = np.array([r[key] for r in doc["results"] if r["method"] == method])
            assert doc["summary"][method][key]["mean"] == pytest.approx(vals.mean(), rel=1e-12)
            assert doc["summary"][method][key]["std"] == pytest.approx(vals.std(ddof=0), abs=1e-12)
    # the same classifier under every method of a split
    for s in (0, 1):
        accs = {r["closed_acc"] for r in doc["results"] if r["split"] == s}
        assert len(accs) == 1
    # baselines: macro_f1 is at the 95%-acceptance rule, identical to macro_f1_tpr95
    for r in doc["results"]:
        assert r["threshold_rule"] == "tpr95-val" and r["macro_f1"] == r["macro_f1_tpr95"]


def test_csv_markdown_and_plots(bench):
    out, doc = bench
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(METHODS) * 2
    assert float(rows[0]["auroc"]) == pytest.approx(doc["results"][0]["auroc"])
    md = (out / "results.md").read_text()
    assert "Command: `test`" in md
    best = max(METHODS, key=lambda m: round(doc["summary"][m]["auroc"]["mean"], 3))
    row = next(line for line in md.splitlines() if line.startswith(f"| {best} |"))
    assert row.split("|")[3].strip().startswith("**")  # | method | family | AUROC | ...
    for r in doc["results"]:  # every record says the method's family and whether it is gradosr's own
        assert (r["family"], r["own"]) == ({"msp": "logit", "mls": "logit", "gradnorm": "gradient"}[r["method"]], False)
    for name in ("roc_split0.png", "oscr_split1.png", "hist_msp.png"):
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_bold_marks_lowest_fpr():
    summary = {"a": {"auroc": {"mean": 0.9, "std": 0.0}, "fpr95": {"mean": 0.2, "std": 0.0}},
               "b": {"auroc": {"mean": 0.8, "std": 0.0}, "fpr95": {"mean": 0.1, "std": 0.0}}}
    lines = markdown_table(summary).splitlines()
    a, b = lines[2].split("|"), lines[3].split("|")
    assert a[3].strip().startswith("**") and not b[3].strip().startswith("**")   # AUROC: higher wins
    assert b[6].strip().startswith("**") and not a[6].strip().startswith("**")   # FPR: lower wins


def test_second_run_reuses_cache(bench, monkeypatch):
    out, doc = bench

    def boom(*a, **k):
        raise AssertionError("a cached method was recomputed")

    from gradosr.detectors import MSP

    monkeypatch.setattr(MSP, "score_samples", boom)
    again = run_benchmark(settings(out), log=lambda s: None)
    # a record from the cache keeps the times of the run that computed it, and says so
    assert all(r["cached"] for r in again["results"]) and not any(r["cached"] for r in doc["results"])
    assert [{**r, "cached": False} for r in again["results"]] == doc["results"]


def test_every_record_carries_its_cost(bench):
    out, doc = bench
    for r in doc["results"]:
        assert r["fit_s"] >= 0 and r["score_s"] > 0 and r["forward_ms_per_1k"] > 0
        assert r["cached"] is False
    for split in (0, 1):  # ms per 1k rows = score_s over the same row count for every method of a split
        rows = [r for r in doc["results"] if r["split"] == split]
        per_row = [r["score_s"] / r["score_ms_per_1k"] for r in rows]
        # both are rounded to 6 decimals: a fast method's quotient is exact only to 1e-6 / score_s
        tol = 1e-3 + 2e-6 / min(r["score_s"] for r in rows)
        assert per_row == pytest.approx([per_row[0]] * len(per_row), rel=tol)
    assert set(doc["cost"]) == set(METHODS) and doc["cost"]["msp"]["score_ms_per_1k"] > 0
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header.rstrip().endswith("| ms/1k | fit s | forward ms/1k |")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert float(rows[0]["score_ms_per_1k"]) == pytest.approx(doc["results"][0]["score_ms_per_1k"])


def test_documents_of_single_splits_merge_into_the_two_split_document(bench, tmp_path):
    """Split 1's run and split 0's run, merged (in either order), give the records, the
    mean ± std summary and the cost of the one run over both splits."""
    from gradosr.evaluation.benchmark import merge_documents

    out, doc = bench
    part = {s: {**doc, "command": f"run {s}", "results": [r for r in doc["results"] if r["split"] == s],
                "splits": [x for x in doc["splits"] if x["split"] == s], "summary": {}, "cost": {}} for s in (0, 1)}
    merged = merge_documents([part[1], part[0]])
    assert merged["results"] == doc["results"]
    assert merged["summary"] == doc["summary"] and merged["cost"] == doc["cost"]
    assert merged["splits"] == doc["splits"] and merged["commands"] == ["run 1", "run 0"]
    assert merged["versions"] == doc["versions"]
    other = merge_documents([part[0], {**part[1], "versions": {"gradosr": "0"}}])["versions"]
    assert other == [doc["versions"], {"gradosr": "0"}]
    with pytest.raises(GradOSRError, match="more than one"):
        merge_documents([part[0], doc])
    with pytest.raises(GradOSRError, match="document 2 is not"):
        merge_documents([part[0], {"results": [{"auroc": 1}], "command": "x"}])
    with pytest.raises(GradOSRError, match="different methods"):
        merge_documents([part[0], {**part[1], "results": part[1]["results"][:1]}])
    # the script writes the report folder, and refuses a file that is not a document in one line
    paths = []
    for s in (0, 1):
        paths.append(tmp_path / f"r{s}.json")
        paths[-1].write_text(json.dumps(part[s]))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_results.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "m"), *map(str, paths)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m" / "results.json").read_text())["summary"] == doc["summary"]
    assert "- `run 0`" in (tmp_path / "m" / "results.md").read_text()
    (tmp_path / "bad.json").write_text("{")
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "n"), str(paths[0]), str(tmp_path / "bad.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "bad.json" in bad.stderr
    assert not (tmp_path / "n").exists()


def test_interrupted_benchmark_resumes(tmp_path, monkeypatch):
    import gradosr.evaluation.driver as runner

    real = runner.load_protocol
    calls = []

    def flaky(spec, *args, **kwargs):
        calls.append(spec.split)
        if spec.split == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(runner, "load_protocol", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(settings(tmp_path), log=lambda s: None)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert {r["split"] for r in partial["results"]} == {0}
    cache0 = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "split0").iterdir()}
    done = run_benchmark(settings(tmp_path), log=lambda s: None)
    assert {r["split"] for r in done["results"]} == {0, 1}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "split0").iterdir()} == cache0


def test_unknown_method_is_refused(tmp_path):
    s = settings(tmp_path, splits=(0,))
    s.methods = ["msp", "nope"]
    with pytest.raises(GradOSRError, match="nope"):
        run_benchmark(s, log=lambda s: None)


def test_gradient_contribution_merge(tmp_path):
    """``gradient_contribution.py --merge`` keeps every record and recomputes the means
    over all of them (NumPy on the concatenated records); a split held twice, or a set
    one folder lacks, is refused in one line, with nothing written."""
    rng = np.random.default_rng(0)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_contribution.py"
    parts = {}
    for name, splits in (("a", [1]), ("b", [2, 3])):
        records = [{"method": m, "split": s, "auroc": float(rng.uniform(0.9, 1)),
                    "macro_f1_tpr95": float(rng.uniform(0.8, 0.9)), "fpr95": float(rng.uniform(0, 0.1))}
                   for s in splits for m in ("plus", "plus-no-gradient-signal")]
        parts[name] = records
        (tmp_path / name / "set1").mkdir(parents=True)
        (tmp_path / name / "set1" / "gradient_contribution.json").write_text(
            json.dumps({"command": f"run {name}", "records": records, "summary": {}}))
    done = subprocess.run([sys.executable, str(script), "--merge", str(tmp_path / "m"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--set", "set1"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(script).parents[1] / "src")})
    assert done.returncode == 0, done.stderr
    doc = json.loads((tmp_path / "m" / "set1" / "gradient_contribution.json").read_text())
    everything = parts["a"] + parts["b"]
    assert doc["records"] == everything and doc["command"] == ["run a", "run b"]
    for method in ("plus", "plus-no-gradient-signal"):
        for key in ("auroc", "macro_f1_tpr95", "fpr95"):
            values = [r[key] for r in everything if r["method"] == method]
            assert doc["summary"][method][key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert doc["summary"][method][key]["std"] == pytest.approx(np.std(values), abs=1e-12)
    auroc = {m: np.mean([r["auroc"] for r in everything if r["method"] == m]) for m in ("plus", "plus-no-gradient-signal")}
    assert doc["summary"]["delta_auroc"] == pytest.approx(auroc["plus"] - auroc["plus-no-gradient-signal"], abs=1e-12)
    md = (tmp_path / "m" / "set1" / "gradient_contribution.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:] == ["1", "2", "3", "mean"]
    again = subprocess.run([sys.executable, str(script), "--merge", str(tmp_path / "n"), str(tmp_path / "a"),
                            str(tmp_path / "m"), "--set", "set1"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(script).parents[1] / "src")})
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "already merged" in again.stderr
    assert not (tmp_path / "n").exists()
    # a set missing from one folder: refused before the sets that could be merged are written
    (tmp_path / "a" / "set2").mkdir()
    (tmp_path / "a" / "set2" / "gradient_contribution.json").write_text(
        (tmp_path / "a" / "set1" / "gradient_contribution.json").read_text())
    partial = subprocess.run([sys.executable, str(script), "--merge", str(tmp_path / "k"), str(tmp_path / "a"),
                              str(tmp_path / "b"), "--set", "set1", "--set", "set2"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(script).parents[1] / "src")})
    assert partial.returncode == 2 and len(partial.stderr.strip().splitlines()) == 1 and "set2" in partial.stderr
    assert not (tmp_path / "k").exists()
