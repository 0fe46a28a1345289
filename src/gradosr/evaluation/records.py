"""Results records (docs/design.md, "Results schema"): the metrics of one method on one
split, their mean ± std over splits, and the results document."""

from __future__ import annotations

import platform
import sys

import numpy as np

from gradosr import metrics

METRIC_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "macro_f1", "macro_f1_tpr95", "oscr", "closed_acc")


def results_record(method: str, split, y_true: np.ndarray, closed_pred: np.ndarray, scores: np.ndarray,
                   val_scores: np.ndarray, num_known: int, threshold: float | None = None,
                   threshold_rule: str = "tpr95-val") -> dict:
    """One results record.

    Args:
        y_true: N labels, 0..K-1 for knowns, -1 for unknowns.
        closed_pred: N closed-set argmax predictions.
        scores: N test scores (higher = known).
        val_scores: scores of the held-out known validation images; the threshold that
            accepts 95% of them gives ``macro_f1_tpr95`` (and ``macro_f1`` when
            ``threshold`` is None).
        threshold: the method's own acceptance threshold (e.g. the paper's 0.95), or None.
        threshold_rule: how ``threshold`` was set, recorded as is.
    """
    y_true = np.asarray(y_true)
    closed_pred = np.asarray(closed_pred)
    scores = np.asarray(scores, dtype=np.float64)
    is_known = y_true != -1
    t95 = metrics.threshold_at_tpr(val_scores, 0.95)
    own = t95 if threshold is None else float(threshold)
    return {
        "method": method,
        "split": split,
        "auroc": metrics.auroc(scores, is_known),
        "aupr_in": metrics.aupr_in(scores, is_known),
        "aupr_out": metrics.aupr_out(scores, is_known),
        "fpr95": metrics.fpr_at_tpr(scores, is_known, 0.95),
        "macro_f1": metrics.macro_f1_open(y_true, metrics.open_set_predictions(closed_pred, scores, own), num_known),
        "macro_f1_tpr95": metrics.macro_f1_open(y_true, metrics.open_set_predictions(closed_pred, scores, t95), num_known),
        "oscr": metrics.oscr(y_true, closed_pred, scores),
        "closed_acc": metrics.closed_set_accuracy(y_true, closed_pred),
        "threshold": own,
        "threshold_rule": "tpr95-val" if threshold is None else threshold_rule,
    }


def summarise(records: list[dict]) -> dict:
    """{method: {metric: {"mean", "std"}}} over splits; std is the population std (ddof 0)."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        out[method] = {}
        for key in METRIC_KEYS:
            vals = np.array([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
            if len(vals):
                out[method][key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=0)), "n": int(len(vals))}
    return out


#: the cost keys of every record (measured in the run that computed it)
COST_KEYS = ("fit_s", "score_s", "score_ms_per_1k", "forward_ms_per_1k")


def cost_summary(records: list[dict]) -> dict:
    """{method: {cost key: mean over the splits that measured it}}."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == method]
        out[method] = {k: float(np.mean(v)) for k in COST_KEYS
                       if (v := [r[k] for r in rows if r.get(k) is not None])}
    return out


def versions() -> dict:
    """Versions of Python and the libraries that shape results."""
    import sklearn
    import torch

    import gradosr

    return {"gradosr": gradosr.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "platform": platform.platform()}


def results_document(command: str, records: list[dict], extra: dict | None = None) -> dict:
    """The results JSON (schema version 1)."""
    return {"schema": 1, "command": command, "versions": versions(), **(extra or {}),
            "results": records, "summary": summarise(records)}
