"""benchmarks/issue_targets.py: issue 21's rule (at least the best other method, a gap
under 0.001 a tie where both exceed 0.99; the gradient's mean Δ over the protocols)
against hand-worked cases and NumPy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "issue_targets.py"
_spec = importlib.util.spec_from_file_location("issue_targets", _PATH)
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


@pytest.mark.parametrize("ours,best,met", [
    (0.80, 0.79, True),       # ahead
    (0.80, 0.80, True),       # equal
    (0.9950, 0.9959, True),   # both above 0.99, gap 0.0009: a tie
    (0.9950, 0.9961, False),  # both above 0.99, gap 0.0011
    (0.9800, 0.9805, False),  # a small gap below 0.99 is no tie
    (0.9895, 0.9900, False),  # ours not above 0.99
])
def test_meets(ours, best, met):
    assert targets.meets(ours, best) is met


def _summary(means: dict[str, tuple[float, float, float]]) -> dict:
    return {m: {k: {"mean": v, "std": 0.0, "n": 3} for k, v in zip(("auroc", "macro_f1_tpr95", "fpr95"), vals)}
            for m, vals in means.items()}


def test_row_and_gradient_verdict():
    summary = _summary({"plus": (0.90, 0.70, 0.30), "knn": (0.92, 0.69, 0.2), "msp": (0.85, 0.75, 0.5)})
    rng = np.random.default_rng(1)
    records = [{"method": m, "split": s, "auroc": float(rng.uniform(0.8, 0.9)), "macro_f1_tpr95": float(rng.uniform(0.6, 0.7)),
                "fpr95": 0.1} for s in (2, 3) for m in ("plus", targets.CONTROL)]
    mean = {m: {k: float(np.mean([r[k] for r in records if r["method"] == m])) for k in ("auroc", "macro_f1_tpr95")}
            for m in ("plus", targets.CONTROL)}
    contribution = {"records": records, "summary": {m: {k: {"mean": v} for k, v in mean[m].items()} for m in mean}}
    r = targets.row("p", summary, contribution)
    assert r["auroc"]["best"] == "knn" and r["auroc"]["gap"] == pytest.approx(0.02) and not r["auroc"]["met"]
    assert r["macro_f1_tpr95"]["best"] == "msp" and not r["macro_f1_tpr95"]["met"]
    assert r["gradient"]["splits"] == [2, 3]
    assert r["gradient"]["auroc"] == pytest.approx(mean["plus"]["auroc"] - mean[targets.CONTROL]["auroc"])
    real = [{"gradient": {"auroc": d}} for d in (0.03, 0.004)]
    synthetic = [{"gradient": {"auroc": d}} for d in (0.001, 0.003)]
    v = targets.gradient_verdict(real, synthetic)  # the synthetic protocol counts once, as its sets' mean
    assert v["per_protocol"] == pytest.approx([0.03, 0.004, 0.002])
    assert v["mean"] == pytest.approx(0.012) and v["worst"] == pytest.approx(0.002) and v["met"]
    assert not targets.gradient_verdict(real[1:], synthetic)["met"]  # mean 0.003
    worst = targets.gradient_verdict([{"gradient": {"auroc": d}} for d in (0.05, -0.006)], [])
    assert worst["mean"] == pytest.approx(0.022) and not worst["met"]  # one protocol below -0.005
