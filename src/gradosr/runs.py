"""Run folders: where every stage keeps what it writes, and whether a stored object is
the one asked for (docs/design.md, "Run folder layout").

- :class:`RunLayout`: one run folder, ``classifier/``, ``proxy/`` (``proxy2/``, …),
  ``detector/``, ``osr.json``, ``eval.json``, and the folder of each fitted preset;
- :class:`BenchmarkLayout`: a benchmark's or an ablation's ``--out``: ``runs/split<S>/``
  (a RunLayout each), ``cache/``, the results files;
- :func:`identity_mismatch`, :func:`classifier_identity`, :func:`training_identity`: the
  identity checks of stored classifiers, proxies and fitted methods;
- :func:`ensure_classifier`: the classifier step shared by train, fit, benchmark and ablate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gradosr.checkpoint import read_json
from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData, ProtocolSpec
from gradosr.errors import CheckpointError
from gradosr.streams import SourceInputs
from gradosr.train import TrainConfig, accuracy, default_preprocessing, train_classifier

#: protocol fields that say which unknowns a split is tested on: they do not change what trains a classifier
UNKNOWN_ONLY = ("unknown", "unknown_dataset")


@dataclass(frozen=True)
class RunLayout:
    """The files of one run folder (``gradosr fit --out``, a benchmark split)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    def proxy(self, index: int) -> Path:
        """The ``index``-th proxy classifier: ``proxy``, ``proxy2``, …"""
        return self.root / ("proxy" if index == 0 else f"proxy{index + 1}")

    @property
    def detector(self) -> Path:
        return self.root / "detector"

    @property
    def osr_json(self) -> Path:
        return self.root / "osr.json"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    def preset(self, name: str) -> "RunLayout":
        """Where a run keeps a preset's fitted method: the run folder itself for ``paper``
        (and for whatever ``gradosr fit --out`` wrote there), ``<run>/<preset>/`` for the
        other presets that ``gradosr benchmark`` fits beside it (all on one classifier)."""
        return self if name == "paper" else RunLayout(self.root / name)

    def is_fitted(self) -> bool:
        return self.osr_json.is_file()

    def classifier_sha256(self) -> str:
        """The sha256 of the stored classifier's weights (its model.json records it)."""
        return read_json(self.classifier / "model.json")["sha256"]

    def detector_sha256(self) -> str:
        return read_json(self.detector / "detector.json")["sha256"]


@dataclass(frozen=True)
class BenchmarkLayout:
    """A benchmark's (or an ablation's) ``--out``: ``runs/split<S>/`` per split (random
    class splits, ``--split-seeds``: ``runs/seed<S>/``), ``cache/split<S>/`` score caches,
    ``results.{json,csv,md}`` and ``plots/``; with several unknown sets, their results
    under ``<unknown set>/`` (:func:`set_folder`) and the runs shared."""

    root: Path
    split_prefix: str = "split"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def run(self, split: int) -> RunLayout:
        return RunLayout(self.root / "runs" / f"{self.split_prefix}{split}")

    def results(self, unknown: str | None = None) -> Path:
        """The folder of results.json, results.csv, results.md, plots/ and cache/."""
        return self.root if unknown is None else self.root / set_folder(unknown)

    def cache(self, split: int, unknown: str | None = None) -> Path:
        return self.results(unknown) / "cache" / f"{self.split_prefix}{split}"


def set_folder(dataset: str) -> str:
    """A folder name for the unknown set ``dataset``: its name, or for a path dataset
    (``folder:/a/b``, ``npz:/a/b.npz``) ``folder-b`` / ``npz-b``."""
    kind, sep, path = dataset.partition(":")
    if sep and kind in ("folder", "npz"):
        return f"{kind}-{Path(path).stem or 'root'}"
    return Path(dataset).name or "unknown"


def training_identity(protocol: dict | None) -> dict | None:
    """The fields of a protocol split (``ProtocolSpec.to_dict()``) that decide what a
    classifier is trained on: everything but which unknowns it is tested on."""
    if not isinstance(protocol, dict):
        return protocol
    return {k: v for k, v in protocol.items() if k not in UNKNOWN_ONLY}


