"""The ``plus`` preset: the fused detector (gradosr.detectors.fusion), its integration in
GradientOSR, multi-preset benchmarks and the ablation runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors
from torch import nn

from gradosr.evaluation.ablation import VARIANT_NAMES, markdown, select_variants
from gradosr.detectors.fusion import FusedScorer, FusionConfig
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.knn import KNN
from gradosr.gradients.logit import logit_gradient
from gradosr.errors import ConfigError
from gradosr.gradients.targets import per_sample_loss
from gradosr.metrics import auroc
from gradosr.models import find_head
from gradosr.methods.config import PRESETS, make_config
from gradosr.osr import GradientOSR
from gradosr.train import TrainConfig
from test_osr import X, X_VAL, Y, Y_VAL, make_data, trained_model


@pytest.fixture(scope="module")
def model():
    return trained_model()


def naive_head_gradients(model: nn.Module, x: np.ndarray, target="confounding", n_ones=None, output="softmax"):
    """Per-sample gradient of the loss w.r.t. the head weight, one backward per sample (N×K×D)."""
    head = find_head(model)
    out = []
    for i in range(len(x)):
        z = model(torch.as_tensor(x[i:i + 1]).double())
        (gw,) = torch.autograd.grad(per_sample_loss(z, target, n_ones, output).sum(), head.weight)
        out.append(gw.detach().clone())
    return torch.stack(out)


def views(model: nn.Module, x: np.ndarray) -> ScorerInputs:
    feats = []
    h = find_head(model).register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        z = model(torch.as_tensor(x).double())
    h.remove()
    return ScorerInputs(z, feats[0], gradients={"logit_grad": logit_gradient(z)})


def fused(config: FusionConfig, train: ScorerInputs, held_out: ScorerInputs) -> FusedScorer:
    return FusedScorer(config).fit(train, Y).calibrate(held_out)


@pytest.mark.parametrize("target,n_ones,output", [("confounding", None, "softmax"), ("confounding", 2, "sigmoid"),
                                                  ("predicted", None, "softmax")])
def test_head_gradient_is_g_times_h(model, target, n_ones, output):
    m = trained_model().double()
    x = X_VAL[:12]
    naive = naive_head_gradients(m, x, target, n_ones, output)
    v = views(m, x)
    g = logit_gradient(v.logits, target, n_ones, output)
    np.testing.assert_allclose((g[:, :, None] * v.features[:, None, :]).numpy(), naive.numpy(), rtol=1e-10,
                               atol=1e-12)


def test_product_of_cosines_knn_equals_knn_on_materialised_gradients(model):
    m = trained_model().double()
    bank, query = naive_head_gradients(m, X), naive_head_gradients(m, X_VAL)
    flat_b = (bank.flatten(1) / bank.flatten(1).norm(dim=1, keepdim=True)).numpy()
    flat_q = (query.flatten(1) / query.flatten(1).norm(dim=1, keepdim=True)).numpy()
    vb, vq = views(m, X), views(m, X_VAL)
    for k in (1, 5):
        expected = NearestNeighbors(n_neighbors=k).fit(flat_b).kneighbors(flat_q)[0][:, -1]
        for dtype, rtol in (("float64", 1e-9), ("float32", 1e-5)):  # a float32 bank: its rows' rounding
            knn = KNN(k, chunk_size=7, factors=("logit_grad", "features"), bank_dtype=dtype).fit(vb, Y)
            np.testing.assert_allclose(knn.kth_distances(vq), expected, rtol=rtol, atol=1e-9)


def test_fused_score_is_the_sum_of_validation_standardised_signals(model):
    m = trained_model().double()
    vt, vv = views(m, X), views(m, X_VAL)
    x_test, _ = make_data(4, seed=5, num_classes=10)
    vq = views(m, x_test)
    det = fused(FusionConfig(signals=("gradient", "features", "max_logit"), k=7), vt, vv)

    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def raw(v):
        g, h, z = v.gradients["logit_grad"].numpy(), v.features.numpy(), v.logits.numpy()
        grad = unit((g[:, :, None] * h[:, None, :]).reshape(len(g), -1))
        gt = vt.gradients["logit_grad"].numpy()
        bank_g = unit((gt[:, :, None] * vt.features.numpy()[:, None, :]).reshape(len(X), -1))
        d_g = NearestNeighbors(n_neighbors=7).fit(bank_g).kneighbors(grad)[0][:, -1]
        d_f = NearestNeighbors(n_neighbors=7).fit(unit(vt.features.numpy())).kneighbors(unit(h))[0][:, -1]
        return [-d_g, -d_f, z.max(1)]

    val_raw, test_raw = raw(vv), raw(vq)
    expected = sum((t - v.mean()) / v.std() for t, v in zip(test_raw, val_raw))
    np.testing.assert_allclose(det.score_samples(vq), expected, rtol=1e-8, atol=1e-8)
    raw_scores = det.signal_scores(vq)
    np.testing.assert_allclose(raw_scores["max_logit"], test_raw[2], rtol=1e-12)
    # GradNorm signal: log of the L1 norm of the uniform-target head gradient
    gn = fused(FusionConfig(signals=("gradnorm",)), vt, vv).signal_scores(vq)["gradnorm"]
    naive = naive_head_gradients(m, x_test, "uniform").abs().flatten(1).sum(1).log().numpy()
    np.testing.assert_allclose(gn, naive, rtol=1e-9)


def test_k_is_capped_by_the_smallest_class(model):
    m = trained_model().double()
    det = fused(FusionConfig(k=50), views(m, X), views(m, X_VAL))
    assert det.k_ == np.bincount(Y).min() == 30


def test_fusion_config_validation():
    with pytest.raises(ConfigError, match="signals"):
        FusionConfig(signals=("gradient", "bogus"))
    with pytest.raises(ConfigError, match="signals"):
        FusionConfig(signals=())
    with pytest.raises(ConfigError, match="gradient_rep"):
        FusionConfig(gradient_rep="full")
    with pytest.raises(ConfigError, match="k must"):
        FusionConfig(k=0)
    with pytest.raises(ConfigError, match="threshold_rule tpr"):
        make_config("plus", threshold_rule="fixed")


def make_plus(model, **options) -> GradientOSR:
    return GradientOSR.from_classifier(model, train_config=TrainConfig(model="custom", epochs=2, batch_size=32),
                                       preset="plus", **options)


@pytest.mark.parametrize("options", [{}, {"gradient_rep": "norms"}, {"signals": ("gradnorm", "max_logit")}])
def test_plus_fit_predict_save_load(model, tmp_path, options):
    osr = make_plus(model, **options).fit(X, Y, X_VAL, Y_VAL)
    assert osr.method_.proxies() == [] and osr.config_.method == "fusion"
    val_scores = osr.score_samples(X_VAL)
    assert (val_scores >= osr.threshold_).mean() >= 0.95  # the tpr rule on held-out knowns
    x_test, y_test = make_data(6, seed=2, num_classes=10)
    scores = osr.score_samples(x_test)
    assert auroc(scores, y_test < 6) > 0.8
    labels = osr.predict(x_test)
    closed = model(torch.as_tensor(x_test)).argmax(1).numpy()
    np.testing.assert_array_equal(labels, np.where(scores >= osr.threshold_, closed, -1))
    osr.save(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "osr.json").read_text())["config"]["method"] == "fusion"
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_array_equal(loaded.score_samples(x_test), scores)
    assert loaded.threshold_ == osr.threshold_


def test_plus_has_no_proxy_representations(model):
    osr = make_plus(model).fit(X, Y, X_VAL, Y_VAL)
    with pytest.raises(ConfigError, match="fusion method has none"):
        osr.representations(X_VAL)


def test_presets_and_ablation_variants():
    assert set(PRESETS) == {"paper", "plus"}
    assert select_variants(["plus*"])[0].name == "plus" and all(v.preset == "plus" for v in select_variants(["plus*"]))
    assert [v.name for v in select_variants(["all"])] == VARIANT_NAMES
    with pytest.raises(ConfigError, match="unknown variant"):
        select_variants(["nope"])
    for v in select_variants(["all"]):  # every variant is a valid config
        opts = {k: x for k, x in v.options.items() if k != "params"}
        make_config(v.preset, **opts)


def test_ablation_markdown_deltas():
    rec = lambda m, a: {"method": m, "split": 0, "auroc": a, "macro_f1_tpr95": 0.5, "macro_f1": 0.5,  # noqa: E731
                        "fpr95": 0.5}
    from gradosr.evaluation.records import summarise

    doc = {"protocol": "x", "command": "c", "splits": [0], "summary": summarise(
        [rec("paper", 0.8), rec("paper-n2", 0.75), rec("plus", 0.9), rec("plus-no-gradient", 0.93)]),
        "variants": [{"name": "paper", "preset": "paper"}, {"name": "paper-n2", "preset": "paper"},
                     {"name": "plus", "preset": "plus"}, {"name": "plus-no-gradient", "preset": "plus"}]}
    text = markdown(doc)
    assert "| paper-n2 |" in text and "-0.050" in text and "+0.030" in text


def test_cli_ablate_writes_tables_and_resumes(tmp_path, capsys):
    from gradosr.cli import main

    out = tmp_path / "abl"
    argv = ["ablate", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "3",
            "--splits", "0", "--epochs", "1", "--variants", "plus,plus-no-gradient", "--out", str(out),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["plus", "plus-no-gradient"]
    assert doc["results"][1]["config"]["fusion"]["signals"] == ["features", "max_logit"]
    assert "| plus-no-gradient |" in (out / "results.md").read_text()
    first = [r["auroc"] for r in doc["results"]]
    assert main(argv) == 0  # the second run reuses the stored records
    assert [r["auroc"] for r in json.loads((out / "results.json").read_text())["results"]] == first
    # --rerun recomputes them (a stored record altered by hand is replaced; without it, kept)
    stored = json.loads((out / "results.json").read_text())
    stored["results"][0]["auroc"] = -1.0
    (out / "results.json").write_text(json.dumps(stored))
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["results"][0]["auroc"] == -1.0
    assert main(argv + ["--rerun"]) == 0
    assert [r["auroc"] for r in json.loads((out / "results.json").read_text())["results"]] == first
    assert main([a if a != "plus,plus-no-gradient" else "nope" for a in argv]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
