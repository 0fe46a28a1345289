"""Round 5 of docs/ablation.md (issue 21): GradPCA's residual off the class-mean subspace
and the Mahalanobis distance to the predicted class's mean, against NumPy written out
per sample in float64; the fused detector's nac, coverage and gaia signals against those
scorers fitted alone on the same classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradosr.detectors.inputs import ScorerInputs
from gradosr.errors import ConfigError, DataError


def _inputs(g, logits=None, k=3):
    out = ScorerInputs(torch.as_tensor(logits) if logits is not None
                       else torch.zeros(len(g), k, dtype=torch.float64), None)
    out.gradients["projection"] = torch.as_tensor(g)
    return out


def _train(rng, n=203, d=11, k=3):
    y = np.arange(n) % k
    centres = rng.normal(size=(k, d)) * 3
    return centres[y] + rng.normal(size=(n, d)) * rng.uniform(0.2, 2.0, size=d), y


def test_gradpca_is_the_residual_off_the_span_of_the_class_means():
    """For every query, the least-squares residual of g on the class means μ_c (NumPy's
    lstsq, one query at a time), over ‖g‖²; chunked fit and scoring, the absolute
    variant and the saved state agree to 1e-10."""
    from gradosr.detectors.gradpca import GradPCA

    rng = np.random.default_rng(5)
    g_train, y = _train(rng)
    means = np.stack([g_train[y == c].mean(axis=0) for c in range(3)])
    q = np.vstack([rng.normal(size=(30, 11)), means[1] * 0.7, np.zeros(11)])
    absolute = []
    for g in q:
        coef = np.linalg.lstsq(means.T, g, rcond=None)[0]
        r = g - means.T @ coef
        absolute.append(r @ r)
    absolute = np.array(absolute)
    size = np.einsum("nd,nd->n", q, q)
    want = -np.divide(absolute, size, out=np.zeros_like(absolute), where=size > 0)
    one = GradPCA().fit(_inputs(g_train), y)
    assert one.basis_.shape == (11, 3)
    got = one.score_samples(_inputs(q))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert abs(got[-2]) < 1e-12 and got[-1] == 0  # a class mean lies in the subspace; g = 0 scores 0
    chunked = GradPCA(chunk_size=4).fit((_inputs(g_train[i:i + 50]), y[i:i + 50]) for i in range(0, 203, 50))
    np.testing.assert_allclose(chunked.score_samples(_inputs(q)), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(GradPCA(relative=False).fit(_inputs(g_train), y).score_samples(_inputs(q)),
                               -absolute, rtol=1e-10, atol=1e-10)
    tensors, meta = one.state()
    back = GradPCA.from_state(tensors, meta)
    np.testing.assert_allclose(back.score_samples(_inputs(q)), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(DataError, match="dimension"):
        one.score_samples(_inputs(q[:, :5]))


def test_gradpca_keeps_only_the_rank_of_the_class_means():
    """Two classes with the same mean span one direction, not two."""
    from gradosr.detectors.gradpca import class_mean_basis

    mu = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]])
    basis = class_mean_basis(mu)
    assert basis.shape == (3, 1)
    np.testing.assert_allclose(np.abs(basis[:, 0]), np.array([1, 2, 0]) / np.sqrt(5), rtol=1e-12)


def test_mahalanobis_to_the_predicted_class_mean_by_hand():
    """(f − μ_ŷ)ᵀ Σ⁺ (f − μ_ŷ), ŷ = argmax of the logits, Σ the tied class-centred
    covariance (1/N) and Σ⁺ NumPy's pseudo-inverse; the nearest-mean default unchanged."""
    from gradosr.detectors.mahalanobis import Mahalanobis

    rng = np.random.default_rng(6)
    g_train, y = _train(rng)
    means = np.stack([g_train[y == c].mean(axis=0) for c in range(3)])
    centred = g_train - means[y]
    prec = np.linalg.pinv(centred.T @ centred / len(g_train))
    q, logits = rng.normal(size=(25, 11)) * 3, rng.normal(size=(25, 3))
    d = np.array([[(f - m) @ prec @ (f - m) for m in means] for f in q])
    pred = Mahalanobis(source="projection", assign="predicted").fit(_inputs(g_train), y)
    np.testing.assert_allclose(pred.score_samples(_inputs(q, logits)), -d[np.arange(25), logits.argmax(1)],
                               rtol=1e-9)
    near = Mahalanobis(source="projection").fit(_inputs(g_train), y)
    np.testing.assert_allclose(near.score_samples(_inputs(q, logits)), -d.min(axis=1), rtol=1e-9)
    back = Mahalanobis.from_state(*pred.state())
    np.testing.assert_allclose(back.score_samples(_inputs(q, logits)), pred.score_samples(_inputs(q, logits)),
                               rtol=1e-12)
    with pytest.raises(ConfigError, match="assign"):
        Mahalanobis(assign="farthest")
    with pytest.raises(DataError, match="fitted classes"):
        pred.score_samples(_inputs(q, np.c_[logits, np.full(25, 9.0)]))


