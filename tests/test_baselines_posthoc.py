"""Post-hoc baselines of issue 17 (ViM, RMDS, fDBD, NNGuide, GEN, entropy, KL matching,
NCI, per-class Gaussians), each against an independent NumPy transcription of its
paper's formula (per-sample loops, written from the formulas, no gradosr helpers) on
small synthetic features, logits and heads, to 1e-10 in float64; the fitted parameters;
and degenerate inputs (a clear DataError or a finite, documented result)."""

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats

from gradosr.detectors import (
    FDBD,
    GEN,
    GMM,
    NCI,
    RMDS,
    ViM,
    Entropy,
    KLMatching,
    NNGuide,
    ScorerInputs,
)
from gradosr.detectors.registry import method_ids
from gradosr.detectors.vim import principal_dim
from gradosr.errors import ConfigError, DataError, NotFittedError

EPS = np.finfo(np.float64).eps
RTOL = 1e-10


def outs(features=None, logits=None, weight=None, bias=None):
    """ScorerInputs from numpy arrays (float64 kept)."""
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))  # noqa: E731
    return ScorerInputs(logits=t(logits), features=t(features), head_weight=t(weight), head_bias=t(bias))


def problem(sizes=(40, 30, 35), d=6, seed=0, n_query=25):
    """Clustered ReLU-free features, a random linear head, its logits; and queries."""
    rng = np.random.default_rng(seed)
    k = len(sizes)
    centres = rng.normal(0.0, 2.0, size=(k, d))
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    x = centres[y] + rng.normal(size=(len(y), d)) * rng.uniform(0.5, 1.5, size=d)
    w = rng.normal(size=(k, d))
    b = rng.normal(size=k)
    q = rng.normal(0.0, 2.5, size=(n_query, d))
    return x, y, w, b, q


def head_outs(x, w, b):
    return outs(x, x @ w.T + b, w, b)


