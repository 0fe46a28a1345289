"""The benchmark scripts run end to end at toy sizes (their full runs are separate
commands): ``benchmarks/scoring.py`` writes the issue's keys and ``--append`` adds rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"method", "backend", "bank", "dim", "queries", "fit_s", "score_s", "peak_mb", "bank_mb"}


def _scoring(out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scoring.py"), "--banks", "300,600", "--dim", "8",
           "--queries", "50", "--threads", "1", "--fit-repeats", "1", "--backends", "torch",
           "--bank-dtypes", "float32", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads((out / "scoring.json").read_text())


def test_scoring_benchmark_records_and_append(tmp_path):
    doc = _scoring(tmp_path, "--methods", "knn,mahalanobis_ml")
    recs = doc["records"]
    assert [(r["method"], r["bank"]) for r in recs] == [("knn", 300), ("mahalanobis_ml", 300),
                                                         ("knn", 600), ("mahalanobis_ml", 600)]
    for r in recs:
        assert KEYS <= set(r) and "error" not in r, r
        assert r["bank_mb"] == round(r["bank"] * 8 * 4 / 2**20, 1) and 0.0 <= r["auroc"] <= 1.0
    assert any(t.startswith("- knn (torch, float32) ×2 bank") for t in doc["targets"])
    again = _scoring(tmp_path, "--methods", "mahalanobis", "--banks", "600", "--append")
    keys = [(r["method"], r["bank"]) for r in again["records"]]
    assert keys == [("knn", 300), ("mahalanobis_ml", 300), ("knn", 600), ("mahalanobis_ml", 600), ("mahalanobis", 600)]
    assert again["records"][:4] == recs  # the earlier rows as they were
    assert again["command"].count("benchmarks/scoring.py") == 2 and "--append" in again["command"]
    md = (tmp_path / "scoring.md").read_text()
    assert md.count("| mahalanobis |") == 1 and md.count("| knn |") == 2
