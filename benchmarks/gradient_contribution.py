"""What the ``plus`` preset's gradient signal adds, on the classifiers of a benchmark.

    PYTHONPATH=src python benchmarks/gradient_contribution.py REPORT [REPORT ...] [--set NAME]

For every split of a ``gradosr benchmark --out REPORT`` folder (its ``results.json``,
``runs/<split>/plus`` and ``cache/``), the fitted ``plus`` preset is loaded and its four
signals are scored on the split's test and validation images. Two detectors are then
compared on the same classifier and the same signal scores:

- ``plus``: Fisher's combination of all four signals (its calibrator refitted on the
  validation split, as the fit does; the scores are checked against the benchmark's
  cached ``plus`` scores, which they must equal to 1e-9);
- ``plus-no-gradient-signal``: the non-gradient control of docs/ablation.md (round 3),
  the same without the ``gradient`` signal, i.e. the activation signal, the feature kNN
  and the max logit combined and calibrated the same way: the ablation row
  ``plus-kfac-act`` (whose gradient-slot signal is the activation Mahalanobis).

Both are evaluated like the benchmark (:func:`gradosr.evaluation.records.results_record`,
threshold accepting 95% of the validation knowns). Writes
``REPORT/gradient_contribution.{json,md}``: per split AUROC, macro-F1@TPR95 and FPR@95TPR
of both, and their means; ``--set`` names the unknown set of a multi-set report
(``REPORT/<set>/results.json``; the runs are shared). No unknown class is used for
anything but the metrics.

    PYTHONPATH=src python benchmarks/gradient_contribution.py --merge OUT A B ... [--set NAME]

merges the ``gradient_contribution.json`` of several report folders on disjoint splits
(seeds run in separate sessions, as ``benchmarks/merge_results.py`` merges their
``results.json``) into ``OUT``: every record as it was, the means recomputed over all of
them, every run's command listed. Every set is read and checked before any is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from gradosr.data.protocols import ProtocolSpec, load_protocol
from gradosr.detectors.calibration import FisherCombination
from gradosr.errors import GradOSRError
from gradosr.evaluation.records import results_record
from gradosr.evaluation.scoring import test_labels, test_source
from gradosr.metrics.ranking import threshold_at_tpr
from gradosr.osr import GradientOSR
from gradosr.streams import chunk_rows

CONTROL = "plus-no-gradient-signal"
KEYS = ("auroc", "macro_f1_tpr95", "fpr95")


def _signal_scores(osr: GradientOSR, source) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every signal's raw score (float64 N) and the closed-set argmax of the images of
    ``source``, chunk by chunk."""
    clf, method = osr.classifier_, osr.method_
    parts, preds = [], []
    for images in source.chunks(chunk_rows(method.config.extraction.batch_size)):
        inputs = method.inputs(clf, clf.inputs(images))
        parts.append(method.detector_.signal_scores(inputs))
        preds.append(inputs.logits.argmax(1).numpy())
    return {s: np.concatenate([p[s] for p in parts]) for s in parts[0]}, np.concatenate(preds)


def _cached_plus(folder: Path) -> np.ndarray | None:
    from gradosr.checkpoint import load_tensors
    from gradosr.evaluation.benchmark import SCORES_FORMAT

    try:
        return load_tensors(folder, "plus", SCORES_FORMAT)[0]["test"].numpy()
    except Exception:  # noqa: BLE001 - a missing cache is only a missing check
        return None


def split_records(report: Path, results: Path, entry: dict) -> list[dict]:
    spec = ProtocolSpec.from_dict(entry["protocol"])
    split = entry["split"]
    runs = [p for p in (report / "runs" / f"split{split}", report / "runs" / f"seed{split}") if (p / "plus").is_dir()]
    if not runs:
        raise SystemExit(f"{report}: no fitted plus for split {split} under runs/")
    osr = GradientOSR.load(runs[0] / "plus")
    data = load_protocol(spec)
    test, closed = _signal_scores(osr, test_source(data))
    val, _ = _signal_scores(osr, data.val)
    y_true = test_labels(data)
    out = []
    for name, signals in (("plus", list(test)), (CONTROL, [s for s in test if s != "gradient"])):
        cal = FisherCombination().fit({s: val[s] for s in signals})
        s_test, s_val = cal.combine({s: test[s] for s in signals}), cal.combine({s: val[s] for s in signals})
        if name == "plus":
            cached = _cached_plus(results / "cache" / runs[0].name)
            if cached is not None and not np.allclose(cached, s_test, rtol=0, atol=1e-9):
                raise SystemExit(f"{report} split {split}: recomputed plus scores differ from the benchmark's "
                                 f"(max |diff| {np.abs(cached - s_test).max():.3g})")
        rec = results_record(name, split, y_true, closed, s_test, s_val, spec.num_known,
                             threshold_at_tpr(s_val, 0.95), "tpr0.95-val")
        out.append({k: rec[k] for k in ("method", "split", *KEYS)})
    return out