def softmax_row(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def lse_row(z):
    return z.max() + np.log(np.exp(z - z.max()).sum())


def test_registered_in_order_after_the_existing_baselines():
    ids = method_ids("baseline")
    start = ids.index("gradunc") + 1
    assert ids[start : start + 9] == ["vim", "rmds", "fdbd", "nnguide", "gen", "entropy", "klm", "nci", "gmm"]


@pytest.mark.parametrize("cls", [ViM, RMDS, FDBD, NNGuide, KLMatching, NCI, GMM])
def test_fitted_methods_refuse_to_score_before_fit(cls):
    x, _, w, b, _ = problem()
    with pytest.raises(NotFittedError):
        cls().score_samples(head_outs(x, w, b))


# ------------------------------------------------------------------------------ ViM


def vim_reference(x, z_train, w, b, q, z_query, dim):
    """ViM from the paper: origin u = −W⁺b (least squares, minimum norm), principal space
    of X − u by eigh, α from the training means, score log((1 − P_v)/P_v)."""
    u = np.linalg.lstsq(w, -b, rcond=None)[0]
    xc = x - u
    lam, vec = np.linalg.eigh(xc.T @ xc / len(x))
    principal = vec[:, np.argsort(-lam)[:dim]]

    def residual(v):
        c = v - u
        return np.linalg.norm(c - principal @ (principal.T @ c))

    alpha = np.mean([zi.max() for zi in z_train]) / np.mean([residual(v) for v in x])
    scores = []
    for v, zi in zip(q, z_query):
        vlogit = alpha * residual(v)
        p = softmax_row(np.r_[zi, vlogit])  # the K logits and the virtual one
        scores.append(np.log(p[:-1].sum() / p[-1]))  # log((1 − P_v) / P_v), 1 − P_v summed
    return np.array(scores), alpha, principal, u


def test_vim_matches_the_paper_and_numpy_eigh():
    x, y, w, b, q = problem(d=10, seed=1)
    vim = ViM().fit(head_outs(x, w, b), y)
    assert vim.params["dim"] == 5
    ref, alpha, principal, u = vim_reference(x, x @ w.T + b, w, b, q, q @ w.T + b, dim=5)
    np.testing.assert_allclose(vim.score_samples(head_outs(q, w, b)), ref, rtol=RTOL)
    assert vim.alpha_ == pytest.approx(alpha, rel=RTOL) and vim.params["alpha"] == vim.alpha_
    np.testing.assert_allclose(vim.origin_, u, rtol=RTOL, atol=1e-12)
    # the residual space is the orthogonal complement of eigh's top-5 eigenvectors
    r = vim.residual_basis_
    assert r.shape == (10, 5)
    np.testing.assert_allclose(r.T @ r, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(10) - principal @ principal.T, atol=1e-10)


def test_vim_given_dim_and_the_dimension_rule():
    x, y, w, b, q = problem(d=8, seed=2)
    vim = ViM(dim=3).fit(head_outs(x, w, b), y)
    ref, *_ = vim_reference(x, x @ w.T + b, w, b, q, q @ w.T + b, dim=3)
    np.testing.assert_allclose(vim.score_samples(head_outs(q, w, b)), ref, rtol=RTOL)
    assert vim.params["dim"] == 3
    assert [principal_dim(d) for d in (4096, 2048, 2047, 1024, 768, 767, 512, 84, 16, 3, 2)] == [
        1000, 1000, 512, 512, 512, 383, 256, 42, 8, 1, 1]
    with pytest.raises(ConfigError):
        ViM(dim=0)


def test_vim_head_without_bias_has_its_origin_at_zero():
    x, y, w, _, q = problem(d=6, seed=3)
    vim = ViM().fit(outs(x, x @ w.T, w, None), y)
    np.testing.assert_array_equal(vim.origin_, np.zeros(6))
    ref, *_ = vim_reference(x, x @ w.T, w, np.zeros(3), q, q @ w.T, dim=3)
    np.testing.assert_allclose(vim.score_samples(outs(q, q @ w.T, w, None)), ref, rtol=RTOL)


def test_vim_degenerate_inputs():
    x, y, w, b, q = problem(d=6, seed=4)
    # D = 1: no principal subspace and residual to split into
    with pytest.raises(DataError, match="at least 2"):
        ViM().fit(head_outs(x[:, :1], w[:, :1], b), y)
    # D = 2 works (dim 1)
    vim2 = ViM().fit(head_outs(x[:, :2], w[:, :2], b), y)
    assert vim2.params["dim"] == 1 and np.isfinite(vim2.score_samples(head_outs(q[:, :2], w[:, :2], b))).all()
    # training features inside the principal subspace: no residual to match
    flat = x.copy()
    flat[:, 3:] = 0.0
    with pytest.raises(DataError, match="principal subspace"):
        ViM().fit(outs(flat, flat @ w.T, w, np.zeros(3)), y)
    # zero query features: finite
    vim = ViM().fit(head_outs(x, w, b), y)
    assert np.isfinite(vim.score_samples(head_outs(np.zeros((3, 6)), w, b))).all()
    with pytest.raises(DataError, match="head_weight"):
        ViM().fit(outs(x, x @ w.T + b), y)


# ----------------------------------------------------------------------------- RMDS


def mahalanobis_sq(v, mean, precision):
    return float((v - mean) @ precision @ (v - mean))


def rmds_reference(x, y, q):
    k, d = y.max() + 1, x.shape[1]
    means = [x[y == c].mean(axis=0) for c in range(k)]
    centred = np.array([x[i] - means[y[i]] for i in range(len(x))])
    shared = np.linalg.pinv(np.cov(centred, rowvar=False, bias=True), rcond=d * EPS)
    mu0 = x.mean(axis=0)
    background = np.linalg.pinv(np.cov(x, rowvar=False, bias=True), rcond=d * EPS)
    return np.array([-min(mahalanobis_sq(v, m, shared) - mahalanobis_sq(v, mu0, background) for m in means)
                     for v in q]), np.array(means), mu0


def test_rmds_matches_the_paper():
    x, y, w, b, q = problem(d=6, seed=5)
    x[:, 1] += 0.6 * x[:, 0]
    rmds = RMDS().fit(head_outs(x, w, b), y)
    ref, means, mu0 = rmds_reference(x, y, q)
    np.testing.assert_allclose(rmds.score_samples(head_outs(q, w, b)), ref, rtol=RTOL)
    np.testing.assert_allclose(rmds.means_, means, rtol=1e-12)
    np.testing.assert_allclose(rmds.background_mean_[0], mu0, rtol=1e-12)
    assert rmds.params["rank"] == 6 and rmds.params["background_rank"] == 6
    for chunk in (1, 4, 1000):
        got = RMDS(chunk_size=chunk).fit(head_outs(x, w, b), y).score_samples(head_outs(q, w, b))
        np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_rmds_rank_deficient_and_zero_features_are_finite():
    x, y, w, b, q = problem(d=6, seed=6)
    x = np.maximum(x, 0.0)
    x[:, 2] = 0.0  # a dead unit
    rmds = RMDS().fit(head_outs(x, w, b), y)
    assert rmds.params["rank"] == 5
    q = np.vstack([np.maximum(q, 0.0), np.zeros((1, 6))])
    ref, *_ = rmds_reference(x, y, q)
    s = rmds.score_samples(head_outs(q, w, b))
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    with pytest.raises(DataError, match="RMDS needs training samples of every class"):
        RMDS().fit(head_outs(x[y != 1], w, b), y[y != 1])


# ----------------------------------------------------------------------------- fDBD


def fdbd_reference(x, q, w, b):
    mu = x.mean(axis=0)
    scores = []
    for h in q:
        z = w @ h + b
        top = int(np.argmax(z))
        dists = [abs(z[top] - z[c]) / np.linalg.norm(w[top] - w[c]) for c in range(len(z)) if c != top]
        scores.append(np.mean(dists) / max(np.linalg.norm(h - mu), 1e-12))
    return np.array(scores)


def test_fdbd_matches_the_paper():
    x, y, w, b, q = problem(sizes=(30, 30, 30, 30), d=7, seed=7)
    fdbd = FDBD().fit(head_outs(x, w, b), y)
    np.testing.assert_allclose(fdbd.train_mean_, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(fdbd.score_samples(head_outs(q, w, b)), fdbd_reference(x, q, w, b), rtol=RTOL)


def test_fdbd_degenerate_inputs():
    x, y, w, b, q = problem(d=5, seed=8)
    fdbd = FDBD().fit(head_outs(x, w, b), y)
    special = np.vstack([np.zeros(5), x.mean(axis=0)])  # a zero feature; one at the training mean
    s = fdbd.score_samples(head_outs(special, w, b))
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, fdbd_reference(x, special, w, b), rtol=RTOL)
    same = w.copy()
    same[2] = same[0]
    with pytest.raises(DataError, match="identical"):
        fdbd.score_samples(head_outs(q, same, b))
    one = FDBD().fit(outs(x, x[:, :1], np.ones((1, 5)), np.zeros(1)), np.zeros(len(x)))
    with pytest.raises(DataError, match="at least 2 classes"):
        one.score_samples(outs(q, q[:, :1], np.ones((1, 5)), np.zeros(1)))


# -------------------------------------------------------------------------- NNGuide


def nnguide_reference(x, z_train, q, z_query, k):
    unit = lambda v: v / max(np.linalg.norm(v), 1e-12)  # noqa: E731
    bank = [lse_row(zi) * unit(v) for v, zi in zip(x, z_train)]
    scores = []
    for v, zi in zip(q, z_query):
        sims = sorted((float(unit(v) @ bi) for bi in bank), reverse=True)
        scores.append(lse_row(zi) * np.mean(sims[:k]))
    return np.array(scores)


def test_nnguide_matches_the_paper():
    x, y, w, b, q = problem(d=6, seed=9)
    guide = NNGuide(bank_dtype="float64").fit(head_outs(x, w, b), y)  # float64 bank: exact
    assert guide.params["k"] == 10 and guide.params["k_max"] == 10
    ref = nnguide_reference(x, x @ w.T + b, q, q @ w.T + b, 10)
    np.testing.assert_allclose(guide.score_samples(head_outs(q, w, b)), ref, rtol=RTOL)
    # the bank: normalised training features scaled by their energy
    energy = np.array([lse_row(zi) for zi in x @ w.T + b])
    np.testing.assert_allclose(guide.bank_, x / np.linalg.norm(x, axis=1, keepdims=True) * energy[:, None],
                               rtol=1e-12)
    for chunk in (1, 7, 1000):
        got = NNGuide(chunk_size=chunk, bank_dtype="float64").fit(head_outs(x, w, b), y).score_samples(head_outs(q, w, b))
        np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_nnguide_k_is_capped_by_the_smallest_class_and_zero_features_are_finite():
    x, y, w, b, q = problem(sizes=(30, 6, 20), d=5, seed=10)
    q = np.vstack([q, np.zeros((1, 5))])
    x[4] = 0.0  # a zero training feature
    guide = NNGuide(bank_dtype="float64").fit(head_outs(x, w, b), y)
    assert guide.params["k"] == 6
    s = guide.score_samples(head_outs(q, w, b))
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, nnguide_reference(x, x @ w.T + b, q, q @ w.T + b, 6), rtol=RTOL)
    assert s[-1] == 0.0  # a zero query has zero similarity to the bank
    assert NNGuide(k=3).fit(head_outs(x, w, b), y).params["k"] == 3


