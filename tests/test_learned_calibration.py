"""The ``learned`` combination of the fused detector (docs/ablation.md, round 4): its
non-negative logistic regression against scikit-learn, the weighted Fisher's
combination against a naive loop, and the outliers generated from held-out knowns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from gradosr.data.calibration_outliers import make_outliers
from gradosr.detectors.calibration import LearnedFisher, nonnegative_logistic
from gradosr.detectors.fusion import FusedScorer, FusionConfig
from gradosr.errors import ConfigError, DataError
from gradosr.osr import GradientOSR
from test_osr import X, X_VAL, Y, Y_VAL, trained_model
from test_plus import views


def _sklearn(x, y, alpha):
    c = np.where(y == 1, 0.5 / (y == 1).sum(), 0.5 / (y == 0).sum())
    lr = LogisticRegression(C=1 / alpha, tol=1e-12, max_iter=10000).fit(x, y, sample_weight=c)
    return lr.coef_[0], lr.intercept_[0]


def _two_classes(rng, n, shift):
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    x = rng.normal(size=(2 * n, len(shift))) + np.outer(y, shift)
    return x, y


def test_nonnegative_logistic_is_sklearns_when_no_bound_is_active():
    rng = np.random.default_rng(0)
    x, y = _two_classes(rng, 150, [1.0, 0.5, 2.0])
    w, b = nonnegative_logistic(x, y, 1e-3)
    w_ref, b_ref = _sklearn(x, y, 1e-3)
    assert (w_ref > 0).all()
    np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
    assert b == pytest.approx(b_ref, abs=1e-4)


def test_an_anti_informative_signal_gets_weight_zero():
    rng = np.random.default_rng(1)
    x, y = _two_classes(rng, 200, [1.5, -1.0, 0.8])  # the second column is higher for class 0
    w, b = nonnegative_logistic(x, y, 1e-3)
    assert _sklearn(x, y, 1e-3)[0][1] < 0 and w[1] == 0.0
    w_ref, b_ref = _sklearn(x[:, [0, 2]], y, 1e-3)  # the constrained optimum is the fit without it
    np.testing.assert_allclose(w[[0, 2]], w_ref, rtol=1e-4, atol=1e-5)
    assert b == pytest.approx(b_ref, abs=1e-4)
    with pytest.raises(DataError, match="both"):
        nonnegative_logistic(x[y == 1], y[y == 1], 1e-3)


def test_learned_fisher_is_the_weighted_naive_fisher_sum():
    rng = np.random.default_rng(2)
    held = {"a": rng.normal(size=80), "b": rng.normal(size=80), "c": rng.normal(size=80)}
    out = {"a": rng.normal(-1.5, 1, 60), "b": rng.normal(0, 1, 60), "c": rng.normal(-0.5, 1, 60)}
    cal = LearnedFisher().fit(held, out)

    def logp(s, r):  # p = (#held-out <= r, plus one) / (n + 1), naive
        return np.log([(np.sum(held[s] <= v) + 1) / (len(held[s]) + 1) for v in r])

    feats = np.column_stack([logp(s, np.r_[held[s], out[s]]) for s in held])
    w, _ = nonnegative_logistic(feats, np.r_[np.ones(80), np.zeros(60)], LearnedFisher.alpha)
    assert cal.weights_ == pytest.approx(dict(zip(held, w)), abs=1e-9)
    assert cal.weights_["a"] > cal.weights_["c"] >= 0 and not cal.fallback_
    query = {s: rng.normal(size=7) for s in held}
    expected = sum(cal.weights_[s] * logp(s, query[s]) for s in held)
    np.testing.assert_allclose(cal.combine(query), expected, rtol=1e-12)
    # the state round trip
    tensors, meta = cal.state()
    np.testing.assert_array_equal(LearnedFisher.from_state(tensors, meta).combine(query), cal.combine(query))
    with pytest.raises(DataError, match="generated outliers"):
        LearnedFisher().fit(held)
    with pytest.raises(DataError, match="differ"):
        LearnedFisher().fit(held, {"a": out["a"]})
    with pytest.raises(DataError, match="not finite"):
        LearnedFisher().fit(held, {**out, "b": np.r_[np.nan, out["b"][1:]]})


def test_learned_fisher_falls_back_to_fisher_when_nothing_separates():
    rng = np.random.default_rng(3)
    held = {"a": rng.normal(size=100)}
    out = {"a": rng.normal(2.0, 1, 100)}  # the outliers score *higher*: weight 0
    cal = LearnedFisher().fit(held, out)
    assert cal.fallback_ and cal.weights_ == {"a": 1.0}


def test_mixup_outliers_mix_two_rows_of_different_classes():
    n = 12
    x = torch.eye(n, dtype=torch.float64).view(n, 1, 1, n)  # row i is the basis image e_i
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    chunks = [(x[:8], labels[:8]), (x[8:], labels[8:])]  # the second chunk holds one class only
    out = list(make_outliers(iter(chunks), ("mixup",), seed=0))
    assert len(out) == 1 and out[0].shape == (8, 1, 1, n)
    coef = out[0].view(8, n).numpy()
    for r, row in enumerate(coef):
        nz = np.flatnonzero(row)
        assert r in nz and len(nz) == 2  # row r mixed with one partner of the same chunk
        j = nz[nz != r][0]
        assert j < 8 and labels[j] != labels[r]
        assert 0.4 <= row[r] <= 0.6 and row.sum() == pytest.approx(1.0)
    again = list(make_outliers(iter(chunks), ("mixup",), seed=0))
    torch.testing.assert_close(again[0], out[0])
    assert not torch.equal(next(make_outliers(iter(chunks), ("mixup",), seed=1)), out[0])


def test_jigsaw_outliers_shuffle_whole_tiles():
    x = torch.arange(3 * 2 * 8 * 8, dtype=torch.float64).view(3, 2, 8, 8)  # every pixel distinct
    (out,) = list(make_outliers(iter([(x, np.zeros(3, int))]), ("jigsaw",), seed=0))
    for i in range(3):
        tiles = {tuple(x[i, :, r:r + 2, c:c + 2].flatten().tolist()): (r, c) for r in range(0, 8, 2)
                 for c in range(0, 8, 2)}
        moved = [tiles[tuple(out[i, :, r:r + 2, c:c + 2].flatten().tolist())] != (r, c)
                 for r in range(0, 8, 2) for c in range(0, 8, 2)]  # every output tile is an input tile
        assert any(moved)
        assert sorted(out[i].flatten().tolist()) == sorted(x[i].flatten().tolist())
    with pytest.raises(ConfigError, match="calibration outliers"):
        FusionConfig(calibration_outliers=("mixup", "noise"))


def test_plus_with_the_learned_combination_fits_saves_and_loads(tmp_path):
    model = trained_model()
    osr = GradientOSR.from_classifier(model, preset="plus", combine="learned").fit(X, Y, X_VAL, Y_VAL)
    det = osr.method_.detector_
    weights = det.calibrator_.weights_
    assert set(weights) == {"activation", "gradient", "features", "max_logit"}
    assert all(v >= 0 for v in weights.values())
    # the fused score is the weighted sum of the signals' log p-values on held-out knowns
    inputs = osr.method_.inputs(osr.classifier_, torch.as_tensor(X_VAL))
    raw = det.signal_scores(inputs)
    held = det.calibrator_.held_out_
    naive = sum(weights[s] * np.log((np.searchsorted(held[s].numpy(), raw[s], side="right") + 1)
                                    / (len(held[s]) + 1)) for s in raw)
    np.testing.assert_allclose(osr.score_samples(X_VAL), naive, rtol=1e-9)
    assert (osr.score_samples(X_VAL) >= osr.threshold_).mean() >= 0.95
    osr.save(tmp_path / "run")
    loaded = GradientOSR.load(tmp_path / "run", model=trained_model())
    np.testing.assert_array_equal(loaded.score_samples(X_VAL), osr.score_samples(X_VAL))
    again = GradientOSR.from_classifier(trained_model(), preset="plus", combine="learned").fit(X, Y, X_VAL, Y_VAL)
    assert again.method_.detector_.calibrator_.weights_ == pytest.approx(weights, abs=1e-9)


def test_learned_combination_refuses_to_calibrate_without_outliers():
    m = trained_model().double()
    det = FusedScorer(FusionConfig(combine="learned")).fit(views(m, X), Y)
    with pytest.raises(DataError, match="needs outliers"):
        det.calibrate(views(m, X_VAL))
    det.calibrate(views(m, X_VAL), views(m, X_VAL[:, :, ::-1].copy()))
    assert set(det.calibrator_.weights_) == {"gradient", "features", "max_logit"}
