"""Saving and loading a fitted :class:`gradosr.osr.GradientOSR`: the one module that
knows the run folder's method files.

Written: ``classifier/`` (the final classifier), ``proxy/``, ``proxy2/``, … (the proxy
classifiers a fit carries), ``detector/{detector.safetensors, detector.json}`` (the
strategy's state, :meth:`state` of :mod:`gradosr.methods.proxy` or
:mod:`gradosr.methods.fused`) and, last, ``osr.json`` (the method config, the
threshold, the training recipe, the seed and ``layout``). Loading rebuilds the estimator
through its constructor, from the preset and the options that give the stored config
(:func:`gradosr.methods.config.config_options`).

Layouts: 2 (this one) names tensors by component (``members.<i>.detector.*``,
``detector.signals.<signal>.*``); runs written before it (layout 1: ``net.*``,
``m<i>.net.*``, ``fusion.bank.*``) are converted on load by :func:`upgrade_layout1`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from gradosr.checkpoint import FORMAT_VERSION, atomic_write_json, check_folder, load_tensors, read_json, save_tensors
from gradosr.classifier import Classifier
from gradosr.detectors.base import _jsonable
from gradosr.detectors.fusion import FusionConfig, signal_scorers
from gradosr.detectors.knn import KNN
from gradosr.errors import CheckpointError
from gradosr.methods.base import STRATEGIES
from gradosr.methods.config import OSRConfig, config_options
from gradosr.runs import RunLayout
from gradosr.train import TrainConfig

OSR_FORMAT = "gradosr.osr"
DETECTOR_FORMAT = "gradosr.detector"
LAYOUT = 2
REFIT = "refit it with gradosr fit (or GradientOSR.fit and save)"


def save(osr, directory: str | os.PathLike) -> None:
    """Write a fitted GradientOSR into ``directory`` (osr.json last)."""
    osr.check_fitted()
    run = RunLayout(directory)
    osr.classifier_.save(run.classifier)
    for index, proxy in osr.method_.proxies():
        proxy.save(run.proxy(index))
    tensors, meta = osr.method_.state()
    save_tensors(run.detector, "detector", tensors, meta, DETECTOR_FORMAT)
    atomic_write_json(run.osr_json, {
        "format": OSR_FORMAT, "format_version": FORMAT_VERSION, "layout": LAYOUT,
        "config": osr.config_.to_dict(), "threshold": osr.threshold_, "threshold_rule": osr.config_.threshold_rule,
        "train": osr.train_config_.to_dict() if osr.train_config_ else None, "seed": osr.seed,
    })


def load(cls, directory: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu",
         model_ref: str | None = None):
    """The GradientOSR (class ``cls``) that :func:`save` wrote; ``model``: an instance of
    a custom architecture; ``model_ref``: the ``--model package.module:factory`` of a
    user model (:meth:`gradosr.classifier.Classifier.load`)."""
    directory = check_folder(directory, "a run folder (osr.json, classifier/, detector/)")
    run = RunLayout(directory)
    meta = read_json(run.osr_json)
    if meta.get("format") != OSR_FORMAT:
        raise CheckpointError(f"{directory}/osr.json is not a gradosr method file")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION \
            or meta.get("layout", 1) > LAYOUT:
        raise CheckpointError(f"{directory} was written by a newer gradosr (format version "
                              f"{meta.get('format_version')}); upgrade gradosr to read it")
    config = OSRConfig.from_dict(meta["config"])
    clf = Classifier.load(run.classifier, model=model, device=device, model_ref=model_ref)
    tensors, dmeta = load_tensors(run.detector, "detector", DETECTOR_FORMAT)
    try:
        if meta.get("layout", 1) == 1:
            tensors, dmeta = upgrade_layout1(tensors, dmeta, meta, config)
        osr = cls(preset=config.preset, classifier=clf, device=device, seed=int(meta.get("seed", 0)),
                  train_config=TrainConfig.from_dict(meta["train"]) if meta.get("train") else None,
                  **config_options(config))
        osr.config_ = osr.resolved_config()
        if osr.config_ != config:
            raise CheckpointError("its options do not reproduce the stored config")
        osr.classifier_, osr.train_config_ = clf, osr.train_config
        osr.method_ = STRATEGIES[config.method].from_state(tensors, dmeta, config, clf, osr.seed)
        osr.threshold_ = float(meta["threshold"])
    except CheckpointError as exc:
        raise CheckpointError(f"{directory} cannot be read ({exc}): {REFIT}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory} is incomplete or of an unknown layout ({exc}): {REFIT}") from None
    return osr


def upgrade_layout1(tensors: dict, dmeta: dict, osr_meta: dict, config: OSRConfig) -> tuple[dict, dict]:
    """Tensors and detector metadata of a layout-1 run (gradosr before the method layer)
    in layout 2."""
    scalers = {k: v for k, v in tensors.items() if k.startswith("scaler.")}
    if config.method == "proxy":
        unknowns = osr_meta.get("proxy_unknowns") or [osr_meta.get("proxy_unknown")]
        metas = [{k: dmeta[k] for k in ("config", "in_features", "epochs_run")}] + list(dmeta.get("members", []))
        out, members = {}, []
        for i, (labels, m) in enumerate(zip(unknowns, metas)):
            prefix = "" if i == 0 else f"m{i}."
            for k, v in tensors.items():
                if k.startswith(prefix + "net."):
                    out[f"members.{i}.detector.{k[len(prefix) + 4:]}"] = v
                elif k.startswith(prefix + "scaler."):
                    out[f"members.{i}.{k[len(prefix):]}"] = v
            members.append({"proxy_unknown": labels, "detector": m})
        return out, {"param_names": dmeta["param_names"], "members": members}
    fusion = FusionConfig(**dmeta["config"])
    signals, out = {}, {f"scaler.final.{s}": scalers[f"scaler.final.{s}"] for s in ("mean", "std")}
    for s, sc in signal_scorers(fusion).items():
        signals[s] = {"method_id": sc.method_id, "params": _jsonable(sc.get_params()), "fitted": {}}
        if isinstance(sc, KNN):
            signals[s]["params"] = {"k": sc.k, "factors": list(sc.factors), "normalize": sc.normalize}
            signals[s]["fitted"] = {"k_": int(dmeta["k"])}
            for i in range(len(sc.factors)):
                out[f"detector.signals.{s}.bank.{i}"] = tensors[f"fusion.bank.{s}.{i}"]
        elif sc.method_id == "mahalanobis":
            out[f"detector.signals.{s}.means_"] = tensors["fusion.mahalanobis.means"]
            out[f"detector.signals.{s}.whiten_"] = tensors["fusion.mahalanobis.whiten"]
        elif sc.method_id == "gradorth":
            out[f"detector.signals.{s}.subspace_"] = tensors["fusion.bank.gradorth.0"]
        if fusion.combine == "fisher":
            out[f"detector.calibrator.held_out.{s}"] = tensors[f"fusion.calibration.{s}"]
    detector = {"method_id": "fused", "config": dmeta["config"], "signals": signals,
                "calibrator": {"combine": fusion.combine, "stats": dmeta["stats"]}}
    return out, {"param_names": dmeta["param_names"], "detector": detector}
