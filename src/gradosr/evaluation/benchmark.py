"""``gradosr benchmark``: train (or reuse) one classifier per split, run every method on
it, and write ``results.json`` (schema 1), ``results.csv``, ``results.md`` and plots.

Layout of ``--out`` (:class:`gradosr.runs.BenchmarkLayout`):
- ``runs/split<S>/``: the run folder of each split (classifier, proxy, detector);
- ``cache/split<S>/<method>.{safetensors,json}``: test and validation scores, keyed
  by a hash of the classifier's and detector's weights, the method and its parameters
  and the format version; a second run (or one after an interruption) reuses them;
- ``results.json``, ``results.csv``, ``results.md``, ``plots/*.png``;
- with several unknown datasets (``cross``, ``--unknown-dataset a,b``): the runs are
  shared (one classifier and one fit of each preset per split) and ``<unknown>/`` holds
  each set's cache and results files.

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
from gradosr.checkpoint import FORMAT_VERSION, atomic_write_json, atomic_write_text, load_tensors, read_json, save_tensors
from gradosr.errors import CheckpointError, ConfigError
from gradosr.evaluation.driver import ExperimentSettings, SplitRun, split_runs
from gradosr.evaluation.records import cost_summary, results_document
from gradosr.evaluation.scoring import SplitScores, score_split, split_records
from gradosr.evaluation.tables import markdown_table, write_csv
from gradosr.detectors.registry import select_methods
from gradosr.methods.config import DEFAULT_PRESET
from gradosr.runs import identity_mismatch

SCORES_FORMAT = "gradosr.scores"
#: bumped whenever a change to the scoring code changes scores: old cache entries are recomputed
SCORING_VERSION = 3
#: the SplitScores cost fields a cache entry keeps (the times of the run that computed it)
COST_META = ("fit_s", "score_s", "n_scored", "forward_s")
#: a preset's fit time, beside its osr.json
FIT_COST = "cost.json"


@dataclass
class BenchmarkSettings(ExperimentSettings):
    """A benchmark: the splits (:class:`ExperimentSettings`) and the methods.

    Attributes:
        methods: method ids, ``all`` or ``family:<name>`` tokens
            (:func:`gradosr.detectors.registry.select_methods`).
        preset, method_options: ``method_options`` apply to this GradientOSR preset
            (the ``--preset`` flag); methods may list several presets.
        plot_all: ROC/OSCR plots with every method (default: the presets and the five
            best others).
    """

    methods: list[str] = field(default_factory=lambda: ["all"])
    preset: str = DEFAULT_PRESET
    method_options: dict = field(default_factory=dict)
    plot_all: bool = False


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
                                      meta["threshold_rule"], meta["params"], meta["seconds"],
                                      **{k: meta.get(k) for k in COST_META}, cached=True)
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
                      "params": s.params, "seconds": s.seconds, **{k: getattr(s, k) for k in COST_META}},
                     SCORES_FORMAT)
        return s

    return cached


def _stored_identity(path: Path) -> dict:
    """A fitted method's osr.json, its config with the options added since it was
    written read as their defaults (so that an older run still matches)."""
    from gradosr.methods.config import OSRConfig

    stored = read_json(path)
    try:
        stored["config"] = OSRConfig.from_dict(stored.get("config") or {}).to_dict()
    except (CheckpointError, ConfigError):
        pass  # compared as it is: a mismatch, refitted
    return stored


def _fitted_osr(run: SplitRun, settings: BenchmarkSettings, methods: list[str]) -> dict:
    """{preset: GradientOSR} of one split, fitted or reused, on the split's classifier:
    the ``paper`` preset's method in the run folder, every other preset's in
    ``<run>/<preset>``. ``settings.method_options`` apply to ``settings.preset`` only.
    The presets see known data only, so one fit serves every unknown set."""
    from gradosr.detectors.registry import method_ids
    from gradosr.osr import GradientOSR, make_config

    config, fitted = run.train_config, {}
    for preset in [m for m in methods if m in method_ids("preset")]:
        options = settings.method_options if preset == settings.preset else {}
        folder = run.run.preset(preset)
        wanted = make_config(preset, seed=config.seed, **options)
        reuse = folder.is_fitted() and identity_mismatch(
            _stored_identity(folder.osr_json), {"config": wanted.to_dict(), "train": config.to_dict()}) is None
        if distributed.agree(reuse):  # rank 0 decides: fitting is collective
            osr = fitted[preset] = GradientOSR.load(folder.root, device=settings.device)
            cost = folder.root / FIT_COST
            osr.fit_seconds_ = read_json(cost).get("fit_s") if cost.is_file() else None
            osr.reused_ = True
            continue
        osr = GradientOSR(preset, classifier=run.classifier, train_config=config, device=settings.device,
                          progress=settings.progress, seed=config.seed, **options)
        t0 = time.perf_counter()
        fitted[preset] = osr.fit(run.data[0], run_dir=folder.root)
        osr.fit_seconds_ = time.perf_counter() - t0
        if distributed.is_main():
            atomic_write_json(folder.root / FIT_COST, {"fit_s": round(osr.fit_seconds_, 4)})
    return fitted


def run_benchmark(settings: BenchmarkSettings, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns the results document (also written to disk), or with
    several unknown sets ``{unknown dataset: document}``."""
    from gradosr.evaluation.plots import write_plots

    layout = settings.layout
    t_start = time.time()
    split_methods = select_methods(settings.methods)
    sets = settings.unknown_sets() if len(settings.unknown_sets()) > 1 else [None]
    state = {u: {"records": [], "scores": {}, "splits": [], "last": {}, "skipped": {}} for u in sets}
    for run in split_runs(settings):
        t0 = time.time()
        fitted = _fitted_osr(run, settings, split_methods)
        distributed.barrier()  # rank 0 has written the run folder that every process reads next
        methods_identity = {p: {"detector": run.run.preset(p).detector_sha256(),
                                "method_config": osr.config_.to_dict()} for p, osr in fitted.items()}
        scorers: dict = {}  # every unknown set of the split is scored by the same fitted baselines
        for unknown, spec, data in zip(run.unknowns, run.specs, run.data):
            identity = {"classifier": run.run.classifier_sha256(), "protocol": spec.to_dict()}
            st = state[unknown]
            skipped: dict[str, str] = {}
            y_true, closed_pred, scores = score_split(run.classifier, data, split_methods, fitted, settings.progress,
                                                      cache=_cache(layout.cache(run.split, unknown), identity,
                                                                   methods_identity), skipped=skipped,
                                                      scorers=scorers)
            for method, reason in skipped.items():
                st["skipped"].setdefault(method, {})[str(run.split)] = reason
            recs = split_records(spec, y_true, closed_pred, scores)
            st["records"].extend(recs)
            st["scores"][run.split] = {"y_true": y_true, "closed_pred": closed_pred, "scores": scores}
            st["last"] = scores
            st["splits"].append({"split": run.split, "protocol": spec.to_dict(), "train": run.train_config.to_dict(),
                                 "test_acc": run.classifier.meta.get("test_acc"),
                                 "seconds": round(time.time() - t0, 2)})
            atomic_write_json(layout.results(unknown) / "results.json",
                              _document(settings, st, time.time() - t_start))
            best = max(recs, key=lambda r: r["auroc"])
            if distributed.is_main():
                log(f"{spec.label}: closed-set acc {recs[0]['closed_acc']:.4f}; best AUROC {best['method']} "
                    f"{best['auroc']:.4f} ({time.time() - t0:.1f}s)")
    docs = {}
    for unknown, st in state.items():
        doc = docs[unknown] = _document(settings, st, time.time() - t_start)
        folder = layout.results(unknown)
        if distributed.is_main():
            write_results(folder, doc)
            write_plots(folder / "plots", st["scores"], plot_all=settings.plot_all)
    distributed.barrier()  # the results are on disk before any process returns
    return docs[None] if None in docs else docs


