"""Activation-shaping baselines (ReAct, ASH-S/-B/-P, SCALE, DICE) and SHE, each checked
against an independent NumPy transcription of its paper's formula on small synthetic
penultimate features and a linear head, to 1e-10 in float64: ReAct's clip against a
percentile interpolated by hand, ASH's kept set against a per-row argsort, DICE's mask
against a top-k of the contribution matrix, SHE's patterns by a loop over classes."""

import numpy as np
import pytest
import torch

from gradosr.detectors import METHODS
from gradosr.detectors.ash import AshB, AshP, AshS
from gradosr.detectors.dice import Dice
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.react import ReAct
from gradosr.detectors.scale import Scale
from gradosr.detectors.shaping import top_mask
from gradosr.detectors.she import SHE
from gradosr.errors import ConfigError, DataError

K, D = 5, 12
TOL = dict(rtol=1e-10, atol=1e-12)


def relu_features(n, seed, d=D):
    """Non-negative features with exact zeros (as after a ReLU) and some tied values."""
    rng = np.random.default_rng(seed)
    h = np.maximum(rng.normal(0.3, 1.0, size=(n, d)), 0.0)
    h[:, 1] = h[:, d - 1]  # ties between two units
    return h


def head(seed, k=K, d=D):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.5, size=(k, d)), rng.normal(0, 0.3, size=k)


W, B = head(0)
H_TRAIN, H_TEST = relu_features(80, 1), relu_features(30, 2)


def outs(h, w=W, b=B, logits=None):
    """ScorerInputs (float64 kept) of features h through the head w, b."""
    z = h @ w.T + (0.0 if b is None else b) if logits is None else logits
    return ScorerInputs(logits=torch.as_tensor(z), features=torch.as_tensor(h), head_weight=torch.as_tensor(w),
                        head_bias=None if b is None else torch.as_tensor(b))


def np_energy(z):
    """logsumexp per row, written out."""
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def kept_by_hand(row, k):
    """Indices of the k largest entries of one row, ties to the lower index."""
    return np.argsort(-row, kind="stable")[:k]


# --------------------------------------------------------------------------- ReAct


