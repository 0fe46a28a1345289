"""The README's "Cost" table from a benchmark's results.json: each method's scoring
time per 1,000 samples in units of one forward pass of the classifier over the same
samples (``score_ms_per_1k / forward_ms_per_1k``, means over splits), and its fit time.

    python benchmarks/cost_table.py RUN/results.json
"""

from __future__ import annotations

import json
import sys


def cost_table(doc: dict) -> str:
    from gradosr.detectors.registry import family_order

    cost = doc.get("cost") or {}
    lines = ["| method | scoring, × one forward pass | scoring ms / 1k | fit s |", "|---|---|---|---|"]
    for m in family_order(list(cost)):
        c = cost[m]
        if not c.get("forward_ms_per_1k") or c.get("score_ms_per_1k") is None:
            continue
        rel = c["score_ms_per_1k"] / c["forward_ms_per_1k"]
        fit = "–" if c.get("fit_s") is None else f"{c['fit_s']:.2f}"
        lines.append(f"| {m} | {rel:.2f} | {c['score_ms_per_1k']:.1f} | {fit} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(cost_table(json.loads(open(sys.argv[1]).read())))