def _document(settings: BenchmarkSettings, st: dict, seconds: float) -> dict:
    return results_document(settings.command, st["records"], {
        "cost": cost_summary(st["records"]),
        "protocol": settings.protocol,
        "protocol_args": settings.protocol_args,
        "splits": st["splits"],
        "method_params": {m: s.params for m, s in st["last"].items()},
        "skipped": st["skipped"],
        "seconds": round(seconds, 2),
    })


def merge_documents(docs: list[dict]) -> dict:
    """One results document of several benchmark documents of the same protocol and
    methods on disjoint splits (e.g. seeds run in separate sessions or on separate
    machines): the records in split order, the summary and cost recomputed over all of
    them, ``commands`` every document's command (``command`` the first's), ``seconds``
    their sum, ``versions`` the runs' (a list where they differ). The records themselves
    are not changed."""
    if not docs:
        raise ConfigError("merge: no results documents")
    for i, d in enumerate(docs):
        if not (isinstance(d, dict) and isinstance(d.get("results"), list) and isinstance(d.get("command"), str)
                and all(isinstance(r, dict) and "method" in r and "split" in r for r in d["results"])):
            raise ConfigError(f"merge: document {i + 1} is not a benchmark results document")
    first = docs[0]
    for key in ("protocol", "protocol_args"):
        if any(d.get(key) != first.get(key) for d in docs[1:]):
            raise ConfigError(f"merge: the documents differ in {key}")
    methods = list(dict.fromkeys(r["method"] for r in first["results"]))
    for d in docs[1:]:
        if set(r["method"] for r in d["results"]) != set(methods):
            raise ConfigError("merge: the documents have different methods")
    splits = [s for d in docs for s in d.get("splits", [])]
    ids = [s["split"] for s in splits]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"merge: a split appears in more than one document ({sorted(ids)})")
    order = {m: i for i, m in enumerate(methods)}
    records = sorted((r for d in docs for r in d["results"]), key=lambda r: (r["split"], order[r["method"]]))
    skipped: dict = {}
    for d in docs:
        for method, reasons in d.get("skipped", {}).items():
            skipped.setdefault(method, {}).update(reasons)
    commands = [c for d in docs for c in (d.get("commands") or [d["command"]])]
    doc = results_document(commands[0], records, {
        "commands": commands,
        "cost": cost_summary(records),
        "protocol": first.get("protocol"),
        "protocol_args": first.get("protocol_args"),
        "splits": sorted(splits, key=lambda s: s["split"]),
        "method_params": docs[-1].get("method_params", {}),
        "skipped": skipped,
        "seconds": round(sum(d.get("seconds", 0) for d in docs), 2),
    })
    runs = [d.get("versions") for d in docs]  # the runs' versions, not the merging machine's
    doc["versions"] = runs[0] if all(v == runs[0] for v in runs) else runs
    return doc