def percentile_by_hand(values, q):
    """The q-th percentile with linear interpolation between order statistics."""
    v = np.sort(values)
    pos = q / 100 * (len(v) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def test_react_clips_at_the_90th_percentile_of_all_training_activations():
    scorer = ReAct().fit(outs(H_TRAIN), np.zeros(len(H_TRAIN), int))
    c = percentile_by_hand(H_TRAIN.ravel(), 90)
    assert c == pytest.approx(np.percentile(H_TRAIN.ravel(), 90), rel=1e-12)
    assert scorer.params["clip"] == pytest.approx(c, rel=1e-12)
    assert scorer.params["percentile"] == 90.0
    np.testing.assert_allclose(scorer.score_samples(outs(H_TEST)), np_energy(np.minimum(H_TEST, c) @ W.T + B), **TOL)


def test_react_on_signed_features():
    rng = np.random.default_rng(5)
    train, test = rng.normal(size=(60, D)), rng.normal(size=(20, D))
    scorer = ReAct(percentile=75).fit(outs(train), np.zeros(60, int))
    c = percentile_by_hand(train.ravel(), 75)
    np.testing.assert_allclose(scorer.score_samples(outs(test)), np_energy(np.minimum(test, c) @ W.T + B), **TOL)


# ----------------------------------------------------------------------------- ASH


def ash_by_hand(h, p, variant):
    """ASH per sample, one row at a time, from the paper's definitions."""
    d = h.shape[1]
    k = max(1, d - int(round(d * p / 100)))
    out = np.zeros_like(h)
    for i, row in enumerate(h):
        keep = kept_by_hand(row, k)
        s1 = row.sum()
        if variant == "p":
            out[i, keep] = row[keep]
        elif variant == "b":
            out[i, keep] = s1 / k
        else:
            s2 = row[keep].sum()
            out[i, keep] = row[keep] * (np.exp(s1 / s2) if s2 > 0 else 1.0)
    return out


@pytest.mark.parametrize("cls, variant, p", [(AshS, "s", 90), (AshB, "b", 65), (AshP, "p", 60)])
def test_ash_variants_match_the_paper(cls, variant, p):
    scorer = cls()
    assert scorer.params["percentile"] == p and not scorer.needs_fit
    expected = np_energy(ash_by_hand(H_TEST, p, variant) @ W.T + B)
    np.testing.assert_allclose(scorer.score_samples(outs(H_TEST)), expected, **TOL)
    # another percentile, and a head without bias
    expected = np_energy(ash_by_hand(H_TEST, 30, variant) @ W.T)
    np.testing.assert_allclose(cls(percentile=30).score_samples(outs(H_TEST, b=None)), expected, **TOL)


def test_ash_kept_set_is_the_per_row_top_k():
    for k in (1, 2, 5, D):
        mask = top_mask(torch.as_tensor(H_TEST), k).numpy()
        for row, m in zip(H_TEST, mask):
            assert set(np.flatnonzero(m)) == set(kept_by_hand(row, k))


def test_ash_keeps_at_least_one_unit():
    h = relu_features(10, 3, d=4)  # 4 - round(3.6) = 0 -> one unit kept
    expected = np_energy(ash_by_hand(h, 90, "s") @ W[:, :4].T + B)
    np.testing.assert_allclose(AshS().score_samples(outs(h, W[:, :4])), expected, **TOL)


def test_ash_p_at_zero_percent_is_the_energy_of_the_logits():
    np.testing.assert_allclose(AshP(percentile=0).score_samples(outs(H_TEST)), np_energy(H_TEST @ W.T + B), **TOL)


def test_ash_and_scale_on_signed_activations_follow_the_formula_and_stay_finite():
    rng = np.random.default_rng(7)
    h = rng.normal(0.2, 1.0, size=(40, D))
    h[0] = -np.abs(h[0])  # all negative: s2 < 0, factor 1
    h[1] = -1e-3  # near-zero kept sum with a large negative rest
    h[1, 0] = 1e-12
    for cls, variant in ((AshS, "s"), (AshB, "b"), (AshP, "p")):
        s = cls().score_samples(outs(h))
        assert np.isfinite(s).all()
        np.testing.assert_allclose(s, np_energy(ash_by_hand(h, cls().params["percentile"], variant) @ W.T + B), **TOL)
    k = D - int(round(D * 85 / 100))
    s1, s2 = h.sum(axis=1), np.array([np.sort(row)[::-1][:k].sum() for row in h])
    factor = np.where(s2 > 0, np.exp(s1 / np.where(s2 > 0, s2, 1.0)), 1.0)
    s = Scale().score_samples(outs(h))
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, np_energy((h * factor[:, None]) @ W.T + B), **TOL)


# --------------------------------------------------------------------------- SCALE


def test_scale_multiplies_all_units_by_exp_s1_over_s2():
    scorer = Scale()
    assert scorer.params["percentile"] == 85.0
    k = D - int(round(D * 85 / 100))
    s1 = H_TEST.sum(axis=1)
    s2 = np.array([np.sort(row)[::-1][:k].sum() for row in H_TEST])
    expected = np_energy((H_TEST * np.exp(s1 / s2)[:, None]) @ W.T + B)
    np.testing.assert_allclose(scorer.score_samples(outs(H_TEST)), expected, **TOL)


# ---------------------------------------------------------------------------- DICE


def test_dice_keeps_the_top_tenth_of_the_contribution_matrix():
    scorer = Dice().fit(outs(H_TRAIN), np.zeros(len(H_TRAIN), int))
    v = W * H_TRAIN.mean(axis=0)[None, :]
    m = K * D - int(round(K * D * 90 / 100))
    mask = np.zeros(K * D, bool)
    mask[np.argsort(-v.ravel(), kind="stable")[:m]] = True
    mask = mask.reshape(K, D)
    np.testing.assert_array_equal(scorer.mask_, mask)
    assert scorer.params["kept_weights"] == m == 6 and scorer.params["sparsity"] == 90.0
    # no ties here: the same set as the references' "V > percentile(V, 90)"
    np.testing.assert_array_equal(mask, v > np.percentile(v, 90))
    expected = np_energy(H_TEST @ (W * mask).T + B)
    np.testing.assert_allclose(scorer.score_samples(outs(H_TEST)), expected, **TOL)


def test_dice_refuses_another_head():
    scorer = Dice().fit(outs(H_TRAIN), np.zeros(len(H_TRAIN), int))
    with pytest.raises(DataError, match="does not match"):
        scorer.score_samples(outs(H_TEST[:, :6], W[:, :6]))


