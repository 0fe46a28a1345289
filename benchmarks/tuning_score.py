"""The tuning rule of docs/ablation.md (rounds 2-5), applied to the tuning suite's ablations.

    PYTHONPATH=src python benchmarks/tuning_score.py [--reports reports] [--markdown]

Reads ``<reports>/tuning-mnist-sample/results.json`` (part 1: mnist-sample splits 0-4)
and ``<reports>/tuning-synthetic-{gaussian,uniform,blobs,permuted}/results.json`` (part
2: all digits known, 3 seeds each). Per variant: part-1 mean AUROC, part-2 mean AUROC
over the 4 sets × 3 seeds, the score (their mean) and the same for macro-F1@TPR95. The
rule: the best score; among the variants within 0.002 of it the higher macro-F1@TPR95;
then fewer signals, then fewer options changed from plus. A variant missing from a
report is listed as incomplete and not chosen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SETS = ("gaussian", "uniform", "blobs", "permuted")
TIE = 0.002


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"] if path.is_file() else []


def scores(reports: Path) -> dict[str, dict]:
    part1 = _records(reports / "tuning-mnist-sample" / "results.json")
    part2 = {s: _records(reports / f"tuning-synthetic-{s}" / "results.json") for s in SETS}
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in part1):
        one = [r for r in part1 if r["method"] == name]
        two = {s: [r for r in part2[s] if r["method"] == name] for s in SETS}
        row = {"auroc_1": np.mean([r["auroc"] for r in one]), "f1_1": np.mean([r["macro_f1_tpr95"] for r in one]),
               "complete": len(one) == 5 and all(len(v) == 3 for v in two.values())}
        flat = [r for s in SETS for r in two[s]]
        row["auroc_2"] = np.mean([r["auroc"] for r in flat]) if flat else float("nan")
        row["f1_2"] = np.mean([r["macro_f1_tpr95"] for r in flat]) if flat else float("nan")
        for s in SETS:
            row[f"auroc_{s}"] = np.mean([r["auroc"] for r in two[s]]) if two[s] else float("nan")
        row["score"], row["f1"] = (row["auroc_1"] + row["auroc_2"]) / 2, (row["f1_1"] + row["f1_2"]) / 2
        cfg = one[0].get("config", {})
        fusion = cfg.get("fusion", {})
        row["signals"] = len(fusion.get("signals", ())) or 99
        out[name] = row
    return out


def choose(table: dict[str, dict], options_changed: dict[str, int] | None = None) -> str | None:
    """The rule of docs/ablation.md (rounds 2-5) over the complete variants."""
    done = {k: v for k, v in table.items() if v["complete"]}
    if not done:
        return None
    best = max(v["score"] for v in done.values())
    near = [k for k, v in done.items() if v["score"] >= best - TIE]
    changed = options_changed or {}
    return sorted(near, key=lambda k: (-done[k]["f1"], done[k]["signals"], changed.get(k, 0)))[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reports", default="reports")
    args = p.parse_args()
    from gradosr.evaluation.ablation import VARIANTS

    table = scores(Path(args.reports))
    changed = {v.name: len(v.options) for v in VARIANTS}
    cols = ["auroc_1", "auroc_2", *[f"auroc_{s}" for s in SETS], "score", "f1"]
    print("| variant | near (1) | far (2) | " + " | ".join(SETS) + " | score | macro-F1@TPR95 |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in sorted(table.items(), key=lambda kv: -kv[1]["score"]):
        mark = "" if row["complete"] else " (incomplete)"
        print(f"| {name}{mark} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    print(f"\nchosen by the rule: {choose(table, changed)}")


if __name__ == "__main__":
    main()
