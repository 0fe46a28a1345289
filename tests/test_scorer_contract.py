"""The contract every registered scorer keeps (gradosr.detectors.registry): score shapes
and dtypes, score direction (higher = known), NotFittedError before fit, a chunked fit
equal to a one-shot fit, a save/load round trip through safetensors + JSON, and
determinism. A scorer registered in a test with one line runs through the same contract
and through ``gradosr benchmark`` with no other change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gradosr.checkpoint import load_tensors, save_tensors
from gradosr.detectors import METHODS, Scorer, ScorerInputs, make_scorer, register, unregister
from gradosr.errors import NotFittedError
from gradosr.gradients.logit import logit_gradient
from gradosr.gradients.projection import projected_gradients
from gradosr.models import find_head
from test_osr import X, X_VAL, Y, make_data, trained_model

MODEL = trained_model()
X_TEST, Y_TEST = make_data(8, seed=2, num_classes=10)  # classes 6..9 are unknown
X_PSEUDO, _ = make_data(6, seed=7, num_classes=10)  # the MLP detector's "unknown" training rows
IS_KNOWN = Y_TEST < 6


def inputs(x: np.ndarray) -> ScorerInputs:
    """Every field a registered scorer may read, from the tiny trained model."""
    feats = []
    head = find_head(MODEL)
    hook = head.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    xt = torch.as_tensor(x)
    with torch.no_grad():
        z = MODEL(xt)
    hook.remove()
    return ScorerInputs(z, feats[0], xt, MODEL, head.weight.detach(), head.bias.detach(),
                        gradients={"logit_grad": logit_gradient(z), "representation": feats[0].double(),
                                   "projection": projected_gradients(MODEL, xt, 4, seed=0)})


TRAIN, VAL, TEST = inputs(X), inputs(X_VAL), inputs(X_TEST)


def training_set(method_id: str) -> tuple[ScorerInputs, np.ndarray]:
    """(inputs, labels) a scorer is fitted on: known training samples with their classes,
    or for the binary MLP detector known (1) and pseudo-unknown (0) rows."""
    if method_id == "mlp":
        extra = inputs(X_PSEUDO[make_data(6, seed=7, num_classes=10)[1] >= 6])
        return ScorerInputs.concat([TRAIN, extra]), np.r_[np.ones(len(TRAIN), bool), np.zeros(len(extra), bool)]
    return TRAIN, Y


def fitted(method_id: str, chunks: int = 1) -> Scorer:
    scorer = make_scorer(method_id)
    data, labels = training_set(method_id)
    if chunks == 1:
        scorer.fit(data, labels)
    else:
        edges = np.linspace(0, len(data), chunks + 1).astype(int)
        scorer.fit([(data.rows(slice(a, b)), labels[a:b]) for a, b in zip(edges[:-1], edges[1:])])
    if getattr(scorer, "needs_calibration", False):
        scorer.calibrate(VAL)
    return scorer


def check_contract(method_id: str, tmp_path) -> None:
    scorer = fitted(method_id)
    s = scorer.score_samples(TEST)
    assert isinstance(s, np.ndarray) and s.dtype == np.float64 and s.shape == (len(X_TEST),)
    assert np.isfinite(s).all()
    assert roc_auc_score(IS_KNOWN, s) > 0.6, f"{method_id}: higher must mean known"
    if scorer.needs_fit:
        with pytest.raises(NotFittedError):
            make_scorer(method_id).score_samples(TEST)
    np.testing.assert_array_equal(fitted(method_id, chunks=3).score_samples(TEST), s)
    np.testing.assert_array_equal(fitted(method_id).score_samples(TEST), s)  # deterministic
    tensors, meta = scorer.state()
    save_tensors(tmp_path, method_id, tensors, meta, "test.scorer")
    t2, m2 = load_tensors(tmp_path, method_id, "test.scorer")
    restored = type(scorer).from_state(t2, m2)
    np.testing.assert_array_equal(restored.score_samples(TEST), s)
    assert restored.get_params().keys() == scorer.get_params().keys()


SCORER_IDS = [m for m, info in METHODS.items() if info.kind != "preset"]


@pytest.mark.parametrize("method_id", SCORER_IDS)
def test_registered_scorer_contract(method_id, tmp_path):
    info = METHODS[method_id]
    assert info.family and info.paper and info.kind in ("baseline", "component")
    check_contract(method_id, tmp_path)


def test_registry_lists_the_presets_then_the_baselines():
    import gradosr.methods  # noqa: F401

    ids = list(METHODS)
    assert ids[:2] == ["paper", "plus"]
    assert [m for m in ids if METHODS[m].kind == "baseline"] == [
        "msp", "mls", "energy", "odin", "openmax", "mahalanobis", "knn", "gradnorm", "gradunc",
        "vim", "rmds", "fdbd", "nnguide", "gen", "entropy", "klm", "nci", "gmm",
        "react", "ash_s", "ash_b", "ash_p", "scale", "dice", "she",
        "nac", "grood", "gaia_z", "gaia_a", "mahalanobis_ml", "mahalanobis_ml_pp"]


def test_missing_input_is_one_clear_error():
    from gradosr.errors import DataError

    with pytest.raises(DataError, match="needs 'features', which was not computed"):
        make_scorer("knn").fit(ScorerInputs(logits=TRAIN.logits), Y)


class LogitMargin(Scorer):
    """A scorer defined in a test: the gap between the two largest logits (higher = known)."""

    method_id = "test-logit-margin"
    family = "logit"
    paper = "(a test)"

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        top2 = torch.as_tensor(inputs.get("logits")).to(torch.float64).topk(2, dim=1).values
        return (top2[:, 0] - top2[:, 1]).numpy()


@pytest.fixture
def logit_margin():
    register(LogitMargin)  # the one line a new method needs
    yield LogitMargin
    unregister(LogitMargin.method_id)


def test_a_scorer_registered_in_one_line_runs_the_contract_and_the_benchmark(logit_margin, tmp_path):
    from gradosr.evaluation.benchmark import BenchmarkSettings, run_benchmark
    from gradosr.classifier import Classifier
    from gradosr.data.protocols import load_protocol, resolve_protocol
    from gradosr.evaluation.scoring import test_images, test_labels

    check_contract(LogitMargin.method_id, tmp_path)
    settings = BenchmarkSettings(protocol="mnist-sample", splits=[0], methods=["msp", LogitMargin.method_id],
                                 out=tmp_path / "bench", train_overrides={"epochs": 1}, progress=False, command="t")
    doc = run_benchmark(settings, log=lambda s: None)
    rec = next(r for r in doc["results"] if r["method"] == LogitMargin.method_id)
    clf = Classifier.load(tmp_path / "bench" / "runs" / "split0" / "classifier")
    data = load_protocol(resolve_protocol("mnist-sample", split=0))
    top2 = clf.logits(clf.inputs(test_images(data))).double().topk(2, dim=1).values.numpy()
    margin = top2[:, 0] - top2[:, 1]  # computed here, independently of the scorer
    assert rec["auroc"] == pytest.approx(roc_auc_score(test_labels(data) >= 0, margin), abs=1e-12)
