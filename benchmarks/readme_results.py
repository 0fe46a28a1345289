"""Regenerate the README's "Results" tables from ``reports/*/results.json``, and the
tables of ``docs/ablation.md`` from ``reports/ablation-*/results.json``.

Usage::

    PYTHONPATH=src python benchmarks/readme_results.py          # rewrite README.md and docs/ablation.md
    PYTHONPATH=src python benchmarks/readme_results.py --print  # print the README section only

The section between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced
(and the synthetic-set table, and issue 21's targets table of ``issue_targets.py``):
per protocol, its heading, the command that produced it, its wall time, the five
methods of highest mean AUROC and the benchmark's mean ± std table
(:func:`gradosr.evaluation.tables.markdown_table`, grouped by family).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradosr.evaluation.tables import markdown_table

import issue_targets  # benchmarks/, beside this script

ROOT = Path(__file__).resolve().parent.parent
REPORTS = [
    ("mnist-sample", "mnist-sample ({n} standard splits, 6 known / 4 unknown digits)"),
    ("fashion-mnist", "fashion-mnist (the same {n} class splits)"),
    ("cross-mnist-sample-to-fashion-mnist",
     "cross-dataset: all mnist-sample digits known, fashion-mnist unknowns 1:1 ({n} seeds)"),
    ("cross-fashion-mnist-to-mnist-sample",
     "cross-dataset: all fashion-mnist classes known, mnist-sample unknowns 1:1 ({n} seeds)"),
]
#: the test protocols of docs/ablation.md (round 3): fresh splits and seeds, plus run unchanged
TEST_REPORTS = [
    ("test-fashion-mnist-seeds-101-105",
     "test protocol: fashion-mnist, fresh random class splits (split seeds 101-105, {n} splits)"),
    ("test-cross-mnist-sample-to-fashion-mnist",
     "test protocol: all mnist-sample digits known, fashion-mnist unknowns (fresh seeds 10-14, {n} seeds)"),
    ("test-cross-fashion-mnist-to-mnist-sample",
     "test protocol: all fashion-mnist classes known, mnist-sample unknowns (fresh seeds 10-14; {n} of them run)"),
]
#: fashion-mnist known against every synthetic set (one folder per set)
SYNTHETIC = "test-cross-fashion-mnist-to-synthetic"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SYN_START, SYN_END = "<!-- synthetic:start -->", "<!-- synthetic:end -->"
TARGETS_START, TARGETS_END = "<!-- targets:start -->", "<!-- targets:end -->"
TABLES_START, TABLES_END = "<!-- tables:start -->", "<!-- tables:end -->"
ABLATIONS = [
    ("mnist-sample", "Table 1: mnist-sample (tuning protocol), every variant"),
    ("fashion-mnist", "Table 2: fashion-mnist, the plus family (plus fixed beforehand)"),
    ("cross-mnist-sample-to-fashion-mnist", "Table 3: mnist-sample known, fashion-mnist unknown, the plus family"),
    ("cross-fashion-mnist-to-mnist-sample", "Table 4: fashion-mnist known, mnist-sample unknown, the plus family"),
]


def section() -> str:
    parts = []
    for folder, title in REPORTS + TEST_REPORTS:
        path = ROOT / "reports" / folder / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        commands = [c.replace(str(ROOT) + "/", "") for c in doc.get("commands") or [doc["command"]]]
        ran = (f"`{commands[0]}`" if len(commands) == 1 else
               "merged (`benchmarks/merge_results.py`) from " + " and ".join(f"`{c}`" for c in commands))
        parts += [f"### {title.format(n=len(doc.get('splits', [])))}", "", f"{ran} ({'last run' if len(commands) == 1 else 'its runs took'} {doc.get('seconds', 0):.0f} s on 2 CPU cores; "
                  "a rerun reuses the stored classifiers and cached scores)", "",
                  "Top five by mean AUROC: " + top_five(doc["summary"]) + ".", "",
                  markdown_table(doc["summary"]), ""]
    return "\n".join(parts)


def synthetic_table() -> str:
    """Per synthetic set of :data:`SYNTHETIC`: plus, the best other method, Mahalanobis and
    the paper preset (mean ± std AUROC over the seeds), and plus's FPR@95TPR."""
    root = ROOT / "reports" / SYNTHETIC
    rows, command, n = [], "", 0
    for path in sorted(root.glob("*/results.json")):
        doc = json.loads(path.read_text())
        s, command, n = doc["summary"], doc["command"], len(doc.get("splits", []))
        best, _ = issue_targets.best_other(s, "auroc")

        def cell(m):
            return f"{s[m]['auroc']['mean']:.4f} ± {s[m]['auroc']['std']:.4f}" if m in s else "–"

        rows.append(f"| {path.parent.name} | {cell('plus')} | {s['plus']['fpr95']['mean']:.4f} | {best} "
                    f"({cell(best)}) | {cell('mahalanobis')} | {cell('paper')} |")
    if not rows:
        return ""
    return "\n".join([f"`{command.replace(str(ROOT) + '/', '')}` ({n} seeds; report in `reports/{SYNTHETIC}/`)", "",
                      "| unknown set | plus AUROC | plus FPR@95TPR | best other method (AUROC) | mahalanobis | paper |",
                      "|---|---|---|---|---|---|", *rows])


def top_five(summary: dict) -> str:
    """The five methods of highest mean AUROC, ``method mean ± std`` each."""
    best = sorted(summary, key=lambda m: -summary[m]["auroc"]["mean"])[:5]
    return ", ".join(f"`{m}` {summary[m]['auroc']['mean']:.3f} ± {summary[m]['auroc']['std']:.3f}" for m in best)


def ablation_tables() -> str:
    from gradosr.evaluation.ablation import markdown

    parts = []
    for folder, title in ABLATIONS:
        path = ROOT / "reports" / f"ablation-{folder}" / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        table = markdown(doc).split("| variant |", 1)[1]
        commands = [c.replace(str(ROOT) + "/", "") for c in doc.get("commands") or [doc["command"]]]
        parts += [f"### {title}", "", *[f"- `{c}`" for c in commands], "", "| variant |" + table]
    return "\n".join(parts)


def replace_between(path: Path, start: str, end: str, text: str) -> None:
    content = path.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the section instead of rewriting README.md")
    args = parser.parse_args()
    text = section()
    if args.print:
        print(text)
        return
    replace_between(ROOT / "README.md", START, END, text)
    synthetic = synthetic_table()
    if synthetic:
        replace_between(ROOT / "README.md", SYN_START, SYN_END, synthetic)
    replace_between(ROOT / "README.md", TARGETS_START, TARGETS_END,
                    issue_targets.markdown(*issue_targets.rows(ROOT / "reports")))
    replace_between(ROOT / "docs" / "ablation.md", TABLES_START, TABLES_END, ablation_tables())


if __name__ == "__main__":
    main()
