"""Tests for gradosr.osr.GradientOSR (user models, options, persistence, errors),
gradosr.representation.extract and the MLP unknown detector."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import gradosr.osr as osr_mod
from gradosr.detectors.mlp import DetectorConfig, MLPDetector
from gradosr.detectors.inputs import ScorerInputs
from gradosr.errors import CheckpointError, ConfigError, DataError, NotFittedError
from gradosr.gradients import squared_norms
from gradosr.metrics import auroc, threshold_at_tpr
from gradosr.methods.splits import proxy_split
from gradosr.osr import GradientOSR
from gradosr.representation import RepresentationConfig, extract, transform
from gradosr.train import TrainConfig
from tiny_runs import FlatNet

K = 6
N_PER_CLASS = 30


def TinyNet(k: int = K) -> FlatNet:
    """Flatten -> Linear(64, 16) -> ReLU -> Linear(16, k) on 1×8×8 inputs."""
    return FlatNet(k)


def make_data(n_per_class: int, seed: int, num_classes: int = K):
    """Separable float inputs N×1×8×8: fixed class prototypes plus Gaussian noise."""
    protos = np.random.default_rng(123).normal(0.0, 1.0, (10, 1, 8, 8)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = (protos[y] + rng.normal(0.0, 0.5, (len(y), 1, 8, 8))).astype(np.float32)
    return x, y


X, Y = make_data(N_PER_CLASS, seed=0)
X_VAL, Y_VAL = make_data(8, seed=1)


def trained_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(X), torch.as_tensor(Y)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> TinyNet:
    m = trained_model()
    assert (m(torch.as_tensor(X_VAL)).argmax(1).numpy() == Y_VAL).mean() > 0.9
    return m


def make_osr(model: nn.Module, **options) -> GradientOSR:
    options.setdefault("max_epochs", 15)
    options.setdefault("preset", "paper")
    return GradientOSR.from_classifier(model, train_config=TrainConfig(model="custom", epochs=2, batch_size=32),
                                       **options)


@pytest.fixture(scope="module")
def fitted(model) -> GradientOSR:
    return make_osr(model).fit(X, Y)


# ------------------------------------------------------------------ fit / predict


def test_fit_scores_and_predictions(fitted, model):
    x_test, _ = make_data(5, seed=2, num_classes=10)  # knowns 0..5 and unseen classes 6..9
    scores = fitted.score_samples(x_test)
    assert scores.dtype == np.float64 and scores.shape == (len(x_test),)
    assert np.all((scores >= 0) & (scores <= 1))
    with torch.no_grad():
        closed = model(torch.as_tensor(x_test)).argmax(1).numpy()
    expected = np.where(scores >= fitted.threshold_, closed, -1)
    labels = fitted.predict(x_test)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)
    labels2, scores2 = fitted.predict(x_test, return_scores=True)
    np.testing.assert_array_equal(labels2, expected)
    np.testing.assert_array_equal(scores2, scores)
    assert fitted.threshold_ == 0.95 and fitted.config_.threshold_rule == "fixed"


def test_proxy_split_and_proxy_model(fitted, model):
    assert len(fitted.method_.members_[0].proxy_unknown) == max(1, round(K / 3)) == 2
    expected = sorted(int(c) for c in np.random.default_rng(fitted.seed).choice(K, 2, replace=False))
    assert fitted.method_.members_[0].proxy_unknown == expected == proxy_split(K, fitted.seed)
    assert proxy_split(K, 5) == proxy_split(K, 5)
    assert len({tuple(proxy_split(K, s)) for s in range(10)}) > 1  # the seed matters
    proxy = fitted.method_.members_[0].proxy.model
    assert proxy.head.out_features == K - 2
    assert [n for n, _ in proxy.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert proxy is not model and fitted.classifier_.model is model
    keep = [c for c in range(K) if c not in fitted.method_.members_[0].proxy_unknown]
    assert fitted.method_.members_[0].proxy.class_ids == keep
    assert fitted.method_.param_names_ == [n for n, _ in model.named_parameters()]
    # refit with the same seed: same split
    again = make_osr(model).fit(X, Y)
    assert again.method_.members_[0].proxy_unknown == fitted.method_.members_[0].proxy_unknown


def test_proxy_factory_is_used(model):
    sizes = []

    def factory(n):
        sizes.append(n)
        return TinyNet(n)

    osr = GradientOSR.from_classifier(model, preset="paper", train_config=TrainConfig(model="custom", epochs=1, batch_size=32),
                                      proxy_factory=factory, max_epochs=5).fit(X, Y)
    assert sizes == [K - 2] and osr.method_.members_[0].proxy.model.head.out_features == K - 2


def test_options_are_recorded(model):
    osr = make_osr(model, target="uniform", output="sigmoid", n_ones=2, standardize="own",
                   detector_data="heldout", threshold_rule="tpr", hidden=8)
    cfg = osr.resolved_config()
    rep = cfg.representation
    assert (rep.target, rep.output, rep.n_ones) == ("uniform", "sigmoid", 2)
    assert (cfg.standardize, cfg.detector_data, cfg.threshold_rule) == ("own", "heldout", "tpr")
    assert cfg.detector.hidden == 8 and cfg.detector.max_epochs == 15
    d = cfg.to_dict()
    assert d["representation"]["target"] == "uniform" and d["detector"]["hidden"] == 8
    assert osr_mod.OSRConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError):
        make_osr(model, standardize="sometimes")
    with pytest.raises(ConfigError):
        make_osr(model, n_ones=1)
    with pytest.raises(ConfigError):
        make_osr(model, no_such_option=3)


def test_threshold_rule_tpr(model):
    osr = make_osr(model, threshold_rule="tpr").fit(X, Y, X_VAL, Y_VAL)
    assert osr.threshold_ == threshold_at_tpr(osr.score_samples(X_VAL), 0.95)
    assert osr.threshold_ != 0.95
    accepted = (osr.score_samples(X_VAL) >= osr.threshold_).mean()
    assert accepted >= 0.95


def test_target_changes_the_representation(model, fitted):
    uniform = make_osr(model, target="uniform").fit(X, Y)
    r_conf = fitted.method_.raw_representations(fitted.classifier_, torch.as_tensor(X_VAL))
    r_unif = uniform.method_.raw_representations(uniform.classifier_, torch.as_tensor(X_VAL))
    assert r_conf.shape == r_unif.shape
    assert not torch.allclose(r_conf, r_unif)
    expected = transform(squared_norms(model, torch.as_tensor(X_VAL), target="uniform")[0], True)
    torch.testing.assert_close(r_unif, expected)


def test_detector_data_heldout_trains_on_heldout_proxy_knowns(model, monkeypatch):
    seen = []
    orig_fit = MLPDetector.fit

    def spy(self, x, is_known=None):
        seen.append(np.asarray(is_known).copy())
        return orig_fit(self, x, is_known)

    monkeypatch.setattr(MLPDetector, "fit", spy)
    make_osr(model, detector_data="train").fit(X, Y, X_VAL, Y_VAL)
    osr = make_osr(model, detector_data="heldout").fit(X, Y, X_VAL, Y_VAL)
    u = osr.method_.members_[0].proxy_unknown
    n_unknown = int(np.isin(Y, u).sum() + np.isin(Y_VAL, u).sum())
    train_known, heldout_known = seen
    assert int(train_known.sum()) == int((~np.isin(Y, u)).sum())
    assert int(heldout_known.sum()) == int((~np.isin(Y_VAL, u)).sum())
    assert int((~train_known).sum()) == int((~heldout_known).sum()) == n_unknown


def test_standardize_options(model, fitted):
    assert fitted.method_.members_[0].scalers["proxy"] is fitted.method_.members_[0].scalers["final"]
    own = make_osr(model, standardize="own").fit(X, Y, X_VAL, Y_VAL)
    rep = own.config_.representation
    r_final = transform(extract(model, torch.as_tensor(X_VAL), rep)[0], rep.log)
    torch.testing.assert_close(own.method_.members_[0].scalers["final"].mean, r_final.mean(0))
    torch.testing.assert_close(own.method_.members_[0].scalers["final"].std, r_final.std(0, unbiased=False))
    assert not torch.allclose(own.method_.members_[0].scalers["proxy"].mean, own.method_.members_[0].scalers["final"].mean)
    # the final classifier's held-out knowns are standardised to mean 0 / std 1
    z = own.representations(X_VAL)
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1], dtype=torch.float64), atol=1e-9, rtol=0)
    none = make_osr(model, standardize="none").fit(X, Y)
    torch.testing.assert_close(none.representations(X_VAL), r_final)


# -------------------------------------------------------------------- persistence


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path)
    for rel in ("classifier/model.safetensors", "classifier/model.json", "proxy/model.safetensors",
                "proxy/model.json", "detector/detector.safetensors", "detector/detector.json", "osr.json"):
        assert (tmp_path / rel).is_file(), rel
    meta = json.loads((tmp_path / "osr.json").read_text())
    assert meta["threshold"] == fitted.threshold_ and meta["layout"] == 2
    assert meta["config"] == fitted.config_.to_dict()

    loaded = GradientOSR.load(tmp_path, model=TinyNet())
    x_test, _ = make_data(4, seed=3, num_classes=10)
    np.testing.assert_array_equal(loaded.score_samples(x_test), fitted.score_samples(x_test))
    np.testing.assert_array_equal(loaded.predict(x_test), fitted.predict(x_test))
    assert loaded.threshold_ == fitted.threshold_ and loaded.config_ == fitted.config_
    assert loaded.method_.members_[0].proxy_unknown == fitted.method_.members_[0].proxy_unknown

    with pytest.raises(CheckpointError):
        GradientOSR.load(tmp_path)  # a custom model needs an instance


def test_load_refuses_newer_format(fitted, tmp_path):
    fitted.save(tmp_path)
    meta = json.loads((tmp_path / "osr.json").read_text())
    meta["format_version"] += 1
    (tmp_path / "osr.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer"):
        GradientOSR.load(tmp_path, model=TinyNet())


def test_load_refuses_tampered_detector(fitted, tmp_path):
    fitted.save(tmp_path)
    path = tmp_path / "detector" / "detector.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        GradientOSR.load(tmp_path, model=TinyNet())


# ----------------------------------------------------------------- representations


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_extract_streams_like_one_batch(model, batch_size):
    m = TinyNet().double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x = torch.as_tensor(X_VAL[:10], dtype=torch.float64)
    cfg = RepresentationConfig()
    feats, names = extract(m, x, cfg, batch_size=batch_size)
    ref, ref_names = squared_norms(m, x)
    assert names == ref_names == [n for n, _ in m.named_parameters()]
    assert feats.dtype == torch.float64 and feats.shape == (10, 4)
    torch.testing.assert_close(feats, ref, rtol=1e-10, atol=0)
    sub, _ = extract(m, x, RepresentationConfig(params=("head.weight",), n_ones=2, output="sigmoid"), batch_size)
    ref_sub, _ = squared_norms(m, x, n_ones=2, output="sigmoid", params=["head.weight"])
    torch.testing.assert_close(sub, ref_sub, rtol=1e-10, atol=0)


def test_extract_empty(model):
    feats, names = extract(model, torch.zeros(0, 1, 8, 8), RepresentationConfig())
    assert feats.shape == (0, 4) and len(names) == 4


# ------------------------------------------------------------------------- errors


def test_predict_before_fit(model):
    osr = make_osr(model)
    with pytest.raises(NotFittedError):
        osr.predict(X_VAL)
    with pytest.raises(NotFittedError):
        osr.score_samples(X_VAL)
    with pytest.raises(NotFittedError):
        osr.save("/nonexistent-never-written")


def test_fit_on_arrays_needs_a_classifier():
    with pytest.raises(ConfigError):
        GradientOSR().fit(X, Y)


def test_fit_rejects_bad_labels_and_inputs(model):
    with pytest.raises(DataError):
        make_osr(model).fit(X, np.where(Y == 5, 6, Y))
    with pytest.raises(DataError):
        make_osr(model).fit(X, np.where(Y == 5, -1, Y))
    with pytest.raises(DataError):
        make_osr(model).fit(X, Y[:-1])
    bad = X.copy()
    bad[3, 0, 2, 2] = np.nan
    with pytest.raises(DataError):
        make_osr(model).fit(bad, Y)
    with pytest.raises(DataError):  # a known class with no samples
        keep = Y != 4
        make_osr(model).fit(X[keep], Y[keep], X_VAL, Y_VAL)


def test_predict_rejects_nan(fitted):
    bad = X_VAL.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(DataError):
        fitted.predict(bad)
    with pytest.raises(DataError):
        fitted.score_samples(bad)


def test_empty_batch_gives_empty_outputs(fitted):
    empty = X_VAL[:0]
    scores = fitted.score_samples(empty)
    assert scores.shape == (0,) and scores.dtype == np.float64
    labels, scores = fitted.predict(empty, return_scores=True)
    assert labels.shape == (0,) and labels.dtype == np.int64 and scores.shape == (0,)


def test_from_classifier_checks_class_ids(model):
    with pytest.raises(ConfigError):
        GradientOSR.from_classifier(model, class_ids=[0, 1, 2])


# ------------------------------------------------------------------ MLP detector


def detector_data(n: int, seed: int):
    """Two Gaussian blobs in 5-D, known at +1.5, unknown at -1.5."""
    rng = np.random.default_rng(seed)
    is_known = np.arange(n) % 2 == 0
    x = rng.normal(0.0, 1.0, (n, 5)) + np.where(is_known, 1.5, -1.5)[:, None]
    return x.astype(np.float32), is_known


def rep(x) -> ScorerInputs:
    """Detector inputs x (N×P) as the MLP detector reads them."""
    return ScorerInputs(gradients={"representation": torch.as_tensor(x)})


def test_mlp_detector_is_seeded_and_learns():
    x, y = detector_data(200, seed=0)
    x_test, y_test = detector_data(200, seed=1)
    cfg = DetectorConfig(hidden=16, max_epochs=30, seed=3)
    a = MLPDetector(cfg).fit(rep(x), y)
    b = MLPDetector(cfg).fit(rep(x), y)
    pa, pb = a.predict_proba(x_test), b.predict_proba(x_test)
    assert pa.dtype == np.float64 and pa.shape == (200,)
    np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.score_samples(rep(x_test)), pa)
    c = MLPDetector(DetectorConfig(hidden=16, max_epochs=30, seed=4)).fit(rep(x), y)
    assert not np.array_equal(c.predict_proba(x_test), pa)
    assert auroc(pa, y_test) > 0.95
    assert pa[y_test].mean() > 0.5 > pa[~y_test].mean()  # P(known): high for knowns
    assert 1 <= len(a.history_) <= 30
    # round trip through state()
    tensors, meta = a.state()
    np.testing.assert_array_equal(MLPDetector.from_state(tensors, meta).predict_proba(x_test), pa)


def test_mlp_detector_rejects_bad_input():
    x, y = detector_data(40, seed=0)
    with pytest.raises(DataError):
        MLPDetector().fit(rep(x), np.ones(40, bool))
    with pytest.raises(DataError):
        MLPDetector().fit(rep(x), np.zeros(40, bool))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError):
        MLPDetector().fit(rep(bad), y)
    with pytest.raises(NotFittedError):
        MLPDetector().predict_proba(x)
    det = MLPDetector(DetectorConfig(max_epochs=2)).fit(rep(x), y)
    with pytest.raises(DataError):
        det.predict_proba(x[:, :3])


def test_detector_probabilities_keep_order_for_confident_logits():
    """P(known) must not saturate to ties: logits 18 and 25 stay ordered (float32's
    sigmoid rounds both to exactly 1.0)."""
    from gradosr.detectors.mlp import DetectorConfig, MLPDetector

    tensors = {"0.weight": torch.eye(1), "0.bias": torch.zeros(1),
               "2.weight": torch.ones(1, 1), "2.bias": torch.zeros(1)}
    det = MLPDetector.from_state(tensors, {"config": {**DetectorConfig(hidden=1).__dict__}, "in_features": 1})
    p = det.predict_proba(np.array([[18.0], [25.0], [30.0]], dtype=np.float32))
    expected = 1.0 / (1.0 + np.exp(-np.array([18.0, 25.0, 30.0])))
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert p[0] < p[1] < p[2] < 1.0