def identity_mismatch(stored: dict, wanted: dict) -> str | None:
    """A human-readable reason why checkpoint metadata ``stored`` does not match the
    identity ``wanted`` (keys: protocol, train, config, ...), or None when it matches.
    Protocols are compared by their :func:`training_identity`: several unknown sets
    share one classifier (and its proxies)."""
    for key, value in wanted.items():
        have = stored.get(key)
        if key == "protocol":
            have, value = training_identity(have), training_identity(value)
        if isinstance(value, dict) and isinstance(have, dict):
            for sub in sorted(set(value) | set(have)):
                if value.get(sub) != have.get(sub):
                    return f"{key}.{sub} is {have.get(sub)!r} in the checkpoint but {value.get(sub)!r} was asked for"
        elif have != value:
            return f"{key} is {have!r} in the checkpoint but {value!r} was asked for"
    return None


def classifier_identity(spec: ProtocolSpec, config: TrainConfig, weights_sha256: str | None = None) -> dict:
    """What must match for a stored classifier to be reused: what trains it (the known
    data of the protocol split, the model, training recipe and seed), and the sha256 of
    the weights it was loaded from (``--weights``), if any."""
    identity = {"protocol": spec.to_dict(), "train": config.to_dict()}
    if weights_sha256 is not None:
        identity["weights_sha256"] = weights_sha256
    return identity


def ensure_classifier(
    data: OSRData,
    config: TrainConfig,
    out_dir: str | os.PathLike | None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    weights: str | os.PathLike | None = None,
) -> tuple[Classifier, bool]:
    """Train the closed-set classifier of ``data`` with ``config`` (or load its trained
    ``weights``, a safetensors file, into ``config.model``), or reuse the one in
    ``out_dir`` when its identity matches.

    Returns (classifier, reused). A complete stored classifier of another identity is
    refused (CheckpointError naming the difference); an incomplete one is refused unless
    ``resume``. The known-test accuracy is stored in the metadata as ``test_acc``.
    """
    from gradosr.models.user import weights_sha256

    sha = weights_sha256(weights) if weights is not None else None
    identity = classifier_identity(data.spec, config, sha)
    if out_dir is not None and (Path(out_dir) / "model.json").is_file():
        stored = Classifier.load(out_dir, device=device, model_ref=config.model)
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
    if weights is not None:
        clf = pretrained_classifier(data, config, pre, weights, device)
    else:
        clf = train_classifier(
            data.known_train, data.val, list(data.spec.known), config, pre, out_dir=out_dir, resume=resume,
            progress=progress, device=device, meta={"protocol": data.spec.to_dict()},
            class_names=list(data.class_names), log=log,
        )
    clf.meta["test_acc"] = accuracy(clf.model, SourceInputs(data.known_test, clf.inputs),
                                    torch.as_tensor(data.known_test.labels))
    if clf.meta.get("history"):
        clf.meta["val_acc"] = clf.meta["history"][-1]["val_acc"]
    elif weights is not None:
        clf.meta["val_acc"] = accuracy(clf.model, SourceInputs(data.val, clf.inputs), torch.as_tensor(data.val.labels))
    else:
        clf.meta["val_acc"] = None
    if out_dir is not None:
        clf.save(out_dir)
    return clf, False


def pretrained_classifier(data: OSRData, config: TrainConfig, pre, weights: str | os.PathLike,
                          device: str | torch.device = "cpu") -> Classifier:
    """``config.model`` (built-in or ``package.module:factory``) with the trained weights of
    the safetensors file ``weights`` (``--weights``), as the protocol's classifier; its
    metadata records the file and its sha256."""
    from gradosr.models import build_model
    from gradosr.models.user import load_weights

    model = build_model(config.model, data.num_known, pre.channels, head=config.head)
    sha = load_weights(model, weights)
    meta = {"protocol": data.spec.to_dict(), "train": config.to_dict(), "weights_sha256": sha,
            "weights_path": str(Path(weights).resolve()), "complete": True}
    return Classifier(model.to(device).eval(), config.model, pre, list(data.spec.known), list(data.class_names), meta)


def check_weights(clf: Classifier, weights: str | os.PathLike | None) -> None:
    """CheckpointError unless the file ``weights`` (``--weights`` of evaluate/predict) is the
    one the run's classifier was loaded from (by sha256); nothing to check without it."""
    from gradosr.models.user import weights_sha256

    if weights is None:
        return
    recorded, sha = clf.meta.get("weights_sha256"), weights_sha256(weights)
    if recorded is None:
        raise CheckpointError("this run's classifier was trained by gradosr, not loaded from --weights; "
                              "leave --weights out")
    if recorded != sha:
        raise CheckpointError(f"--weights {weights} (sha256 {sha[:12]}…) is not the file this run was fitted with "
                              f"({clf.meta.get('weights_path')}, sha256 {recorded[:12]}…)")
