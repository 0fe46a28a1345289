"""Evaluate the methods of a run directory on its protocol's test set (``gradosr evaluate``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData, ProtocolSpec, load_protocol
from gradosr.detectors import SCORERS
from gradosr.errors import CheckpointError, ConfigError
from gradosr.evaluation import results_record


def test_labels(data: OSRData) -> np.ndarray:
    """Labels of the concatenated test set [known_test; unknown_test]: 0..K-1, then -1."""
    return np.concatenate([data.known_test.labels, np.full(len(data.unknown_test), -1, dtype=np.int64)])


def test_images(data: OSRData) -> np.ndarray:
    """Images of [known_test; unknown_test], N×H×W×C uint8 (unknowns converted to the
    known images' channel count and size when they differ is left to preprocessing)."""
    k, u = data.known_test.images, data.unknown_test.images
    if k.shape[1:] != u.shape[1:]:
        raise ConfigError(f"known test images are {k.shape[1:]} but unknown ones {u.shape[1:]}; "
                          "cross-dataset protocols need images of one size")
    return np.concatenate([k, u])


def evaluate_run(run: Path, methods: list[str] | None, data_dir=None, device="cpu",
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Results records (DESIGN.md §8) for ``methods`` on the run's protocol split.

    ``paper`` (and any other GradientOSR preset fitted into the run) needs
    ``<run>/osr.json`` from ``gradosr fit``; the baselines need only the classifier.
    Default methods: ``paper`` (when fitted) and ``msp``.
    Returns (records, info) where info holds the protocol and classifier metadata.
    """
    from gradosr.osr import GradientOSR

    clf_dir = run / "classifier"
    if not (clf_dir / "model.json").is_file():
        raise CheckpointError(f"{run} has no trained classifier ({clf_dir}/model.json); run gradosr train or fit first")
    clf = Classifier.load(clf_dir, device=device)
    if not clf.meta.get("complete"):
        raise CheckpointError(f"{clf_dir} holds an unfinished training run; finish it with gradosr train --resume")
    fitted = (run / "osr.json").is_file()
    osr = GradientOSR.load(run, device=device) if fitted else None
    preset = osr.config.preset if osr else "paper"
    methods = methods or ([preset] if fitted else []) + ["msp"]
    unknown = [m for m in methods if m not in SCORERS and m != preset]
    if unknown:
        raise ConfigError(f"unknown or unavailable methods {unknown}; available: {', '.join([preset, *SCORERS])}")
    if preset in methods and not fitted:
        raise CheckpointError(f"{run} has no fitted method (osr.json): run gradosr fit --out {run} first")
    spec = ProtocolSpec.from_dict(clf.meta["protocol"])
    data = load_protocol(spec, data_dir)
    y_true = test_labels(data)
    x_test, x_val = clf.inputs(test_images(data)), clf.inputs(data.val.images)
    logits, feats = clf.logits_and_features(x_test)
    val_logits, val_feats = clf.logits_and_features(x_val)
    closed_pred = logits.argmax(1).numpy()
    split = spec.split if spec.split is not None else spec.seed
    records = []
    for method in methods:
        if method == preset:
            osr.progress = progress
            rule = f"fixed-{osr.threshold_:g}" if osr.config.threshold_rule == "fixed" else f"tpr{osr.config.target_tpr:g}-val"
            records.append(results_record(method, split, y_true, closed_pred, osr.score_samples(x_test),
                                          osr.score_samples(x_val), spec.num_known, osr.threshold_, rule))
            continue
        scorer = SCORERS[method]()
        if scorer.needs_fit:
            scorer.fit(*clf.logits_and_features(data.known_train.images), data.known_train.labels)
        records.append(results_record(method, split, y_true, closed_pred, scorer.score_samples(logits, feats),
                                      scorer.score_samples(val_logits, val_feats), spec.num_known))
    info = {"protocol": spec.to_dict(),
            "classifier": {k: clf.meta.get(k) for k in ("arch", "train", "test_acc", "val_acc")},
            "method_config": osr.config.to_dict() if osr else None}
    return records, info