@pytest.mark.parametrize("signal, method, options", [("nac", "nac", {}), ("coverage", "nac", {"statistic": "activation"}),
                                                     ("gaia", "gaia_a", {})])
def test_block_statistic_signals_are_those_scorers_on_the_same_classifier(signal, method, options, tmp_path):
    """plus-kfac-act-{nac,coverage,gaia}: the fused signal equals the scorer fitted alone
    on the classifier's known training inputs; the preset saves and loads to the same scores."""
    from gradosr.detectors import make_scorer
    from gradosr.osr import GradientOSR
    from gradosr.train import train_classifier
    from tiny_runs import PRE, TRAIN, TRAIN_CONFIG, VAL, K, quadrant_images, quiet

    clf = train_classifier(TRAIN, VAL, list(range(K)), TRAIN_CONFIG, PRE, progress=False, log=quiet)
    test = quadrant_images(5, seed=7).images
    xtr = clf.inputs(TRAIN.images)
    osr = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG,
                      signals=("activation", signal, "features", "max_logit")).fit(
        xtr, TRAIN.labels, clf.inputs(VAL.images), VAL.labels)
    xt = clf.inputs(test)
    got = osr.method_.detector_.signal_scores(osr.method_.inputs(clf, xt))[signal]
    alone = make_scorer(method).set_params(**options)
    if alone.needs_fit:
        alone.fit(ScorerInputs(inputs=xtr, model=clf.model), TRAIN.labels)
    np.testing.assert_allclose(got, alone.score_samples(ScorerInputs(inputs=xt, model=clf.model)), rtol=1e-10)
    osr.save(tmp_path / "m")
    np.testing.assert_allclose(GradientOSR.load(tmp_path / "m").score_samples(test), osr.score_samples(test),
                               rtol=1e-12, atol=1e-12)


def test_relative_mahalanobis_in_gradient_space_by_hand():
    """RMDS on a gradient representation: MD_0(g) − min_k MD_k(g), the background
    Gaussian of all rows against the tied class-conditional ones, NumPy's pinv (1/N)."""
    from gradosr.detectors.rmds import RMDS

    rng = np.random.default_rng(8)
    g_train, y = _train(rng)
    means = np.stack([g_train[y == c].mean(axis=0) for c in range(3)])
    centred = g_train - means[y]
    prec = np.linalg.pinv(centred.T @ centred / len(g_train))
    mu0 = g_train.mean(axis=0)
    prec0 = np.linalg.pinv((g_train - mu0).T @ (g_train - mu0) / len(g_train))
    q = rng.normal(size=(20, 11)) * 3
    want = np.array([(f - mu0) @ prec0 @ (f - mu0) - min((f - m) @ prec @ (f - m) for m in means) for f in q])
    got = RMDS(source="projection").fit(_inputs(g_train), y)
    np.testing.assert_allclose(got.score_samples(_inputs(q)), want, rtol=1e-9)
    back = RMDS.from_state(*got.state())
    np.testing.assert_allclose(back.score_samples(_inputs(q)), want, rtol=1e-9)
