"""PNG plots of a benchmark: ROC and OSCR curves per split (gradosr's presets and the
five best other methods, or all on request), and score histograms of knowns vs unknowns
per method (one panel per split) with the method's threshold marked."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from gradosr.checkpoint import atomic_write_bytes
from gradosr.metrics import auroc, oscr, oscr_curve, roc_curve, threshold_at_tpr


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


#: how many of the other methods the ROC and OSCR plots show next to gradosr's presets
TOP_OTHERS = 5
_STYLES = ("-", "--", "-.", ":")


def curve_style(i: int) -> dict:
    """The i-th curve's colour and line style: 10 colours × 4 styles, no two alike up to 40."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return {"color": colours[i % len(colours)], "ls": _STYLES[(i // len(colours)) % len(_STYLES)]}


def shown_methods(scores: dict, y_true: np.ndarray, plot_all: bool = False) -> list[str]:
    """gradosr's own presets and the ``TOP_OTHERS`` other methods of highest AUROC on this
    split (every method with ``plot_all``), by decreasing AUROC."""
    from gradosr.detectors.registry import describe

    ranked = sorted(scores, key=lambda m: -auroc(scores[m].test, y_true != -1))
    if plot_all:
        return ranked
    own = [m for m in ranked if describe(m)[1]]
    return own + [m for m in ranked if m not in own][:TOP_OTHERS]


def write_plots(folder: Path, all_scores: dict, plot_all: bool = False) -> list[Path]:
    """Write the plots; ``all_scores``: {split: {"y_true", "closed_pred", "scores":
    {method: SplitScores}}}. ROC and OSCR curves per split show :func:`shown_methods`,
    each legend entry with its AUROC (OSCR); a histogram of known and unknown scores per
    method marks the method's threshold. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for split, d in all_scores.items():
        y, pred = d["y_true"], d["closed_pred"]
        shown = shown_methods(d["scores"], y, plot_all)
        for kind, title in (("roc", "ROC (known = positive)"), ("oscr", "OSCR")):
            fig, ax = plt.subplots(figsize=(5.5, 4.8))
            for i, method in enumerate(shown):
                s = d["scores"][method]
                if kind == "roc":
                    x, yy = roc_curve(s.test, y != -1)
                    label = f"{method} ({auroc(s.test, y != -1):.3f})"
                else:
                    x, yy = oscr_curve(y, pred, s.test)
                    label = f"{method} ({oscr(y, pred, s.test):.3f})"
                ax.plot(x, yy, label=label, lw=1.2, **curve_style(i))
            ax.set_xlabel("FPR (unknowns accepted)")
            ax.set_ylabel("TPR (knowns accepted)" if kind == "roc" else "CCR (knowns accepted and correct)")
            what = "all methods" if plot_all else f"gradosr's presets and the {TOP_OTHERS} best others"
            ax.set_title(f"{title}, split {split}\n{what}; legend: AUROC" + (" " if kind == "roc" else " → OSCR"),
                         fontsize=9)
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls=":")
            ax.legend(fontsize=6.5, loc="lower right")
            path = folder / f"{kind}_split{split}.png"
            _save(fig, path)
            plt.close(fig)
            written.append(path)
    methods = list(next(iter(all_scores.values()))["scores"]) if all_scores else []
    for method in methods:
        n = len(all_scores)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
        for ax, (split, d) in zip(axes[0], all_scores.items()):
            sc = d["scores"][method]
            s = np.asarray(sc.test)
            known = d["y_true"] != -1
            finite = s[np.isfinite(s)]
            bins = np.histogram_bin_edges(finite, bins=40) if len(finite) else 10
            ax.hist(s[known], bins=bins, alpha=0.6, label="known", density=True)
            ax.hist(s[~known], bins=bins, alpha=0.6, label="unknown", density=True)
            t = sc.threshold if sc.threshold is not None else threshold_at_tpr(sc.val, 0.95)
            ax.axvline(t, color="black", lw=1.0, ls="--", label="threshold")
            ax.set_title(f"{method}, split {split}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        path = folder / f"hist_{method}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