# ------------------------------------------------------------------------------ GEN


def gen_reference(z, gamma=0.1, m=100):
    scores = []
    for zi in z:
        p = np.sort(softmax_row(zi))[::-1][: min(m, len(zi))]
        scores.append(-np.sum(p**gamma * (1 - p) ** gamma))
    return np.array(scores)


def test_gen_matches_the_paper():
    rng = np.random.default_rng(11)
    z = rng.normal(scale=2.0, size=(30, 5))
    np.testing.assert_allclose(GEN().score_samples(outs(logits=z)), gen_reference(z), rtol=RTOL)
    np.testing.assert_allclose(GEN(gamma=0.5, m=3).score_samples(outs(logits=z)), gen_reference(z, 0.5, 3),
                               rtol=RTOL)
    wide = rng.normal(scale=2.0, size=(10, 120))  # K > 100: the top M = 100 only
    np.testing.assert_allclose(GEN().score_samples(outs(logits=wide)), gen_reference(wide), rtol=RTOL)
    assert GEN().params["gamma"] == 0.1 and GEN().params["M_max"] == 100
    with pytest.raises(ConfigError):
        GEN(gamma=0.0)


def mp_softmax(z):
    z = [mpmath.mpf(float(v)) for v in z]
    e = [mpmath.exp(v) for v in z]
    s = mpmath.fsum(e)
    return [v / s for v in e]


