"""``gradosr evaluate``: every fitted preset of a run folder (and any baseline) on the
run's protocol split."""

from __future__ import annotations

from pathlib import Path

from gradosr.checkpoint import check_folder
from gradosr.classifier import Classifier
from gradosr.data.protocols import ProtocolSpec, load_protocol
from gradosr.detectors.registry import method_ids, select_methods
from gradosr.errors import CheckpointError
from gradosr.evaluation.scoring import score_split, split_records
from gradosr.runs import RunLayout, check_weights


def fitted_presets(run: Path, device="cpu", model_ref: str | None = None) -> dict:
    """{preset: GradientOSR} of every fitted method stored in the run folder."""
    from gradosr.osr import GradientOSR

    layout, found = RunLayout(run), {}
    if layout.is_fitted():
        osr = GradientOSR.load(layout.root, device=device, model_ref=model_ref)
        found[osr.config_.preset] = osr
    for preset in method_ids("preset"):
        folder = RunLayout(layout.root / preset)
        if preset not in found and folder.is_fitted():
            found[preset] = GradientOSR.load(folder.root, device=device, model_ref=model_ref)
    return found


def evaluate_run(run: Path, methods: list[str] | None, data_dir=None, device="cpu",
                 progress: bool = True, model_ref: str | None = None, weights=None, stream: bool = False,
                 num_workers: int | None = None) -> tuple[list[dict], dict]:
    """Results records for ``methods`` on the run's protocol split (``gradosr evaluate``).

    A GradientOSR preset needs ``<run>/osr.json`` from ``gradosr fit`` (or
    ``<run>/<preset>/osr.json``, as ``gradosr benchmark`` stores presets other than
    ``paper``); the baselines need only the classifier. Default methods: the fitted
    presets and ``msp``. ``model_ref``/``weights``: the ``--model`` and ``--weights`` of a
    run whose classifier is a user model / was loaded from weights, checked against the
    run's record. ``stream``/``num_workers``: how a folder dataset is read
    (:func:`gradosr.data.protocols.load_protocol`). Returns (records, info) with the protocol and classifier metadata.
    """

    run = check_folder(run, "a run folder (classifier/, osr.json)")
    clf_dir = RunLayout(run).classifier
    if not (clf_dir / "model.json").is_file():
        raise CheckpointError(f"{run} has no trained classifier ({clf_dir}/model.json); run gradosr train or fit first")
    clf = Classifier.load(clf_dir, device=device, model_ref=model_ref)
    if not clf.meta.get("complete"):
        raise CheckpointError(f"{clf_dir} holds an unfinished training run; finish it with gradosr train --resume")
    check_weights(clf, weights)
    fitted = fitted_presets(run, device, model_ref)
    if methods is None:
        methods = list(fitted) + ["msp"]
    elif any(m == "all" or m.startswith("family:") for m in methods):
        # presets that this run has not fitted are left out of "all" and "family:<name>"
        chosen = select_methods(methods)
        methods = [m for m in chosen if m not in method_ids("preset") or m in fitted or m in methods]
    missing = [m for m in methods if m in method_ids("preset") and m not in fitted]
    if missing:
        raise CheckpointError(f"{run} has no fitted {missing[0]} method (osr.json): run "
                              f"gradosr fit --preset {missing[0]} --out {run} first")
    spec = ProtocolSpec.from_dict(clf.meta["protocol"])
    data = load_protocol(spec, data_dir, image_size=(clf.meta.get("train") or {}).get("image_size"),
                         stream=stream, num_workers=num_workers)
    skipped: dict[str, str] = {}
    y_true, closed_pred, scores = score_split(clf, data, methods, fitted, progress, skipped=skipped)
    info = {"protocol": spec.to_dict(),
            "classifier": {k: clf.meta.get(k) for k in ("arch", "train", "test_acc", "val_acc", "weights_sha256")},
            "method_params": {m: s.params for m, s in scores.items()}, "skipped": skipped}
    return split_records(spec, y_true, closed_pred, scores), info
