"""Run directories (DESIGN.md §8) and the classifier step shared by train/fit/benchmark.

Layout: ``<run>/classifier/{model.safetensors, model.json}``, ``<run>/proxy/…``,
``<run>/detector/…``, ``<run>/osr.json``, ``<run>/eval.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData, ProtocolSpec
from gradosr.errors import CheckpointError
from gradosr.train import TrainConfig, accuracy, default_preprocessing, identity_mismatch, train_classifier


def classifier_identity(spec: ProtocolSpec, config: TrainConfig) -> dict:
    """What must match for a stored classifier to be reused: protocol split, model,
    training recipe and seed."""
    return {"protocol": spec.to_dict(), "train": config.to_dict()}


def ensure_classifier(
    data: OSRData,
    config: TrainConfig,
    out_dir: str | os.PathLike | None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Classifier, bool]:
    """Train the closed-set classifier of ``data`` with ``config``, or reuse the one in
    ``out_dir`` when its identity matches.

    Returns (classifier, reused). A complete stored classifier of another identity is
    refused (CheckpointError naming the difference); an incomplete one is refused unless
    ``resume``. The known-test accuracy is stored in the metadata as ``test_acc``.
    """
    identity = classifier_identity(data.spec, config)
    if out_dir is not None and (Path(out_dir) / "model.json").is_file():
        stored = Classifier.load(out_dir, device=device)
        reason = identity_mismatch(stored.meta, identity)
        if reason:
            raise CheckpointError(f"{out_dir} holds another classifier: {reason}. Use another --out/--run "
                                  "or delete that folder")
        if stored.meta.get("complete") and "test_acc" in stored.meta:
            return stored, True
        resume = resume or bool(stored.meta.get("complete"))  # only the test accuracy is missing
        if not stored.meta.get("complete") and not resume:
            raise CheckpointError(f"{out_dir} holds an unfinished training run (epoch "
                                  f"{stored.meta.get('epoch')}/{config.epochs}): pass --resume to continue it")
    pre = default_preprocessing(data.spec.dataset, config.model, config.image_size)
    clf = train_classifier(
        data.known_train, data.val, list(data.spec.known), config, pre, out_dir=out_dir, resume=resume,
        progress=progress, device=device, meta={"protocol": data.spec.to_dict()},
        class_names=list(data.class_names), log=log,
    )
    x_test = clf.inputs(data.known_test.images)
    clf.meta["test_acc"] = accuracy(clf.model, x_test, torch.as_tensor(data.known_test.labels))
    clf.meta["val_acc"] = clf.meta["history"][-1]["val_acc"] if clf.meta.get("history") else None
    if out_dir is not None:
        clf.save(out_dir)
    return clf, False