def test_gen_and_entropy_are_exact_for_extreme_logits():
    """Against 60-digit mpmath: probabilities that underflow or round to 1 in float64."""
    mpmath.mp.dps = 60
    z = np.array([[1000.0, 0.0, -5.0], [40.0, 39.5, 0.0], [-800.0, -790.0, -805.0], [0.0, 0.0, 0.0],
                  [30.0, -30.0, 0.0]])
    gen = GEN().score_samples(outs(logits=z))
    ent = Entropy().score_samples(outs(logits=z))
    for i, zi in enumerate(z):
        p = mp_softmax(zi)
        g = -mpmath.fsum(v ** mpmath.mpf("0.1") * (1 - v) ** mpmath.mpf("0.1") for v in p)
        h = mpmath.fsum(v * mpmath.log(v) for v in p)
        assert gen[i] == pytest.approx(float(g), rel=1e-12)
        assert ent[i] == pytest.approx(float(h), rel=1e-12, abs=1e-300)
    assert gen[0] < 0  # not tied at 0 although p = (1, 0, 0) in float64


# -------------------------------------------------------------------------- entropy


def test_entropy_matches_the_formula():
    rng = np.random.default_rng(12)
    z = rng.normal(scale=3.0, size=(25, 6))
    ref = np.array([np.sum(softmax_row(zi) * np.log(softmax_row(zi))) for zi in z])
    s = Entropy().score_samples(outs(logits=z.astype(np.float32)))
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, np.array([np.sum(softmax_row(zi) * np.log(softmax_row(zi)))
                                            for zi in z.astype(np.float32).astype(np.float64)]), rtol=RTOL)
    np.testing.assert_allclose(Entropy().score_samples(outs(logits=z)), ref, rtol=RTOL)
    assert Entropy().score_samples(outs(logits=np.zeros((1, 6))))[0] == pytest.approx(-np.log(6), rel=1e-14)


