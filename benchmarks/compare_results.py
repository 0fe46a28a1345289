"""Compare the per-variant metrics of two ablation/benchmark ``results.json`` files.

Both files hold a ``results`` list of rows with ``method``, ``split`` and the metrics (a
full ``results.json`` of ``gradosr ablate`` / ``gradosr benchmark``, or a trimmed fixture
such as ``tests/fixtures/ablation_split1_before.json``). Every (method, split) row of
BEFORE must be in AFTER and the reverse, with every compared metric equal to ``--tol``.

Usage::

    python benchmarks/compare_results.py BEFORE AFTER [--tol 1e-6] [--metrics auroc,macro_f1]

Prints one line per row and the largest absolute difference per metric; exits 1 on a
missing row, a missing metric or a difference above ``--tol``, 2 on an unreadable file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load_rows(path: Path) -> dict[tuple[str, object], dict]:
    """``{(method, split): row}`` of the ``results`` list of a results JSON file."""
    data = json.loads(path.read_text())
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: no 'results' list")
    out = {}
    for row in rows:
        key = (row["method"], row.get("split"))
        if key in out:
            raise ValueError(f"{path}: duplicate row {key}")
        out[key] = row
    return out


def compare(before: dict, after: dict, metrics: list[str], tol: float
            ) -> tuple[list[str], dict[str, float], bool]:
    """Report lines, the largest absolute difference per metric, and whether all match."""
    lines, worst, ok = [], {m: 0.0 for m in metrics}, True
    for key in sorted(set(before) | set(after), key=str):
        label = f"{key[0]} (split {key[1]})"
        if key not in before or key not in after:
            lines.append(f"MISSING {label}: only in {'before' if key in before else 'after'}")
            ok = False
            continue
        cells = []
        for m in metrics:
            a, b = before[key].get(m), after[key].get(m)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                cells.append(f"{m} missing")
                ok = False
                continue
            diff = abs(a - b) if not (math.isnan(a) and math.isnan(b)) else 0.0
            worst[m] = max(worst[m], diff)
            bad = not diff <= tol
            ok = ok and not bad
            cells.append(f"{m} {a:.6f} -> {b:.6f}{' MISMATCH' if bad else ''}")
        lines.append(f"{label}: " + ", ".join(cells))
    return lines, worst, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--tol", type=float, default=1e-6, help="largest allowed |difference|")
    ap.add_argument("--metrics", default="auroc,macro_f1", help="comma-separated metric keys")
    args = ap.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        before, after = load_rows(args.before), load_rows(args.after)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines, worst, ok = compare(before, after, metrics, args.tol)
    print("\n".join(lines))
    print(f"{len(set(before) & set(after))} rows compared; max |diff|: "
          + ", ".join(f"{m} {v:.3g}" for m, v in worst.items())
          + f"; tol {args.tol:g}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
