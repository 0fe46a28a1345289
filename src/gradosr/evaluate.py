"""Score every method of one protocol split on the same classifier, and evaluate it.

Shared by ``gradosr evaluate`` (one run folder) and ``gradosr benchmark`` (many splits,
with a score cache). The test set is [known_test; unknown_test] with labels 0..K-1 and
-1; the held-out knowns (validation split) set the 95%-acceptance thresholds.

In a distributed run (torchrun) the logits and features, every GradientOSR preset's and
every baseline's scores are computed on contiguous shards of the rows, one per process,
and all-gathered (:func:`gradosr.distributed.map_rows`); scorers are fitted on the full
training outputs, identically on every process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gradosr.checkpoint import check_folder
from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData, ProtocolSpec, load_protocol
from gradosr.detectors import ScorerInputs
from gradosr.detectors.registry import make_scorer, method_ids
from gradosr.distributed import map_rows
from gradosr.errors import CheckpointError, ConfigError
from gradosr.evaluation import results_record


def test_labels(data: OSRData) -> np.ndarray:
    """Labels of the concatenated test set [known_test; unknown_test]: 0..K-1, then -1."""
    return np.concatenate([data.known_test.labels, np.full(len(data.unknown_test), -1, dtype=np.int64)])


def test_images(data: OSRData) -> np.ndarray:
    """Images of [known_test; unknown_test], N×H×W×C uint8."""
    k, u = data.known_test.images, data.unknown_test.images
    if k.shape[1:] != u.shape[1:]:
        raise ConfigError(f"known test images are {k.shape[1:]} but unknown ones {u.shape[1:]}; "
                          "cross-dataset protocols need images of one size")
    return np.concatenate([k, u])


def classifier_outputs(clf: Classifier, x: torch.Tensor) -> ScorerInputs:
    """Logits, head-input features, the inputs, the model and its head's weight and bias,
    for model inputs ``x``."""
    from gradosr.models import find_head

    logits, feats = clf.logits_and_features(x)
    head = find_head(clf.model)
    return ScorerInputs(logits, feats, x, clf.model, head.weight.detach().cpu(),
                        head.bias.detach().cpu() if head.bias is not None else None)


def sharded_scores(scorer, out: ScorerInputs) -> np.ndarray:
    """``scorer.score_samples(out)``, sharded over the rows in a distributed run (each
    sample's score depends on that sample alone). Shards are cut at multiples of the
    scorer's batch size, when it has one, so batches hold the rows of a single-process run."""
    align = getattr(scorer, "batch_size", 1)
    align = align if isinstance(align, int) and align > 0 else 1
    return map_rows(lambda rows: np.asarray(scorer.score_samples(out.rows(rows)), dtype=np.float64),
                    len(out), align=align)


def sharded_osr_scores(osr, x: torch.Tensor) -> np.ndarray:
    """``osr.score_samples(x)`` (a fitted GradientOSR, model inputs ``x``), sharded over
    the rows in a distributed run: the whole scoring (forward passes, gradient features,
    detector) runs on each process's shard, cut at multiples of the extraction batch size;
    the map_rows inside it run locally."""
    return map_rows(lambda rows: np.asarray(osr.score_samples(rows), dtype=np.float64), x,
                    align=osr.config_.batch_size)


@dataclass
class SplitScores:
    """Scores of one method on one split: test N, validation knowns M, and how the
    method's own threshold was set."""

    test: np.ndarray
    val: np.ndarray
    threshold: float | None = None
    threshold_rule: str = "tpr95-val"
    params: dict | None = None
    seconds: float = 0.0


def available_methods(presets: str | list[str] | None = None) -> list[str]:
    """Method ids: the GradientOSR presets first (``None``: every registered preset),
    then the registered baselines (:mod:`gradosr.detectors.registry`)."""
    import gradosr.methods  # noqa: F401  (registers the presets)

    if presets is None:
        presets = method_ids("preset")
    elif isinstance(presets, str):
        presets = [presets]
    return list(presets) + method_ids("baseline")


def score_split(clf: Classifier, data: OSRData, methods: list[str], osr=None, progress: bool = False,
                cache: Callable[[str, Callable[[], SplitScores]], SplitScores] | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, SplitScores]]:
    """Scores of ``methods`` on the split's test and validation images.

    ``osr``: a fitted GradientOSR, or a dict {preset: GradientOSR} (all on ``clf``).
    ``cache(method, compute)``: returns stored scores or calls ``compute()`` (benchmark).
    Returns (y_true N, closed_pred N, {method: SplitScores}).
    """
    fitted = osr if isinstance(osr, dict) else ({osr.config_.preset: osr} if osr is not None else {})
    bad = [m for m in methods if m not in method_ids("baseline") and m not in fitted]
    if bad:
        raise ConfigError(f"unknown or unavailable methods {bad}; available: "
                          f"{', '.join(available_methods(list(fitted)))}")
    x_test, x_val = clf.inputs(test_images(data)), clf.inputs(data.val.images)
    test_out, val_out = classifier_outputs(clf, x_test), classifier_outputs(clf, x_val)
    train_out: list[ScorerInputs] = []

    def compute(method: str) -> SplitScores:
        t0 = time.time()
        if method in fitted:
            osr = fitted[method]
            osr.progress = progress
            rule = (f"fixed-{osr.threshold_:g}" if osr.config_.threshold_rule == "fixed"
                    else f"tpr{osr.config_.target_tpr:g}-val")
            return SplitScores(sharded_osr_scores(osr, x_test), sharded_osr_scores(osr, x_val), osr.threshold_,
                               rule, osr.config_.to_dict(), time.time() - t0)
        scorer = make_scorer(method)
        if scorer.needs_fit:
            if not train_out:
                train_out.append(classifier_outputs(clf, clf.inputs(data.known_train.images)))
            scorer.fit(train_out[0], data.known_train.labels)
        return SplitScores(sharded_scores(scorer, test_out), sharded_scores(scorer, val_out),
                           params=dict(scorer.params), seconds=time.time() - t0)

    scores = {m: (cache(m, lambda m=m: compute(m)) if cache else compute(m)) for m in methods}
    return test_labels(data), test_out.logits.argmax(1).numpy(), scores


