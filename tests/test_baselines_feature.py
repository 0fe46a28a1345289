"""Feature/EVT baselines (kNN, Mahalanobis, OpenMax), each checked against an independent
computation: scikit-learn's brute-force neighbours, a naive loop with np.linalg.pinv, and
a naive per-sample OpenMax loop with scipy's distances and Weibull CDF."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from scipy.spatial import distance
from sklearn.neighbors import NearestNeighbors

from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.knn import KNN
from gradosr.detectors.mahalanobis import Mahalanobis
from gradosr.detectors.openmax import OpenMax
from gradosr.errors import ConfigError, DataError, NotFittedError

EPS = np.finfo(np.float64).eps


def outs(features=None, logits=None, k=3):
    """ScorerInputs from numpy arrays (float64 kept, to test to 1e-10)."""
    if logits is None:
        logits = np.zeros((len(features), k))
    if features is None:
        features = np.zeros((len(logits), 4))
    return ScorerInputs(logits=torch.as_tensor(logits), features=torch.as_tensor(features))


def clustered(sizes, d, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(len(sizes), d))
    x = np.concatenate([c + spread * rng.normal(size=(n, d)) for c, n in zip(centres, sizes)])
    y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return x, y


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ kNN


def test_knn_matches_sklearn_brute_force():
    x, y = clustered([120, 100, 80], 8, seed=0)
    q, _ = clustered([40, 40], 8, seed=1)
    knn = KNN(bank_dtype="float64").fit(outs(x, k=3), y)  # float64 bank: exact to 1e-10
    assert knn.params["k"] == 50
    nn = NearestNeighbors(n_neighbors=50, algorithm="brute").fit(unit(x))
    expected = -nn.kneighbors(unit(q))[0][:, -1]
    np.testing.assert_allclose(knn.score_samples(outs(q)), expected, rtol=1e-10)
    # the training samples themselves (each is its own nearest neighbour)
    expected_train = -nn.kneighbors(unit(x))[0][:, -1]
    np.testing.assert_allclose(knn.score_samples(outs(x)), expected_train, rtol=1e-10)


def test_knn_k_is_capped_by_the_smallest_class():
    x, y = clustered([30, 12, 40], 5, seed=2)
    q, _ = clustered([25], 5, seed=3)
    knn = KNN(bank_dtype="float64").fit(outs(x, k=3), y)
    assert knn.params["k"] == 12 and knn.params["k_max"] == 50
    nn = NearestNeighbors(n_neighbors=12, algorithm="brute").fit(unit(x))
    np.testing.assert_allclose(
        knn.score_samples(outs(q)), -nn.kneighbors(unit(q))[0][:, -1], rtol=1e-10
    )
    assert KNN(k=5).fit(outs(x, k=3), y).params["k"] == 5


def test_knn_chunking_does_not_change_results():
    x, y = clustered([60, 70], 6, seed=4)
    q, _ = clustered([53], 6, seed=5)
    ref = KNN(chunk_size=None).fit(outs(x, k=2), y).score_samples(outs(q))
    for chunk in (1, 7, 52, 1000):
        got = KNN(chunk_size=chunk).fit(outs(x, k=2), y).score_samples(outs(q))
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_knn_zero_vectors_are_finite():
    x, y = clustered([20, 20], 4, seed=6)
    x[3] = 0.0  # a zero training feature
    q = np.vstack([np.zeros(4), x[:5]])
    knn = KNN(k=3, bank_dtype="float64").fit(outs(x, k=2), y)
    scores = knn.score_samples(outs(q))
    assert np.isfinite(scores).all()
    nn = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(unit(x))
    np.testing.assert_allclose(scores, -nn.kneighbors(unit(q))[0][:, -1], rtol=1e-10)
    assert scores[0] == pytest.approx(-1.0)  # unit vectors are all at distance 1 from 0


def test_knn_float32_inputs_and_orientation():
    x, y = clustered([50, 50], 6, seed=7)
    knn = KNN(k=10).fit(outs(x.astype(np.float32), k=2), y)
    near = x[:5] + 0.01
    far = -x[:5]  # opposite directions after normalisation
    s_near = knn.score_samples(outs(near.astype(np.float32)))
    s_far = knn.score_samples(outs(far.astype(np.float32)))
    assert s_near.dtype == np.float64
    assert (s_near > s_far).all()


# ---------------------------------------------------------------------- Mahalanobis


def naive_mahalanobis(x, y, q, k):
    means = np.array([x[y == c].mean(axis=0) for c in range(k)])
    centred = np.array([x[i] - means[y[i]] for i in range(len(x))])
    cov = np.cov(centred, rowvar=False, bias=True)
    precision = np.linalg.pinv(cov, rcond=x.shape[1] * EPS)
    scores = []
    for f in q:
        scores.append(-min(float((f - m) @ precision @ (f - m)) for m in means))
    return np.array(scores)


def test_mahalanobis_matches_naive_pinv_loop():
    x, y = clustered([80, 60, 70], 6, seed=8, spread=np.array([1.0, 0.5, 2.0, 1.0, 0.3, 1.5]))
    x[:, 1] += 0.7 * x[:, 0]  # correlated features
    q, _ = clustered([30, 30], 6, seed=9)
    maha = Mahalanobis().fit(outs(x, k=3), y)
    assert maha.params["rank"] == 6
    np.testing.assert_allclose(maha.score_samples(outs(q)), naive_mahalanobis(x, y, q, 3), rtol=1e-10)
    # a sample at a class mean has distance ~0 and the highest possible score
    at_mean = maha.score_samples(outs(maha.means_[1:2]))
    assert at_mean[0] <= 0 and at_mean[0] > -1e-20


def test_mahalanobis_rank_deficient_features_are_finite():
    x, y = clustered([50, 40, 45], 7, seed=10)
    x = np.maximum(x, 0.0)
    x[:, 2] = 0.0  # a dead ReLU unit
    q, _ = clustered([40], 7, seed=11)
    q = np.maximum(q, 0.0)
    q[:5, 2] = 3.0  # the dead unit fires on some queries: ignored by the pseudo-inverse
    maha = Mahalanobis(chunk_size=6).fit(outs(x, k=3), y)
    assert maha.params["rank"] == 6
    scores = maha.score_samples(outs(q))
    assert np.isfinite(scores).all() and (scores <= 0).all()
    np.testing.assert_allclose(scores, naive_mahalanobis(x, y, q, 3), rtol=1e-10)
    q_dead_off = q.copy()
    q_dead_off[:, 2] = 0.0
    np.testing.assert_allclose(maha.score_samples(outs(q_dead_off)), scores, rtol=1e-10)


def test_mahalanobis_chunking_does_not_change_results():
    x, y = clustered([30, 30], 4, seed=12)
    q, _ = clustered([23], 4, seed=13)
    ref = Mahalanobis().fit(outs(x, k=2), y).score_samples(outs(q))
    for chunk in (1, 5, 100):
        got = Mahalanobis(chunk_size=chunk).fit(outs(x, k=2), y).score_samples(outs(q))
        np.testing.assert_allclose(got, ref, rtol=1e-12)


# -------------------------------------------------------------------------- OpenMax

K = 3


def openmax_data(seed=14, n=300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, size=n)
    logits = 3.0 * np.eye(K)[y] + rng.normal(size=(n, K))
    return logits, y


def eucos(v, m):
    return distance.euclidean(v, m) / 200.0 + distance.cosine(v, m)


def independent_tails(logits, y, tail=20):
    means, tails = [], []
    for c in range(K):
        av = [v for v, lab in zip(logits, y) if lab == c and int(np.argmax(v)) == c]
        mu = np.mean(av, axis=0)
        means.append(mu)
        tails.append(np.sort([eucos(v, mu) for v in av])[-tail:])
    return np.array(means), tails


def weibull_mle_root(tail, start):
    """The Weibull(loc=0) MLE as a root of the full 2-D likelihood gradient."""
    x = np.asarray(tail)
    n = len(x)

    def grad(p):
        c, lam = p
        r = x / lam
        rc = r**c
        return [
            n / c - n * math.log(lam) + np.log(x).sum() - (rc * np.log(r)).sum(),
            (c / lam) * (rc.sum() - n),
        ]

    sol = optimize.root(grad, start, method="hybr", tol=1e-12)
    assert sol.success, sol.message
    return sol.x


def test_openmax_weibull_fit_matches_scipy():
    logits, y = openmax_data()
    om = OpenMax().fit(outs(logits=logits), y)
    assert om.params["alpha"] == K and om.params["tail_size"] == 20
    means, tails = independent_tails(logits, y)
    np.testing.assert_allclose(om.means_, means, rtol=1e-12)
    for c in range(K):
        shape, loc, scale = stats.weibull_min.fit(tails[c], floc=0)
        assert loc == 0
        # scipy's Nelder-Mead stops near the maximum; ours is the exact maximiser
        np.testing.assert_allclose([om.shapes_[c], om.scales_[c]], [shape, scale], rtol=1e-3)
        nll = stats.weibull_min.nnlf
        assert nll((om.shapes_[c], 0, om.scales_[c]), tails[c]) <= nll((shape, 0, scale), tails[c]) + 1e-12
        exact = weibull_mle_root(tails[c], [shape, scale])
        np.testing.assert_allclose([om.shapes_[c], om.scales_[c]], exact, rtol=1e-10)


def naive_openmax(v, means, shapes, scales):
    """Bendale & Boult's recalibration, one sample at a time (column 0 = unknown)."""
    alpha = K
    ranked = sorted(range(K), key=lambda j: -v[j])
    omega = [1.0] * K
    for i in range(1, alpha + 1):
        j = ranked[i - 1]
        w = stats.weibull_min.cdf(eucos(v, means[j]), shapes[j], loc=0, scale=scales[j])
        omega[j] = 1.0 - (alpha - i + 1) / alpha * w
    revised = [v[j] * omega[j] for j in range(K)]
    unknown = sum(v[j] * (1 - omega[j]) for j in range(K))
    logits = [unknown] + revised
    top = max(logits)
    e = [math.exp(z - top) for z in logits]
    return [x / sum(e) for x in e]


