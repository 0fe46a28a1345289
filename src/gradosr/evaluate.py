"""Score every method of one protocol split on the same classifier, and evaluate it.

Shared by ``gradosr evaluate`` (one run folder) and ``gradosr benchmark`` (many splits,
with a score cache). The test set is [known_test; unknown_test] with labels 0..K-1 and
-1; the held-out knowns (validation split) set the 95%-acceptance thresholds.
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
from gradosr.detectors import SCORERS, ClassifierOutputs
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


def classifier_outputs(clf: Classifier, x: torch.Tensor) -> ClassifierOutputs:
    """Logits, head-input features, the inputs and the model, for model inputs ``x``."""
    logits, feats = clf.logits_and_features(x)
    return ClassifierOutputs(logits, feats, x, clf.model)


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


def available_methods(preset: str | None = None) -> list[str]:
    """Method ids: the GradientOSR ``preset`` first (when given), then the baselines."""
    return ([preset] if preset else []) + list(SCORERS)


def score_split(clf: Classifier, data: OSRData, methods: list[str], osr=None, progress: bool = False,
                cache: Callable[[str, Callable[[], SplitScores]], SplitScores] | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, SplitScores]]:
    """Scores of ``methods`` on the split's test and validation images.

    ``cache(method, compute)``: returns stored scores or calls ``compute()`` (benchmark).
    Returns (y_true N, closed_pred N, {method: SplitScores}).
    """
    preset = osr.config.preset if osr is not None else None
    bad = [m for m in methods if m not in SCORERS and m != preset]
    if bad:
        raise ConfigError(f"unknown or unavailable methods {bad}; available: {', '.join(available_methods(preset))}")
    x_test, x_val = clf.inputs(test_images(data)), clf.inputs(data.val.images)
    test_out, val_out = classifier_outputs(clf, x_test), classifier_outputs(clf, x_val)
    train_out: list[ClassifierOutputs] = []

    def compute(method: str) -> SplitScores:
        t0 = time.time()
        if method == preset:
            osr.progress = progress
            rule = (f"fixed-{osr.threshold_:g}" if osr.config.threshold_rule == "fixed"
                    else f"tpr{osr.config.target_tpr:g}-val")
            return SplitScores(osr.score_samples(x_test), osr.score_samples(x_val), osr.threshold_, rule,
                               osr.config.to_dict(), time.time() - t0)
        scorer = SCORERS[method]()
        if scorer.needs_fit:
            if not train_out:
                train_out.append(classifier_outputs(clf, clf.inputs(data.known_train.images)))
            scorer.fit(train_out[0], data.known_train.labels)
        return SplitScores(scorer.score_samples(test_out), scorer.score_samples(val_out), params=dict(scorer.params),
                           seconds=time.time() - t0)

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


def evaluate_run(run: Path, methods: list[str] | None, data_dir=None, device="cpu",
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Results records for ``methods`` on the run's protocol split (``gradosr evaluate``).

    The GradientOSR preset (``paper``) needs ``<run>/osr.json`` from ``gradosr fit``;
    the baselines need only the classifier. Default methods: the preset (when fitted)
    and ``msp``. Returns (records, info) with the protocol and classifier metadata.
    """
    from gradosr.osr import GradientOSR

    run = check_folder(run, "a run folder (classifier/, osr.json)")
    clf_dir = run / "classifier"
    if not (clf_dir / "model.json").is_file():
        raise CheckpointError(f"{run} has no trained classifier ({clf_dir}/model.json); run gradosr train or fit first")
    clf = Classifier.load(clf_dir, device=device)
    if not clf.meta.get("complete"):
        raise CheckpointError(f"{clf_dir} holds an unfinished training run; finish it with gradosr train --resume")
    osr = GradientOSR.load(run, device=device) if (run / "osr.json").is_file() else None
    if methods is None:
        methods = ([osr.config.preset] if osr else []) + ["msp"]
    elif "all" in methods:
        methods = available_methods(osr.config.preset if osr else None)
    if osr is None and "paper" in methods:
        raise CheckpointError(f"{run} has no fitted method (osr.json): run gradosr fit --out {run} first")
    spec = ProtocolSpec.from_dict(clf.meta["protocol"])
    data = load_protocol(spec, data_dir)
    y_true, closed_pred, scores = score_split(clf, data, methods, osr, progress)
    info = {"protocol": spec.to_dict(),
            "classifier": {k: clf.meta.get(k) for k in ("arch", "train", "test_acc", "val_acc")},
            "method_params": {m: s.params for m, s in scores.items()}}
    return split_records(spec, y_true, closed_pred, scores), info