def write_results(folder: Path, doc: dict) -> None:
    """``results.json``, ``results.csv`` (its records) and ``results.md`` of a document."""
    atomic_write_json(folder / "results.json", doc)
    write_csv(folder / "results.csv", doc["results"])
    write_markdown(folder / "results.md", doc)


def write_markdown(path: Path, doc: dict) -> None:
    """``results.md``: the command, the table and how each number was obtained."""
    splits = [s["split"] for s in doc.get("splits", [])]
    params = doc.get("method_params", {})
    lines = [
        f"# Benchmark: {doc.get('protocol')}",
        "",
        *([f"Command: `{doc['command']}`"] if len(doc.get("commands") or [1]) == 1
          else ["Merged from:", "", *[f"- `{c}`" for c in doc["commands"]]]),
        "",
        f"Mean ± std (population, ddof 0) over splits {splits}; higher = better except FPR@95TPR. "
        "Scores: higher = more likely known. `macro-F1` is at each method's own threshold rule "
        "(the paper preset: its fixed P(known) threshold 0.95; the plus preset and the baselines: "
        "95% of held-out knowns accepted); "
        "`macro-F1@TPR95` uses the 95%-acceptance threshold on held-out knowns for every method. "
        "No unknown class is used to fit or tune anything. "
        "`ms/1k` is the mean scoring time per 1,000 test and validation rows (the baselines read the "
        "classifier's shared forward outputs, `forward ms/1k`; the presets run their own passes) and "
        "`fit s` the mean fit time, measured in the run that computed each record.",
        "",
        markdown_table(doc["summary"], doc.get("cost")),
        "",
        "Method parameters:",
        "",
    ]
    for method, p in params.items():
        lines.append(f"- `{method}`: `{p}`")
    for method, reasons in doc.get("skipped", {}).items():
        lines.append(f"- `{method}` was left out on splits {', '.join(reasons)}: {next(iter(reasons.values()))}")
    lines += ["", f"Versions: `{doc['versions']}`; total time {doc.get('seconds')} s.", ""]
    atomic_write_text(path, "\n".join(lines))
