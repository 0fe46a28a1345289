"""``gradosr benchmark``: train (or reuse) one classifier per split, run every method on
it, and write ``results.json`` (schema 1), ``results.csv``, ``results.md`` and plots.

Layout of ``--out``:
- ``runs/split<S>/``: the run folder of each split (classifier, proxy, detector);
- ``cache/split<S>/<method>.{safetensors,json}``: test and validation scores, keyed
  by a hash of the classifier's and detector's weights, the method and its parameters
  and the format version; a second run (or one after an interruption) reuses them;
- ``results.json``, ``results.csv``, ``results.md``, ``plots/*.png``.

``results.json`` is rewritten after every split, so an interrupted benchmark keeps
what it finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from gradosr.checkpoint import FORMAT_VERSION, atomic_write_json, load_tensors, read_json, save_tensors
from gradosr.data.protocols import load_protocol, resolve_protocol
from gradosr.errors import CheckpointError, ConfigError
from gradosr.evaluate import SplitScores, available_methods, score_split, split_records
from gradosr.evaluation import results_document
from gradosr.train import default_train_config, identity_mismatch

SCORES_FORMAT = "gradosr.scores"
#: bumped whenever a change to the scoring code changes scores: old cache entries are recomputed
SCORING_VERSION = 2


@dataclass
class BenchmarkSettings:
    """Everything that defines a benchmark run.

    Attributes:
        protocol: protocol name; ``protocol_args`` holds the other resolve_protocol
            arguments (dataset, known, unknown, known_dataset, unknown_dataset).
        splits: standard split indices (for ``cross`` and ``custom``: seeds, which
            also seed the training).
        methods: method ids, or ``["all"]``.
        train_overrides: training options that differ from the dataset's defaults.
        seed: training seed of the standard protocols.
        preset, method_options: the GradientOSR preset and its options.
    """

    protocol: str
    splits: list[int]
    methods: list[str]
    out: Path
    protocol_args: dict = field(default_factory=dict)
    train_overrides: dict = field(default_factory=dict)
    seed: int = 0
    preset: str = "paper"
    method_options: dict = field(default_factory=dict)
    data_dir: str | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    command: str = ""


def _scores_key(parts: dict) -> str:
    blob = json.dumps({**parts, "format_version": FORMAT_VERSION, "scoring_version": SCORING_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache(folder: Path, identity: dict) -> Callable[[str, Callable[[], SplitScores]], SplitScores]:
    """A cache of SplitScores in ``folder`` keyed by ``identity`` plus the method id."""

    def cached(method: str, compute: Callable[[], SplitScores]) -> SplitScores:
        key = _scores_key({**identity, "method": method})
        if (folder / f"{method}.json").is_file():
            try:
                tensors, meta = load_tensors(folder, method, SCORES_FORMAT)
                if meta.get("key") == key:
                    return SplitScores(tensors["test"].numpy(), tensors["val"].numpy(), meta["threshold"],
                                       meta["threshold_rule"], meta["params"], meta["seconds"])
            except CheckpointError:
                pass  # a corrupt or foreign cache entry is recomputed
        s = compute()
        save_tensors(folder, method, {"test": torch.as_tensor(np.asarray(s.test, np.float64)),
                                      "val": torch.as_tensor(np.asarray(s.val, np.float64))},
                     {"key": key, "threshold": s.threshold, "threshold_rule": s.threshold_rule,
                      "params": s.params, "seconds": s.seconds}, SCORES_FORMAT)
        return s

    return cached


def _fitted_osr(data, settings: BenchmarkSettings, config, run_dir: Path, methods: list[str]):
    """(classifier, GradientOSR or None) of one split, trained or reused."""
    from gradosr.osr import GradientOSR, make_config
    from gradosr.runs import ensure_classifier

    progress = settings.progress
    if settings.preset not in methods:
        clf, _ = ensure_classifier(data, config, run_dir / "classifier", device=settings.device, progress=progress)
        return clf, None
    wanted = make_config(settings.preset, **settings.method_options)
    if (run_dir / "osr.json").is_file():
        stored = read_json(run_dir / "osr.json")
        if identity_mismatch(stored, {"config": wanted.to_dict(), "train": config.to_dict()}) is None:
            osr = GradientOSR.load(run_dir, device=settings.device)
            return osr.classifier, osr
    osr = GradientOSR(settings.preset, train_config=config, device=settings.device, progress=progress,
                      seed=config.seed, **settings.method_options)
    osr.fit(data, run_dir=run_dir)
    return osr.classifier, osr


def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns the results document (also written to disk)."""
    from gradosr.bench.plots import write_plots
    from gradosr.bench.report import write_csv, write_markdown

    out = Path(settings.out)
    records: list[dict] = []
    all_scores: dict[int, dict] = {}
    splits_info = []
    t_start = time.time()
    methods = settings.methods
    bad = [m for m in methods if m != "all" and m not in available_methods(settings.preset)]
    if bad:
        raise ConfigError(f"unknown methods {bad}; available: all, {', '.join(available_methods(settings.preset))}")
    for split in tqdm(settings.splits, desc="splits", disable=not settings.progress, unit="split"):
        t0 = time.time()
        spec = resolve_protocol(settings.protocol, split=split, **settings.protocol_args)
        seed = spec.seed if spec.name in ("cross", "custom") else settings.seed
        config = default_train_config(spec.dataset, **{**settings.train_overrides, "seed": seed})
        data = load_protocol(spec, settings.data_dir)
        run_dir = out / "runs" / f"split{split}"
        split_methods = available_methods(settings.preset) if "all" in methods else list(methods)
        clf, osr = _fitted_osr(data, settings, config, run_dir, split_methods)
        identity = {"classifier": read_json(run_dir / "classifier" / "model.json")["sha256"],
                    "protocol": spec.to_dict()}
        if osr is not None:
            identity["detector"] = read_json(run_dir / "detector" / "detector.json")["sha256"]
            identity["method_config"] = osr.config.to_dict()
        y_true, closed_pred, scores = score_split(clf, data, split_methods, osr, settings.progress,
                                                  cache=_cache(out / "cache" / f"split{split}", identity))
        recs = split_records(spec, y_true, closed_pred, scores)
        records.extend(recs)
        all_scores[split] = {"y_true": y_true, "closed_pred": closed_pred, "scores": scores}
        splits_info.append({"split": split, "protocol": spec.to_dict(), "train": config.to_dict(),
                            "test_acc": clf.meta.get("test_acc"), "seconds": round(time.time() - t0, 2)})
        doc = _document(settings, records, splits_info, scores, time.time() - t_start)
        atomic_write_json(out / "results.json", doc)
        best = max(recs, key=lambda r: r["auroc"])
        log(f"{spec.label}: closed-set acc {recs[0]['closed_acc']:.4f}; best AUROC {best['method']} "
            f"{best['auroc']:.4f} ({time.time() - t0:.1f}s)")
    doc = _document(settings, records, splits_info, scores, time.time() - t_start)
    atomic_write_json(out / "results.json", doc)
    write_csv(out / "results.csv", records)
    write_markdown(out / "results.md", doc)
    write_plots(out / "plots", all_scores)
    return doc


def _document(settings: BenchmarkSettings, records, splits_info, scores, seconds: float) -> dict:
    return results_document(settings.command, records, {
        "protocol": settings.protocol,
        "protocol_args": settings.protocol_args,
        "splits": splits_info,
        "method_params": {m: s.params for m, s in scores.items()},
        "seconds": round(seconds, 2),
    })
