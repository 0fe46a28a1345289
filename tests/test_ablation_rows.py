"""The ablation rows added to the paper and plus families: an ensemble of detectors over
several proxy splits, logit statistics appended to the detector inputs, and GradOrth's
projected head-gradient norm (Behpour et al., NeurIPS 2023)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradosr.detectors.fusion import FusionConfig
from gradosr.detectors.gradorth import GRADORTH_ENERGY, important_subspace
from gradosr.errors import CheckpointError, ConfigError
from gradosr.methods.splits import proxy_split, proxy_splits
from gradosr.osr import GradientOSR, make_config
from test_osr import K, X, X_VAL, Y, Y_VAL, make_data, make_osr, trained_model
from test_plus import fused, naive_head_gradients, views


@pytest.fixture(scope="module")
def model():
    return trained_model()


def test_proxy_splits_are_distinct_and_start_with_the_papers():
    splits = proxy_splits(K, 3, None, 4)
    assert splits[0] == proxy_split(K, 3)
    assert len({tuple(s) for s in splits}) == 4 and all(len(s) == 2 for s in splits)
    assert len(proxy_splits(4, 0, 1, 4)) == 4  # every one of the C(4, 1) sets
    with pytest.raises(ConfigError, match="exceeds the 4 distinct sets"):
        proxy_splits(4, 0, 1, 5)
    with pytest.raises(ConfigError, match="proxy_ensemble"):
        make_config("paper", proxy_ensemble=0)


def test_ensemble_score_is_the_mean_of_single_split_methods(model, tmp_path):
    ens = make_osr(model, proxy_ensemble=2).fit(X, Y, X_VAL, Y_VAL)
    second = proxy_splits(K, 0, None, 2)[1]
    seed1 = next(s for s in range(100) if proxy_split(K, s) == second)
    single0 = make_osr(model).fit(X, Y, X_VAL, Y_VAL)
    single1 = make_osr(model, seed=seed1, detector__seed=0).fit(X, Y, X_VAL, Y_VAL)  # the members share one detector seed
    assert [m.proxy_unknown for m in ens.method_.members_] == [single0.method_.members_[0].proxy_unknown, single1.method_.members_[0].proxy_unknown]
    x_test, _ = make_data(4, seed=2, num_classes=10)
    expected = (single0.score_samples(x_test) + single1.score_samples(x_test)) / 2
    np.testing.assert_allclose(ens.score_samples(x_test), expected, rtol=1e-6, atol=1e-7)

    ens.save(tmp_path / "run")
    assert (tmp_path / "run" / "proxy" / "model.json").is_file()
    assert (tmp_path / "run" / "proxy2" / "model.json").is_file()
    meta = json.loads((tmp_path / "run" / "osr.json").read_text())
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    assert [m.proxy_unknown for m in loaded.method_.members_] == [m.proxy_unknown for m in ens.method_.members_]
    np.testing.assert_array_equal(loaded.score_samples(x_test), ens.score_samples(x_test))
    meta["config"]["proxy_ensemble"] = 3  # a member missing from the files
    (tmp_path / "run" / "osr.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="should hold 3 proxy detectors"):
        GradientOSR.load(tmp_path / "run", model=trained_model())


def test_logit_inputs_are_appended_to_the_gradient_features(model, tmp_path):
    names = ("max_logit", "logsumexp", "max_softmax")
    osr = make_osr(model, logit_inputs=names, standardize="none").fit(X, Y, X_VAL, Y_VAL)
    r = osr.representations(X_VAL)
    assert r.shape == (len(X_VAL), len(osr.method_.param_names_) + 3)
    with torch.no_grad():
        z = model(torch.as_tensor(X_VAL)).double()
    expected = torch.stack([z.max(1).values, torch.logsumexp(z, 1), torch.softmax(z, 1).max(1).values], 1)
    torch.testing.assert_close(r[:, -3:], expected, rtol=1e-5, atol=1e-5)
    assert osr.method_.members_[0].detector.net_[0].in_features == len(osr.method_.param_names_) + 3
    osr.save(tmp_path / "run")
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_array_equal(loaded.score_samples(X_VAL), osr.score_samples(X_VAL))
    with pytest.raises(ConfigError, match="logit_inputs"):
        make_config("paper", logit_inputs=("max_logit", "entropy"))


def test_projection_inputs_are_the_projected_gradients_below_the_head(model, tmp_path):
    from gradosr.gradients.projection import projected_gradients

    osr = make_osr(model, projection_inputs=16, standardize="none").fit(X, Y, X_VAL, Y_VAL)
    r = osr.representations(X_VAL)
    p = len(osr.method_.param_names_)
    # FlatNet: Linear(64, 16) -> 16 × 16 projected columns; the head Linear(16, 6) (6 × 16) is left out
    assert r.shape == (len(X_VAL), p + 256)
    full = projected_gradients(model, torch.as_tensor(X_VAL), 16, seed=osr.seed)
    assert full.shape[1] == 256 + 6 * 16
    torch.testing.assert_close(r[:, p:], full[:, :256])
    osr.save(tmp_path / "run")
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_array_equal(loaded.score_samples(X_VAL), osr.score_samples(X_VAL))
    with pytest.raises(ConfigError, match="projection_inputs"):
        make_config("paper", projection_inputs=-1)


def test_gradorth_is_the_norm_of_the_projected_head_gradient(model):
    m = trained_model().double()
    vt, vv = views(m, X), views(m, X_VAL)
    x_test = make_data(3, seed=4, num_classes=10)[0]
    det = fused(FusionConfig(signals=("gradorth",)), vt, vv)
    # the subspace by hand: numpy's SVD and the smallest rank holding GRADORTH_ENERGY
    _, sv, vh = np.linalg.svd(vt.features.numpy(), full_matrices=False)
    share = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    r = int(np.argmax(share >= GRADORTH_ENERGY)) + 1
    basis = vh[:r].T
    assert important_subspace(vt.features).shape == (vt.features.shape[1], r)
    grads = naive_head_gradients(m, x_test, "uniform").numpy()  # N×K×D
    naive = np.log(np.linalg.norm(grads @ basis @ basis.T, axis=(1, 2)))
    np.testing.assert_allclose(det.signal_scores(views(m, x_test))["gradorth"], naive, rtol=1e-9)


def test_fisher_combination_of_empirical_p_values(model, tmp_path):
    m = trained_model().double()
    vt, vv = views(m, X), views(m, X_VAL)
    vq = views(m, make_data(3, seed=4, num_classes=10)[0])
    det = fused(FusionConfig(combine="fisher"), vt, vv)
    raw_val = fused(FusionConfig(), vt, vv).signal_scores(vv)
    raw = det.signal_scores(vq)
    expected = np.zeros(len(vq))
    for s, r in raw.items():  # p = (#held-out scores <= r, plus one) / (n + 1), by a naive loop
        calib = raw_val[s]
        expected += np.log([(np.sum(calib <= x) + 1) / (len(calib) + 1) for x in r])
    np.testing.assert_allclose(det.score_samples(vq), expected, rtol=1e-12)
    osr = GradientOSR.from_classifier(model, preset="plus", combine="fisher").fit(X, Y, X_VAL, Y_VAL)
    osr.save(tmp_path / "run")
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_array_equal(loaded.score_samples(X_VAL), osr.score_samples(X_VAL))
    assert (osr.score_samples(X_VAL) >= osr.threshold_).mean() >= 0.95
    with pytest.raises(ConfigError, match="combine"):
        FusionConfig(combine="max")


def test_important_subspace_keeps_the_energy_fraction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) @ np.diag([10.0, 3.0, 0.1]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    assert important_subspace(torch.as_tensor(x), 0.5).shape == (3, 1)
    assert important_subspace(torch.as_tensor(x), 0.99).shape == (3, 2)
    assert important_subspace(torch.as_tensor(x), 1.0).shape == (3, 3)


def test_ablation_reuses_records_written_before_new_options_existed(tmp_path):
    from pathlib import Path

    from gradosr.evaluation.ablation import AblationSettings, _finished, _previous_document

    cfg = make_config("paper").to_dict()
    for key in ("proxy_ensemble", "logit_inputs", "projection_inputs"):  # what an older record lacks
        cfg.pop(key)
    cfg["fusion"].pop("projection_dim")
    cfg["fusion"].pop("combine")
    cfg["fusion"].pop("gradient_metric")
    doc = {"protocol": "mnist-sample", "protocol_args": {}, "train_overrides": {}, "seed": 0,
           "results": [{"method": "paper", "split": 0, "config": cfg},
                       {"method": "paper-n2", "split": 0, "config": cfg}]}  # n2's config differs: recomputed
    path = Path(tmp_path) / "results.json"
    path.write_text(json.dumps(doc))
    settings = AblationSettings("mnist-sample", [0], tmp_path, variants=["all"])
    found = _finished(_previous_document(path, settings), settings)
    assert list(found) == [("paper", 0)]


def test_cli_ablate_on_some_variants_keeps_the_others(tmp_path, capsys):
    from gradosr.cli import main

    out = tmp_path / "abl"
    argv = ["ablate", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2", "--unknown", "3",
            "--splits", "0", "--epochs", "1", "--variants", "plus-no-logit", "--out", str(out), "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())["results"]
    assert main([a if a != "plus-no-logit" else "plus" for a in argv]) == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["results"]] == ["plus", "plus-no-logit"]  # in the order of VARIANTS
    assert doc["results"][1] == first[0]
    text = (out / "results.md").read_text()
    assert "| plus |" in text and "| plus-no-logit |" in text
    assert len(doc["commands"]) == 2 and "--variants plus-no-logit" in doc["commands"][0]
    assert doc["commands"][1] == doc["command"] and "--variants plus " in doc["command"]
    assert all(f"- `{c}`" in text for c in doc["commands"])
    doc["results"][1]["config"]["fusion"]["k"] = 7  # a record of a variant defined differently since: dropped
    (out / "results.json").write_text(json.dumps(doc))
    assert main([a if a != "plus-no-logit" else "plus" for a in argv]) == 0, capsys.readouterr().err
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["results"]] == ["plus"]


def test_cli_method_flags_of_the_new_options():
    from gradosr.cli import _method_options, build_parser

    args = build_parser().parse_args(["benchmark", "--protocol", "mnist-sample", "--out", "x", "--proxy-ensemble", "2",
                                      "--logit-inputs", "max_logit, logsumexp", "--gradient-rep", "projection",
                                      "--projection-dim", "8", "--signals", "gradorth,features",
                                      "--projection-inputs", "4", "--combine", "fisher"])
    opts = _method_options(args)
    paper_keys = ("proxy_ensemble", "logit_inputs", "projection_inputs")
    assert opts == {"proxy_ensemble": 2, "logit_inputs": ("max_logit", "logsumexp"), "fusion__gradient_rep": "projection",
                    "fusion__projection_dim": 8, "fusion__signals": ("gradorth", "features"), "projection_inputs": 4,
                    "fusion__combine": "fisher"}
    make_config("paper", **{k: v for k, v in opts.items() if k in paper_keys})
    make_config("plus", **{k: v for k, v in opts.items() if k not in paper_keys})


def test_benchmark_reuses_a_fitted_method_written_before_new_options_existed(tmp_path):
    from gradosr.evaluation.benchmark import _stored_identity
    from gradosr.runs import identity_mismatch

    cfg = make_config("paper").to_dict()
    for key in ("proxy_ensemble", "logit_inputs", "projection_inputs"):
        cfg.pop(key)
    (tmp_path / "osr.json").write_text(json.dumps({"config": cfg, "train": {"epochs": 5}}))
    wanted = {"config": make_config("paper").to_dict(), "train": {"epochs": 5}}
    assert identity_mismatch(_stored_identity(tmp_path / "osr.json"), wanted) is None
    wanted["config"] = make_config("paper", proxy_ensemble=2).to_dict()
    assert "proxy_ensemble" in identity_mismatch(_stored_identity(tmp_path / "osr.json"), wanted)


@pytest.mark.parametrize("rep", ["norms", "projection"])
def test_mahalanobis_in_gradient_space_equals_the_baseline_on_the_gradients(model, tmp_path, rep):
    from gradosr.detectors.inputs import ScorerInputs
    from gradosr.detectors.mahalanobis import Mahalanobis

    osr = GradientOSR.from_classifier(model, preset="plus", gradient_rep=rep, gradient_metric="mahalanobis",
                                      signals=("gradient",)).fit(X, Y, X_VAL, Y_VAL)
    x_test = make_data(3, seed=4, num_classes=10)[0]
    clf = osr.classifier_
    vt, vq = osr.method_.inputs(clf, clf.inputs(X)), osr.method_.inputs(clf, clf.inputs(x_test))
    ref = Mahalanobis().fit(ScorerInputs(vt.logits, vt.gradients[rep]), Y)  # the baseline, on the gradient matrix
    expected = ref.score_samples(ScorerInputs(vq.logits, vq.gradients[rep]))
    np.testing.assert_allclose(osr.method_.detector_.signal_scores(vq)["gradient"], expected, rtol=1e-10)
    osr.save(tmp_path / "run")
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_allclose(loaded.score_samples(x_test), osr.score_samples(x_test), rtol=1e-12)
    with pytest.raises(ConfigError, match="mahalanobis needs"):
        FusionConfig(gradient_metric="mahalanobis")
