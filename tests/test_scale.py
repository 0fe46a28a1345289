"""Gaussian scorers at scale: covariances streamed in float64 blocks equal the one-shot
covariances, whatever the chunking; and the cost keys of every results record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradosr.detectors import ScorerInputs
from gradosr.detectors.base import float_row_blocks
from gradosr.detectors.gmm import GMM
from gradosr.detectors.mahalanobis import ClassMoments, Mahalanobis
from gradosr.detectors.mahalanobis_ml import MahalanobisML, MahalanobisMLPP
from gradosr.detectors.rmds import RMDS
from gradosr.streams import RowReservoir


def clustered(n=500, d=7, k=4, seed=0, offset=50.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = offset + rng.normal(0, 3, size=(k, d))[y] + rng.normal(size=(n, d)) * rng.uniform(0.1, 2, size=d)
    return x, y


def one_shot(x, y, k):
    means = np.stack([x[y == c].mean(axis=0) for c in range(k)])
    centred = x - means[y]
    return means, centred.T @ centred / len(x), [np.cov(x[y == c].T, bias=True) for c in range(k)]


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_streamed_moments_equal_the_one_shot_covariance(block):
    x, y = clustered()
    means, cov, per_class = one_shot(x, y, 4)
    m = ClassMoments(per_class=True, block=block)
    for start in range(0, len(x), 33):  # chunks that do not line up with the blocks
        rows = slice(start, start + 33)
        m.add(x[rows], y[rows], int(y[rows].max()) + 1)  # the classes seen so far grow
    m.flush()
    np.testing.assert_allclose(m.means, means, rtol=1e-10)
    np.testing.assert_allclose(m.covariance(), cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())
    for c in range(4):
        np.testing.assert_allclose(m.scatter[c] / m.counts[c], per_class[c], rtol=1e-10,
                                   atol=1e-10 * np.abs(per_class[c]).max())


def test_chunked_fits_of_the_gaussian_scorers_are_bit_identical_to_one_shot():
    x, y = clustered(n=300, seed=1)
    q, _ = clustered(n=40, seed=2)
    full = ScorerInputs(features=torch.from_numpy(x))
    chunks = [(full.rows(slice(a, a + 70)), y[a:a + 70]) for a in range(0, 300, 70)]
    test = ScorerInputs(features=torch.from_numpy(q))
    for cls in (Mahalanobis, RMDS, GMM):
        a, b = cls().fit(full, y), cls().fit(chunks)
        np.testing.assert_array_equal(a.score_samples(test), b.score_samples(test))
        c = cls()
        for part, labels in chunks:
            c.partial_fit(part, labels)
        np.testing.assert_array_equal(c.score_samples(test), a.score_samples(test))
    means, cov, _ = one_shot(x, y, 4)
    maha = Mahalanobis().fit(chunks)
    np.testing.assert_allclose(maha.cov_, cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())
    np.testing.assert_allclose(maha.means_, means, rtol=1e-10)


def test_row_blocks_do_not_depend_on_the_parts():
    x = np.arange(50.0).reshape(25, 2)
    parts = [ScorerInputs(features=torch.from_numpy(x[a:b])) for a, b in ((0, 3), (3, 4), (4, 19), (19, 25))]
    blocks = list(float_row_blocks(parts, "features", "test", rows=6))
    assert [len(b) for b in blocks] == [6, 6, 6, 6, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def _algorithm_r(n: int, cap: int, seed: int) -> list[int]:
    """Vitter's Algorithm R as a plain loop over row indices (one float64 draw per row
    past the first ``cap``)."""
    rng = np.random.default_rng(seed)
    kept = []
    for i in range(n):
        if i < cap:
            kept.append(i)
        else:
            j = int(np.floor(rng.random() * (i + 1)))
            if j < cap:
                kept[j] = i
    return kept


@pytest.mark.parametrize("n,cap,sizes", [(7, 10, [3, 4]), (10, 10, [10]), (200, 13, [1, 50, 7, 142]),
                                         (200, 13, [200]), (64, 5, [5, 59])])
def test_row_reservoir_is_algorithm_r_whatever_the_chunks(n, cap, sizes):
    res = RowReservoir(cap, seed=3)
    rows = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([[1.0, -1.0]])
    start = 0
    for size in sizes:
        res.add(rows[start:start + size])
        start += size
    kept = res.rows()
    np.testing.assert_array_equal(kept[:, 0].numpy(), _algorithm_r(n, cap, seed=3))
    np.testing.assert_array_equal(kept[:, 1].numpy(), -kept[:, 0].numpy())
    assert res.seen == n


def test_row_reservoir_samples_every_row_equally_often():
    n, cap, seeds = 40, 8, 3000
    hits = np.zeros(n)
    for seed in range(seeds):
        res = RowReservoir(cap, seed=seed)
        for part in torch.arange(n).split(9):
            res.add(part)
        hits[res.rows().numpy()] += 1
    # inclusion probability cap/n = 0.2 for every row; 5 standard errors of 3000 draws
    np.testing.assert_allclose(hits / seeds, cap / n, atol=5 * np.sqrt(0.2 * 0.8 / seeds))


@pytest.mark.parametrize("cls", [MahalanobisML, MahalanobisMLPP])
def test_multilayer_mahalanobis_streams_and_standardises_on_a_sample(cls):
    """A streamed fit keeps no chunk and no pooled N×ΣC matrix; with fewer sample rows
    than training rows its Gaussians are those of all rows and m_l, s_l are the mean
    and standard deviation of the layer scores of the reservoir's rows (NumPy)."""
    from test_baselines_gradient import TEST, TRAIN, X_TRAIN, Y_TRAIN, inputs

    full = cls().fit(TRAIN, Y_TRAIN)
    part = cls(standardise_rows=9)
    for idx in np.array_split(np.arange(len(X_TRAIN)), 4):
        part.partial_fit(inputs(X_TRAIN[idx]), Y_TRAIN[idx])
        assert not part._chunks
    part.check_fitted()
    np.testing.assert_array_equal(part.means_, full.means_)
    np.testing.assert_array_equal(part.whiten_, full.whiten_)
    assert part.params["standardised_on"] == 9 and full.params["standardised_on"] == len(X_TRAIN)
    res = RowReservoir(9)
    for idx in np.array_split(np.arange(len(X_TRAIN)), 4):
        res.add(torch.as_tensor(idx))
    sample = res.rows().numpy()
    train = full.layer_scores(inputs(X_TRAIN[sample]))
    np.testing.assert_allclose(part.centre_, train.mean(0), rtol=1e-12)
    np.testing.assert_allclose(part.spread_, train.std(0), rtol=1e-12)
    expected = ((full.layer_scores(TEST) - train.mean(0)) / train.std(0)).sum(axis=1)
    np.testing.assert_allclose(part.score_samples(TEST), expected, rtol=1e-10, atol=1e-10)
    # partial_fit after a fit adds to what was seen: two halves give the one-shot scorer
    half = len(X_TRAIN) // 2
    more = cls().fit(inputs(X_TRAIN[:half]), Y_TRAIN[:half]).partial_fit(inputs(X_TRAIN[half:]), Y_TRAIN[half:])
    np.testing.assert_allclose(more.score_samples(TEST), full.score_samples(TEST), rtol=1e-10, atol=1e-10)