def split_records(spec: ProtocolSpec, y_true: np.ndarray, closed_pred: np.ndarray,
                  scores: dict[str, SplitScores]) -> list[dict]:
    """One results record (DESIGN.md §8) per method."""
    split = spec.split if spec.split is not None else spec.seed
    records = []
    for method, s in scores.items():
        rec = results_record(method, split, y_true, closed_pred, s.test, s.val, spec.num_known,
                             s.threshold, s.threshold_rule)
        rec["seconds"] = round(float(s.seconds), 3)
        records.append(rec)
    return records


def preset_dir(run: Path, preset: str) -> Path:
    """Where a run keeps a preset's fitted method: the run folder itself for ``paper``
    (and for whatever ``gradosr fit --out`` wrote there), ``<run>/<preset>/`` for the
    other presets that ``gradosr benchmark`` fits beside it."""
    return Path(run) if preset == "paper" else Path(run) / preset


def fitted_presets(run: Path, device="cpu") -> dict:
    """{preset: GradientOSR} of every fitted method stored in the run folder."""
    from gradosr.osr import PRESETS, GradientOSR

    found = {}
    if (Path(run) / "osr.json").is_file():
        osr = GradientOSR.load(run, device=device)
        found[osr.config_.preset] = osr
    for preset in PRESETS:
        folder = Path(run) / preset
        if preset not in found and (folder / "osr.json").is_file():
            found[preset] = GradientOSR.load(folder, device=device)
    return found


def evaluate_run(run: Path, methods: list[str] | None, data_dir=None, device="cpu",
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Results records for ``methods`` on the run's protocol split (``gradosr evaluate``).

    A GradientOSR preset needs ``<run>/osr.json`` from ``gradosr fit`` (or
    ``<run>/<preset>/osr.json``, as ``gradosr benchmark`` stores presets other than
    ``paper``); the baselines need only the classifier. Default methods: the fitted
    presets and ``msp``. Returns (records, info) with the protocol and classifier metadata.
    """

    run = check_folder(run, "a run folder (classifier/, osr.json)")
    clf_dir = run / "classifier"
    if not (clf_dir / "model.json").is_file():
        raise CheckpointError(f"{run} has no trained classifier ({clf_dir}/model.json); run gradosr train or fit first")
    clf = Classifier.load(clf_dir, device=device)
    if not clf.meta.get("complete"):
        raise CheckpointError(f"{clf_dir} holds an unfinished training run; finish it with gradosr train --resume")
    fitted = fitted_presets(run, device)
    if methods is None:
        methods = list(fitted) + ["msp"]
    elif "all" in methods:
        methods = available_methods(list(fitted))
    from gradosr.osr import PRESETS

    missing = [m for m in methods if m in PRESETS and m not in fitted]
    if missing:
        raise CheckpointError(f"{run} has no fitted {missing[0]} method (osr.json): run "
                              f"gradosr fit --preset {missing[0]} --out {run} first")
    spec = ProtocolSpec.from_dict(clf.meta["protocol"])
    data = load_protocol(spec, data_dir)
    y_true, closed_pred, scores = score_split(clf, data, methods, fitted, progress)
    info = {"protocol": spec.to_dict(),
            "classifier": {k: clf.meta.get(k) for k in ("arch", "train", "test_acc", "val_acc")},
            "method_params": {m: s.params for m, s in scores.items()}}
    return split_records(spec, y_true, closed_pred, scores), info
