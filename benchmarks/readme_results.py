"""Regenerate the README's "Results" tables from ``reports/*/results.json``, and the
tables of ``docs/ablation.md`` from ``reports/ablation-*/results.json``.

Usage::

    PYTHONPATH=src python benchmarks/readme_results.py          # rewrite README.md and docs/ablation.md
    PYTHONPATH=src python benchmarks/readme_results.py --print  # print the README section only

The section between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced:
per protocol, its heading, the command that produced it, its wall time, the five
methods of highest mean AUROC and the benchmark's mean ± std table
(:func:`gradosr.evaluation.tables.markdown_table`, grouped by family).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gradosr.evaluation.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
REPORTS = [
    ("mnist-sample", "mnist-sample ({n} standard splits, 6 known / 4 unknown digits)"),
    ("fashion-mnist", "fashion-mnist (the same {n} class splits)"),
    ("cross-mnist-sample-to-fashion-mnist",
     "cross-dataset: all mnist-sample digits known, fashion-mnist unknowns 1:1 ({n} seeds)"),
    ("cross-fashion-mnist-to-mnist-sample",
     "cross-dataset: all fashion-mnist classes known, mnist-sample unknowns 1:1 ({n} seeds)"),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"
TABLES_START, TABLES_END = "<!-- tables:start -->", "<!-- tables:end -->"
ABLATIONS = [
    ("mnist-sample", "Table 1: mnist-sample (tuning protocol), every variant"),
    ("fashion-mnist", "Table 2: fashion-mnist, the plus family (plus fixed beforehand)"),
    ("cross-mnist-sample-to-fashion-mnist", "Table 3: mnist-sample known, fashion-mnist unknown, the plus family"),
    ("cross-fashion-mnist-to-mnist-sample", "Table 4: fashion-mnist known, mnist-sample unknown, the plus family"),
]


def section() -> str:
    parts = []
    for folder, title in REPORTS:
        path = ROOT / "reports" / folder / "results.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        parts += [f"### {title.format(n=len(doc.get('splits', [])))}", "", f"`{doc['command'].replace(str(ROOT) + '/', '')}` (last run {doc.get('seconds', 0):.0f} s on 2 CPU cores; "
                  "a rerun reuses the stored classifiers and cached scores)", "",
                  "Top five by mean AUROC: " + top_five(doc["summary"]) + ".", "",
                  markdown_table(doc["summary"]), ""]
    return "\n".join(parts)


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
    replace_between(ROOT / "docs" / "ablation.md", TABLES_START, TABLES_END, ablation_tables())


if __name__ == "__main__":
    main()