# --------------------------------------------------------------------- KL matching


def klm_reference(z_train, z_query):
    probs = np.array([softmax_row(zi) for zi in z_train])
    pred = probs.argmax(axis=1)
    templates = {c: probs[pred == c].mean(axis=0) for c in np.unique(pred)}
    scores = []
    for zi in z_query:
        p = softmax_row(zi)
        scores.append(-min(np.sum(p * np.log(p / d)) for d in templates.values()))
    return np.array(scores), templates


def test_klm_matches_the_paper():
    rng = np.random.default_rng(13)
    y = rng.integers(0, 4, size=200)
    z = 2.5 * np.eye(4)[y] + rng.normal(size=(200, 4))
    q = rng.normal(scale=2.0, size=(30, 4))
    klm = KLMatching().fit(outs(logits=z), y)
    ref, templates = klm_reference(z, q)
    np.testing.assert_allclose(klm.score_samples(outs(logits=q)), ref, rtol=RTOL)
    assert klm.template_classes_.tolist() == [0, 1, 2, 3] and klm.params["classes_without_template"] == []
    np.testing.assert_allclose(klm.templates_, np.array([templates[c] for c in range(4)]), rtol=1e-12)
    for chunk in (1, 6, 1000):
        np.testing.assert_allclose(KLMatching(chunk_size=chunk).fit(outs(logits=z), y).score_samples(outs(logits=q)),
                                   ref, rtol=RTOL)
    # KL >= 0: every score <= 0 up to rounding
    assert (klm.score_samples(outs(logits=q)) <= 1e-15).all()


def test_klm_a_class_never_predicted_has_no_template():
    rng = np.random.default_rng(14)
    y = rng.integers(0, 4, size=120)
    z = 3.0 * np.eye(4)[y] + rng.normal(size=(120, 4))
    z[:, 2] -= 20.0  # class 2 is never the argmax
    klm = KLMatching().fit(outs(logits=z), y)
    assert klm.template_classes_.tolist() == [0, 1, 3]
    assert klm.params["classes_without_template"] == [2] and klm.params["n_templates"] == 3
    q = rng.normal(scale=2.0, size=(20, 4))
    q[0, 2] = 30.0  # predicted as the template-less class: still finite
    ref, _ = klm_reference(z, q)
    s = klm.score_samples(outs(logits=q))
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, ref, rtol=RTOL)


def test_klm_extreme_logits_are_finite():
    z = np.array([[800.0, 0.0, 0.0], [0.0, 800.0, 0.0], [0.0, 0.0, 800.0], [1.0, 2.0, 3.0]])
    klm = KLMatching().fit(outs(logits=z), np.zeros(4))
    s = klm.score_samples(outs(logits=np.array([[-900.0, 0.0, 900.0], [0.0, 0.0, 0.0]])))
    assert np.isfinite(s).all() and (s <= 0).all()