# ----------------------------------------------------------------------------- SHE


def test_she_patterns_are_class_means_of_correct_training_samples():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(K), 16)
    h = np.maximum(rng.normal(size=(len(y), D)) + 1.5 * np.eye(K, D)[y], 0)
    z = 2.0 * np.eye(K)[y] + rng.normal(size=(len(y), K))
    scorer = SHE().fit(outs(h, logits=z), y)
    pred = z.argmax(axis=1)
    assert 0 < (pred != y).sum() and all(((y == c) & (pred == c)).any() for c in range(K))
    patterns = np.stack([h[(y == c) & (pred == c)].mean(axis=0) for c in range(K)])
    np.testing.assert_allclose(scorer.patterns_, patterns, **TOL)
    assert scorer.params["fallback_classes"] == []
    zt = H_TEST @ W.T + B
    expected = np.array([row @ patterns[np.argmax(logit)] for row, logit in zip(H_TEST, zt)])
    np.testing.assert_allclose(scorer.score_samples(outs(H_TEST, logits=zt)), expected, **TOL)


def test_she_falls_back_to_all_samples_of_a_class_never_classified_correctly():
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(3), 10)
    h = rng.random((30, D))
    z = np.eye(3)[y] * 5.0
    z[y == 2] = np.eye(3)[0] * 5.0  # class 2 is always predicted as 0
    scorer = SHE().fit(outs(h, W[:3], B[:3], logits=z), y)
    assert scorer.params["fallback_classes"] == [2]
    np.testing.assert_allclose(scorer.patterns_[2], h[y == 2].mean(axis=0), **TOL)
    np.testing.assert_allclose(scorer.patterns_[0], h[(y == 0)].mean(axis=0), **TOL)  # class 2 rows are wrong
    with pytest.raises(DataError, match="none for"):
        SHE().fit(outs(h, W[:4], B[:4], logits=np.c_[z, np.zeros(30)]), y)  # class 3 has no samples


# ---------------------------------------------------------------- shared behaviour

ALL = ["react", "ash_s", "ash_b", "ash_p", "scale", "dice", "she"]


def fit_one(method_id, h=H_TRAIN, b=B):
    scorer = METHODS[method_id].factory()
    if scorer.needs_fit:
        y = np.arange(len(h)) % K
        scorer.fit(outs(h, b=b, logits=np.eye(K)[y] * 3.0), y)
    return scorer


@pytest.mark.parametrize("method_id", ALL)
def test_zero_features_and_zero_bias_give_finite_scores(method_id):
    scorer = fit_one(method_id)
    zeros = np.zeros((4, D))
    for b in (np.zeros(K), None):
        s = scorer.score_samples(outs(zeros, b=b))
        assert s.dtype == np.float64 and np.isfinite(s).all()
        np.testing.assert_allclose(s, 0.0 if method_id == "she" else np.log(K), **TOL)
    # a head without bias scores as one with a zero bias
    np.testing.assert_array_equal(scorer.score_samples(outs(H_TEST, b=None)),
                                  scorer.score_samples(outs(H_TEST, b=np.zeros(K))))


@pytest.mark.parametrize("method_id", ALL)
def test_registered_with_family_paper_and_recorded_layer(method_id):
    info = METHODS[method_id]
    assert info.kind == "baseline"
    assert info.family == ("feature" if method_id == "she" else "activation")
    assert fit_one(method_id).params["layer"].startswith("penultimate")


@pytest.mark.parametrize("cls", [ReAct, AshS, AshB, AshP, Scale])
def test_percentile_must_lie_in_0_100(cls):
    for bad in (-1, 100, 150, "90", True):
        with pytest.raises(ConfigError):
            cls(percentile=bad)
    with pytest.raises(ConfigError):
        Dice(sparsity=100)


def test_missing_head_and_mismatched_shapes_are_clear_errors():
    with pytest.raises(DataError, match="needs 'head_weight'"):
        AshS().score_samples(ScorerInputs(features=torch.as_tensor(H_TEST)))
    with pytest.raises(DataError, match="head weight"):
        Scale().score_samples(outs(H_TEST, W[:, :5], logits=np.zeros((len(H_TEST), K))))
    with pytest.raises(DataError, match="NaN"):
        AshP().score_samples(outs(np.full((2, D), np.nan)))
