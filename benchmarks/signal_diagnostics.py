"""What each of the ``plus`` preset's signals does alone, and how they move together.

    PYTHONPATH=src python benchmarks/signal_diagnostics.py [--protocol mnist-sample] [--splits 0-4] [--out DIR]

Per split: the ``plus`` preset is fitted on the protocol's classifier (trained as
``gradosr fit`` trains it, into ``--out``), every signal of its fused detector is scored on
the test images (:func:`gradient_contribution._signal_scores`), and the script prints

- each signal's AUROC alone (known test against unknown test; scikit-learn's
  ``roc_auc_score``, higher = known);
- the Spearman correlations between the signals on the held-out knowns (the validation
  split) and on the unknown test images.

It answers "is the gradient signal a copy of the others, or noise beside them?"
(docs/ablation.md, "Where issue 21 ends"). No unknown is used for fitting; the unknown
test images only enter the AUROC and the second correlation matrix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradient_contribution import _signal_scores  # noqa: E402  (benchmarks/, beside this script)

from gradosr.data import load_protocol, resolve_protocol  # noqa: E402
from gradosr.data.protocols import parse_index_list  # noqa: E402
from gradosr.evaluation.scoring import test_labels, test_source  # noqa: E402
from gradosr.osr import GradientOSR  # noqa: E402


def split_diagnostics(protocol: str, split: int, run_dir: Path) -> dict:
    """Signal names, their AUROCs alone, and their Spearman matrices (validation knowns,
    unknown test images) for one split."""
    data = load_protocol(resolve_protocol(protocol, split=split))
    osr = GradientOSR().fit(data, run_dir=run_dir)
    test, _ = _signal_scores(osr, test_source(data))
    val, _ = _signal_scores(osr, data.val)
    known = test_labels(data) >= 0
    names = list(test)
    return {"names": names,
            "auroc": {n: float(roc_auc_score(known, test[n])) for n in names},
            "corr_known": spearmanr(np.column_stack([val[n] for n in names])).correlation,
            "corr_unknown": spearmanr(np.column_stack([test[n][~known] for n in names])).correlation}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--protocol", default="mnist-sample")
    ap.add_argument("--splits", default="0-4")
    ap.add_argument("--out", type=Path, default=Path("runs/signal-diagnostics"))
    args = ap.parse_args(argv)
    rows = []
    for split in parse_index_list(args.splits, "--splits"):
        rows.append(split_diagnostics(args.protocol, split, args.out / f"split{split}"))
        print(f"split {split}: AUROC alone " + ", ".join(f"{n} {a:.4f}" for n, a in rows[-1]["auroc"].items()),
              flush=True)
    names = rows[0]["names"]
    print(f"\nmean over {len(rows)} splits, AUROC alone: "
          + ", ".join(f"{n} {np.mean([r['auroc'][n] for r in rows]):.4f}" for n in names))
    for key, what in (("corr_known", "held-out knowns"), ("corr_unknown", "unknown test images")):
        m = np.mean([r[key] for r in rows], axis=0)
        print(f"\nSpearman correlation on the {what} (mean over splits):")
        print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for n, line in zip(names, m):
            print(f"| {n} | " + " | ".join(f"{v:+.3f}" for v in line) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