def test_openmax_probabilities_match_naive_loop():
    logits, y = openmax_data()
    om = OpenMax(chunk_size=7).fit(outs(logits=logits), y)
    rng = np.random.default_rng(15)
    q = np.vstack([rng.normal(0, 3, size=(40, K)), logits[:20]])
    probs = om.recalibrated_probabilities(outs(logits=q))
    expected = np.array([naive_openmax(v, om.means_, om.shapes_, om.scales_) for v in q])
    np.testing.assert_allclose(probs, expected, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    scores = om.score_samples(outs(logits=q))
    np.testing.assert_allclose(scores, 1.0 - expected[:, 0], rtol=1e-10)
    ref = OpenMax().fit(outs(logits=logits), y).score_samples(outs(logits=q))
    np.testing.assert_allclose(scores, ref, rtol=1e-12)


def test_openmax_orientation():
    logits, y = openmax_data()
    om = OpenMax().fit(outs(logits=logits), y)
    at_mean = om.score_samples(outs(logits=om.means_[:1]))
    far = om.score_samples(outs(logits=np.array([[5.0, 5.0, 5.0]])))
    assert at_mean[0] > far[0]
    assert far[0] < 0.5  # the unknown class takes most of the probability


def test_openmax_needs_two_correct_samples_per_class():
    logits, y = openmax_data()
    wrong = (y == 2) & (np.argmax(logits, axis=1) == 2)
    logits = logits.copy()
    logits[wrong] = logits[wrong][:, [2, 1, 0]]  # class 2 is now always misclassified
    with pytest.raises(DataError, match="class 2"):
        OpenMax().fit(outs(logits=logits), y)


# ------------------------------------------------------------------- errors, config


@pytest.mark.parametrize("cls", [KNN, Mahalanobis, OpenMax])
def test_score_before_fit_raises(cls):
    with pytest.raises(NotFittedError, match="fit"):
        cls().score_samples(outs(np.ones((3, 4)), np.ones((3, 3))))


def test_dimension_mismatch_and_bad_inputs_raise():
    x, y = clustered([30, 30, 30], 4, seed=16)
    logits, y_om = openmax_data()
    for scorer in (KNN().fit(outs(x, k=3), y), Mahalanobis().fit(outs(x, k=3), y)):
        with pytest.raises(DataError, match="dimension"):
            scorer.score_samples(outs(np.ones((2, 5))))
        bad = np.ones((2, 4))
        bad[1, 0] = np.nan
        with pytest.raises(DataError, match="NaN"):
            scorer.score_samples(outs(bad))
    om = OpenMax().fit(outs(logits=logits), y_om)
    with pytest.raises(DataError, match="dimension"):
        om.score_samples(outs(logits=np.ones((2, 4))))
    for cls in (KNN, Mahalanobis):
        with pytest.raises(DataError, match="every class"):
            cls().fit(outs(x, k=4), y)  # class 3 has no sample
        with pytest.raises(DataError, match="labels"):
            cls().fit(outs(x, k=3), y[:-1])
        with pytest.raises(DataError, match="labels"):
            cls().fit(outs(x, k=2), y)  # label 2 out of range
    with pytest.raises(ConfigError):
        KNN(k=0)
    with pytest.raises(ConfigError):
        OpenMax(tail_size=1)
    with pytest.raises(ConfigError):
        Mahalanobis(chunk_size=0)


def test_method_ids_and_flags():
    assert (KNN.method_id, Mahalanobis.method_id, OpenMax.method_id) == ("knn", "mahalanobis", "openmax")
    for cls in (KNN, Mahalanobis, OpenMax):
        assert cls.needs_fit and not cls().needs_model
