"""Tables of results: one renderer (:func:`render`, Markdown or plain text) for the
benchmark's mean ± std table, the command line's summary and the ablation table, and
the CSV of the raw records."""

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
#: the plain-text summary's columns
TEXT_KEYS = ("auroc", "macro_f1", "macro_f1_tpr95", "oscr", "closed_acc")
CSV_FIELDS = ("method", "family", "own", "split", "auroc", "aupr_in", "aupr_out", "fpr95", "macro_f1", "macro_f1_tpr95", "oscr",
              "closed_acc", "threshold", "threshold_rule", "seconds", "fit_s", "score_s", "score_ms_per_1k",
              "forward_ms_per_1k", "cached")


def render(header: list[str], rows: list[list[str]], fmt: str = "markdown") -> str:
    """A table of strings: Markdown (``| a | b |``) or plain text (columns padded to their
    width, two spaces apart)."""
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def mean_std(stats: dict | None, digits: int = 3) -> str:
    """``mean ± std`` of one summary cell (``–`` when absent)."""
    return "–" if stats is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def summary_table(summary: dict, columns=COLUMNS, fmt: str = "markdown", digits: int = 3,
                  bold_best: bool = True, extra: dict[str, dict[str, str]] | None = None) -> str:
    """One row per method, grouped by family (gradosr's own presets marked ★), mean ± std
    per metric, then the columns of ``extra`` ({title: {method: text}}); with ``bold_best`` (Markdown) the best mean of each column in bold (ties
    included; lowest for FPR@95TPR)."""
    from gradosr.detectors.registry import describe, family_order

    methods = family_order(list(summary))
    best = {}
    for key, _, higher in columns:
        means = [round(summary[m][key]["mean"], digits) for m in methods if key in summary[m]]
        if means:
            best[key] = max(means) if higher else min(means)
    rows = []
    for m in methods:
        family, own = describe(m)
        cells = [f"{m} ★" if own and fmt == "markdown" else m, family or "–"]
        for key, _, _ in columns:
            s = summary[m].get(key)
            text = mean_std(s, digits)
            bold = bold_best and fmt == "markdown" and s is not None and round(s["mean"], digits) == best[key]
            cells.append(f"**{text}**" if bold else text)
        rows.append(cells + [col.get(m, "–") for col in (extra or {}).values()])
    return render(["method", "family"] + [title for _, title, _ in columns] + list(extra or {}), rows, fmt)


def markdown_table(summary: dict, cost: dict | None = None) -> str:
    """The benchmark's table (3 decimals, best in bold), with the cost columns of
    ``cost`` ({method: {"score_ms_per_1k", "fit_s", ...}}, records.cost_summary)."""
    if not cost:
        return summary_table(summary)

    def column(key: str, fmt: str) -> dict[str, str]:
        return {m: format(c[key], fmt) for m, c in cost.items() if c.get(key) is not None}

    return summary_table(summary, extra={"ms/1k": column("score_ms_per_1k", ".1f"), "fit s": column("fit_s", ".2f"),
                                         "forward ms/1k": column("forward_ms_per_1k", ".1f")})


def format_table(summary: dict, keys: tuple[str, ...] = TEXT_KEYS) -> str:
    """The plain-text summary the command line prints (4 decimals)."""
    columns = [(k, k, True) for k in keys]
    return summary_table(summary, columns, fmt="text", digits=4, bold_best=False)


def write_csv(path: Path, records: list[dict]) -> None:
    """One row per (method, split) record."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buf.getvalue())
