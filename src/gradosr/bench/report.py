"""Tables of benchmark results: raw records as CSV, mean ± std as Markdown."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from gradosr.checkpoint import atomic_write_text

#: (key, column title, higher is better)
COLUMNS = (
    ("auroc", "AUROC", True),
    ("aupr_in", "AUPR-in", True),
    ("aupr_out", "AUPR-out", True),
    ("fpr95", "FPR@95TPR", False),
    ("macro_f1", "macro-F1", True),
    ("macro_f1_tpr95", "macro-F1@TPR95", True),
    ("oscr", "OSCR", True),
    ("closed_acc", "closed acc.", True),
)
CSV_FIELDS = ("method", "split", "auroc", "aupr_in", "aupr_out", "fpr95", "macro_f1", "macro_f1_tpr95", "oscr",
              "closed_acc", "threshold", "threshold_rule", "seconds")


def write_csv(path: Path, records: list[dict]) -> None:
    """One row per (method, split) record."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buf.getvalue())


def markdown_table(summary: dict) -> str:
    """Mean ± std per method and metric (3 decimals); the best mean of each column in
    bold (ties included; lowest for FPR@95TPR)."""
    methods = list(summary)
    lines = ["| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    best = {}
    for key, _, higher in COLUMNS:
        means = [round(summary[m][key]["mean"], 3) for m in methods if key in summary[m]]
        if means:
            best[key] = max(means) if higher else min(means)
    for m in methods:
        cells = []
        for key, _, _ in COLUMNS:
            s = summary[m].get(key)
            if s is None:
                cells.append("–")
                continue
            text = f"{s['mean']:.3f} ± {s['std']:.3f}"
            cells.append(f"**{text}**" if round(s["mean"], 3) == best[key] else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, doc: dict) -> None:
    """``results.md``: the command, the table and how each number was obtained."""
    splits = [s["split"] for s in doc.get("splits", [])]
    params = doc.get("method_params", {})
    lines = [
        f"# Benchmark: {doc.get('protocol')}",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Mean ± std (population, ddof 0) over splits {splits}; higher = better except FPR@95TPR. "
        "Scores: higher = more likely known. `macro-F1` is at each method's own threshold rule "
        "(the paper preset: its fixed P(known) threshold 0.95; the plus preset and the baselines: "
        "95% of held-out knowns accepted); "
        "`macro-F1@TPR95` uses the 95%-acceptance threshold on held-out knowns for every method. "
        "No unknown class is used to fit or tune anything.",
        "",
        markdown_table(doc["summary"]),
        "",
        "Method parameters:",
        "",
    ]
    for method, p in params.items():
        lines.append(f"- `{method}`: `{p}`")
    lines += ["", f"Versions: `{doc['versions']}`; total time {doc.get('seconds')} s.", ""]
    atomic_write_text(path, "\n".join(lines))
