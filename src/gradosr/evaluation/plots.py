"""PNG plots of a benchmark: ROC and OSCR curves per split (all methods), and score
histograms of knowns vs unknowns per method (one panel per split)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gradosr.checkpoint import atomic_write_bytes
from gradosr.metrics import oscr_curve, roc_curve


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_plots(folder: Path, all_scores: dict) -> list[Path]:
    """Write the plots; ``all_scores``: {split: {"y_true", "closed_pred", "scores":
    {method: SplitScores}}}. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split, d in all_scores.items():
        y, pred = d["y_true"], d["closed_pred"]
        for kind, title in (("roc", "ROC (known = positive)"), ("oscr", "OSCR")):
            fig, ax = plt.subplots(figsize=(5, 4.5))
            for method, s in d["scores"].items():
                x, yy = roc_curve(s.test, y != -1) if kind == "roc" else oscr_curve(y, pred, s.test)
                ax.plot(x, yy, label=method, lw=1.2)
            ax.set_xlabel("FPR (unknowns accepted)")
            ax.set_ylabel("TPR (knowns accepted)" if kind == "roc" else "CCR (knowns accepted and correct)")
            ax.set_title(f"{title}, split {split}")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
            ax.legend(fontsize=7, loc="lower right")
            path = folder / f"{kind}_split{split}.png"
            _save(fig, path)
            plt.close(fig)
            written.append(path)
    methods = list(next(iter(all_scores.values()))["scores"]) if all_scores else []
    for method in methods:
        n = len(all_scores)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
        for ax, (split, d) in zip(axes[0], all_scores.items()):
            s = np.asarray(d["scores"][method].test)
            known = d["y_true"] != -1
            bins = np.histogram_bin_edges(s[np.isfinite(s)], bins=40)
            ax.hist(s[known], bins=bins, alpha=0.6, label="known", density=True)
            ax.hist(s[~known], bins=bins, alpha=0.6, label="unknown", density=True)
            ax.set_title(f"{method}, split {split}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        path = folder / f"hist_{method}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