# ------------------------------------------------------------------------------ NCI


def nci_reference(x, q, w, b, alpha=1e-4):
    mu = x.mean(axis=0)
    scores = []
    for h in q:
        c = int(np.argmax(w @ h + b))
        dist = max(np.linalg.norm(h - mu), 1e-12)
        scores.append(w[c] @ (h - mu) / dist + alpha * np.sum(np.abs(h)))
    return np.array(scores)


def test_nci_matches_the_paper():
    x, y, w, b, q = problem(d=6, seed=15)
    nci = NCI().fit(head_outs(x, w, b), y)
    assert nci.params["alpha"] == 1e-4
    np.testing.assert_allclose(nci.train_mean_, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(nci.score_samples(head_outs(q, w, b)), nci_reference(x, q, w, b), rtol=RTOL)
    np.testing.assert_allclose(NCI(alpha=0.5).fit(head_outs(x, w, b), y).score_samples(head_outs(q, w, b)),
                               nci_reference(x, q, w, b, 0.5), rtol=RTOL)
    special = np.vstack([np.zeros(6), x.mean(axis=0)])
    s = nci.score_samples(head_outs(special, w, b))
    assert np.isfinite(s).all()
    assert s[1] == pytest.approx(1e-4 * np.abs(x.mean(axis=0)).sum(), rel=1e-12)  # pScore 0 at μ_G
    with pytest.raises(ConfigError):
        NCI(alpha=-1.0)


# ------------------------------------------------------------------------------ GMM


def gmm_reference(x, y, q, ridge=1e-6):
    k, d = y.max() + 1, x.shape[1]
    means = [x[y == c].mean(axis=0) for c in range(k)]
    tied = sum(np.outer(v - means[c], v - means[c]) for v, c in zip(x, y)) / len(x)
    lam = ridge * np.trace(tied) / d
    covs = [np.cov(x[y == c], rowvar=False, bias=True) + lam * np.eye(d) for c in range(k)]
    return np.array([max(stats.multivariate_normal(means[c], covs[c]).logpdf(v) for c in range(k)) for v in q]), lam


def test_gmm_matches_the_gaussian_log_density():
    x, y, w, b, q = problem(d=5, seed=16)
    x[y == 1] *= 0.3  # classes with different covariances
    gmm = GMM().fit(head_outs(x, w, b), y)
    ref, lam = gmm_reference(x, y, q)
    np.testing.assert_allclose(gmm.score_samples(head_outs(q, w, b)), ref, rtol=RTOL)
    assert gmm.params["lambda"] == pytest.approx(lam, rel=1e-12)
    np.testing.assert_allclose(gmm.means_, [x[y == c].mean(axis=0) for c in range(3)], rtol=1e-12)
    for chunk in (1, 4, 1000):
        got = GMM(chunk_size=chunk).fit(head_outs(x, w, b), y).score_samples(head_outs(q, w, b))
        np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_gmm_singular_class_covariances_are_regularised():
    x, y, w, b, q = problem(sizes=(30, 4, 25), d=6, seed=17)  # class 1: n_k = 4 < D
    x = np.maximum(x, 0.0)
    x[:, 3] = 0.0  # a dead unit
    q = np.vstack([np.maximum(q, 0.0), np.zeros((1, 6))])
    gmm = GMM().fit(head_outs(x, w, b), y)
    s = gmm.score_samples(head_outs(q, w, b))
    assert np.isfinite(s).all()
    ref, _ = gmm_reference(x, y, q)
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    points = np.repeat(np.eye(6)[:3], 5, axis=0)  # every class a single point
    with pytest.raises(DataError, match="no within-class variance"):
        GMM().fit(outs(points, np.zeros((15, 3))), np.repeat(np.arange(3), 5))
    with pytest.raises(ConfigError):
        GMM(ridge=0.0)
