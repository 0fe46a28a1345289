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

Under torchrun every process runs the same loop: training is DistributedDataParallel and
extraction and scoring are sharded (:mod:`gradosr.distributed`); rank 0 alone writes,
decides what the stored runs and caches hold (every process follows its decision), and
prints. ``--out`` must be on a filesystem that every process reads (one shared folder
when the processes run on several machines).
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

from gradosr import distributed
from gradosr.checkpoint import FORMAT_VERSION, atomic_write_json, load_tensors, read_json, save_tensors
from gradosr.data.protocols import load_protocol, resolve_protocol
from gradosr.errors import CheckpointError, ConfigError
from gradosr.evaluate import SplitScores, available_methods, preset_dir, score_split, split_records
from gradosr.evaluation import results_document
from gradosr.progress import progress_bar
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
        preset, method_options: ``method_options`` apply to this GradientOSR preset
            (the ``--preset`` flag); methods may list several presets.
    """

    protocol: str
    splits: list[int]
    methods: list[str]
    out: Path
    protocol_args: dict = field(default_factory=dict)
    train_overrides: dict = field(default_factory=dict)
    seed: int = 0
    preset: str = "plus"
    method_options: dict = field(default_factory=dict)
    data_dir: str | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    command: str = ""


def _scores_key(parts: dict) -> str:
    blob = json.dumps({**parts, "format_version": FORMAT_VERSION, "scoring_version": SCORING_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache(folder: Path, identity: dict, methods_identity: dict | None = None
           ) -> Callable[[str, Callable[[], SplitScores]], SplitScores]:
    """A cache of SplitScores in ``folder`` keyed by ``identity`` plus the method id and,
    for a GradientOSR preset, ``methods_identity[method]`` (its detector and config)."""

    def cached(method: str, compute: Callable[[], SplitScores]) -> SplitScores:
        key = _scores_key({**identity, **(methods_identity or {}).get(method, {}), "method": method})
        hit = None
        if (folder / f"{method}.json").is_file():
            try:
                tensors, meta = load_tensors(folder, method, SCORES_FORMAT)
                if meta.get("key") == key:
                    hit = SplitScores(tensors["test"].numpy(), tensors["val"].numpy(), meta["threshold"],
                                      meta["threshold_rule"], meta["params"], meta["seconds"])
            except CheckpointError:
                pass  # a corrupt or foreign cache entry is recomputed
        if distributed.agree(hit is not None):  # rank 0 decides: compute() is collective
            if hit is None:
                raise CheckpointError(f"{folder / method}.json: the cache entry rank 0 reads is not readable here; "
                                      "--out must be one folder shared by every process")
            return hit
        s = compute()
        save_tensors(folder, method, {"test": torch.as_tensor(np.asarray(s.test, np.float64)),
                                      "val": torch.as_tensor(np.asarray(s.val, np.float64))},
                     {"key": key, "threshold": s.threshold, "threshold_rule": s.threshold_rule,
                      "params": s.params, "seconds": s.seconds}, SCORES_FORMAT)
        return s

    return cached


def _stored_identity(path: Path) -> dict:
    """A fitted method's osr.json, its config with the options added since it was
    written read as their defaults (so that an older run still matches)."""
    from gradosr.osr import OSRConfig

    stored = read_json(path)
    try:
        stored["config"] = OSRConfig.from_dict(stored.get("config") or {}).to_dict()
    except (CheckpointError, ConfigError):
        pass  # compared as it is: a mismatch, refitted
    return stored


def _fitted_osr(data, settings: BenchmarkSettings, config, run_dir: Path, methods: list[str]):
    """(classifier, {preset: GradientOSR}) of one split, trained or reused.

    The classifier lives in ``run_dir/classifier``; the ``paper`` preset's method in
    ``run_dir``, every other preset's in ``run_dir/<preset>`` (all on that classifier).
    ``settings.method_options`` apply to ``settings.preset`` only."""
    from gradosr.osr import PRESETS, GradientOSR, make_config
    from gradosr.runs import ensure_classifier

    progress = settings.progress
    clf, _ = ensure_classifier(data, config, run_dir / "classifier", device=settings.device, progress=progress)
    fitted = {}
    for preset in [m for m in methods if m in PRESETS]:
        options = settings.method_options if preset == settings.preset else {}
        folder = preset_dir(run_dir, preset)
        wanted = make_config(preset, **options)
        reuse = (folder / "osr.json").is_file() and identity_mismatch(
            _stored_identity(folder / "osr.json"), {"config": wanted.to_dict(), "train": config.to_dict()}) is None
        if distributed.agree(reuse):  # rank 0 decides: fitting is collective
            fitted[preset] = GradientOSR.load(folder, device=settings.device)
            continue
        osr = GradientOSR(preset, classifier=clf, train_config=config, device=settings.device, progress=progress,
                          seed=config.seed, **options)
        fitted[preset] = osr.fit(data, run_dir=folder)
    return clf, fitted


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
    bad = [m for m in methods if m != "all" and m not in available_methods()]
    if bad:
        raise ConfigError(f"unknown methods {bad}; available: all, {', '.join(available_methods())}")
    for split in progress_bar(settings.splits, desc="splits", disable=not settings.progress, unit="split"):
        t0 = time.time()
        spec = resolve_protocol(settings.protocol, split=split, **settings.protocol_args)
        seed = spec.seed if spec.name in ("cross", "custom") else settings.seed
        config = default_train_config(spec.dataset, **{**settings.train_overrides, "seed": seed})
        data = load_protocol(spec, settings.data_dir)
        run_dir = out / "runs" / f"split{split}"
        split_methods = available_methods() if "all" in methods else list(methods)
        clf, fitted = _fitted_osr(data, settings, config, run_dir, split_methods)
        distributed.barrier()  # rank 0 has written the run folder that every process reads next
        identity = {"classifier": read_json(run_dir / "classifier" / "model.json")["sha256"],
                    "protocol": spec.to_dict()}
        methods_identity = {p: {"detector": read_json(preset_dir(run_dir, p) / "detector" / "detector.json")["sha256"],
                                "method_config": osr.config_.to_dict()} for p, osr in fitted.items()}
        y_true, closed_pred, scores = score_split(clf, data, split_methods, fitted, settings.progress,
                                                  cache=_cache(out / "cache" / f"split{split}", identity,
                                                               methods_identity))
        recs = split_records(spec, y_true, closed_pred, scores)
        records.extend(recs)
        all_scores[split] = {"y_true": y_true, "closed_pred": closed_pred, "scores": scores}
        splits_info.append({"split": split, "protocol": spec.to_dict(), "train": config.to_dict(),
                            "test_acc": clf.meta.get("test_acc"), "seconds": round(time.time() - t0, 2)})
        doc = _document(settings, records, splits_info, scores, time.time() - t_start)
        atomic_write_json(out / "results.json", doc)
        best = max(recs, key=lambda r: r["auroc"])
        if distributed.is_main():
            log(f"{spec.label}: closed-set acc {recs[0]['closed_acc']:.4f}; best AUROC {best['method']} "
                f"{best['auroc']:.4f} ({time.time() - t0:.1f}s)")
    doc = _document(settings, records, splits_info, scores, time.time() - t_start)
    if distributed.is_main():
        atomic_write_json(out / "results.json", doc)
        write_csv(out / "results.csv", records)
        write_markdown(out / "results.md", doc)
        write_plots(out / "plots", all_scores)
    distributed.barrier()  # the results are on disk before any process returns
    return doc


def _document(settings: BenchmarkSettings, records, splits_info, scores, seconds: float) -> dict:
    return results_document(settings.command, records, {
        "protocol": settings.protocol,
        "protocol_args": settings.protocol_args,
        "splits": splits_info,
        "method_params": {m: s.params for m, s in scores.items()},
        "seconds": round(seconds, 2),
    })