def summarise(records: list[dict]) -> dict:
    out = {}
    for name in ("plus", CONTROL):
        rows = [r for r in records if r["method"] == name]
        out[name] = {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
                     for k in KEYS}
    out["delta_auroc"] = out["plus"]["auroc"]["mean"] - out[CONTROL]["auroc"]["mean"]
    return out


def markdown(name: str, records: list[dict], summary: dict) -> str:
    lines = [f"# What the gradient signal adds: {name}", "",
             "`plus` against its non-gradient control (`plus` without its `gradient` signal, = the ablation "
             "row `plus-kfac-act`), same classifiers and signal scores (benchmarks/gradient_contribution.py).", "",
             "| split | plus AUROC | control AUROC | Δ AUROC | plus macro-F1@TPR95 | control macro-F1@TPR95 | "
             "plus FPR@95TPR | control FPR@95TPR |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["split"], r["method"]): r for r in records}
    for split in dict.fromkeys(r["split"] for r in records):
        p, c = by[(split, "plus")], by[(split, CONTROL)]
        lines.append(f"| {split} | {p['auroc']:.4f} | {c['auroc']:.4f} | {p['auroc'] - c['auroc']:+.4f} | "
                     f"{p['macro_f1_tpr95']:.4f} | {c['macro_f1_tpr95']:.4f} | {p['fpr95']:.4f} | {c['fpr95']:.4f} |")
    p, c = summary["plus"], summary[CONTROL]
    lines.append(f"| mean | {p['auroc']['mean']:.4f} | {c['auroc']['mean']:.4f} | {summary['delta_auroc']:+.4f} | "
                 f"{p['macro_f1_tpr95']['mean']:.4f} | {c['macro_f1_tpr95']['mean']:.4f} | {p['fpr95']['mean']:.4f} | "
                 f"{c['fpr95']['mean']:.4f} |")
    return "\n".join(lines) + "\n"


def write(results: Path, commands: list[str], records: list[dict]) -> None:
    """``results/gradient_contribution.{json,md}`` from ``records``."""
    summary = summarise(records)
    (results / "gradient_contribution.json").write_text(
        json.dumps({"command": commands[0] if len(commands) == 1 else commands,
                    "records": records, "summary": summary}, indent=2) + "\n")
    (results / "gradient_contribution.md").write_text(markdown(results.name, records, summary))


def gather(folders: list[Path]) -> tuple[list[str], list[dict]]:
    """The commands and records of ``folder/gradient_contribution.json`` for every folder,
    in order; refuses an unreadable file or a split that two of them hold."""
    commands, records, seen = [], [], set()
    for folder in folders:
        try:
            doc = json.loads((folder / "gradient_contribution.json").read_text())
        except (OSError, ValueError) as exc:
            raise GradOSRError(f"{folder}: no readable gradient_contribution.json ({exc})") from None
        splits = {r["split"] for r in doc["records"]}
        if splits & seen:
            raise GradOSRError(f"{folder}: split(s) {sorted(splits & seen)} already merged")
        seen |= splits
        cmd = doc["command"]
        commands += cmd if isinstance(cmd, list) else [cmd]
        records += doc["records"]
    return commands, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="unknown set folder(s) of a multi-set report (default: the report itself)")
    ap.add_argument("--merge", action="store_true",
                    help="merge the gradient_contribution.json of REPORTS[1:] into REPORTS[0] (per --set)")
    args = ap.parse_args(argv)
    if args.merge:
        if len(args.reports) < 2:
            ap.error("--merge needs OUT and at least one report folder")
        out, sources = args.reports[0], args.reports[1:]
        names = args.sets or [""]
        try:  # every set is read and checked before any is written
            merged = {name: gather([p / name for p in sources]) for name in names}
        except GradOSRError as exc:
            print(f"gradient_contribution: error: {exc}", file=sys.stderr)
            return 2
        for name, (commands, records) in merged.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            write(out / name, commands, records)
            print((out / name / "gradient_contribution.md").read_text())
        return 0
    for report in args.reports:
        for results in ([report / s for s in args.sets] if args.sets else [report]):
            doc = json.loads((results / "results.json").read_text())
            records = []
            for entry in doc["splits"]:
                records += split_records(report, results, entry)
                print(json.dumps(records[-2:]), flush=True)
            write(results, ["python benchmarks/gradient_contribution.py " + " ".join(sys.argv[1:])], records)
            print((results / "gradient_contribution.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
