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
from gradosr.detectors.rmds import RMDS


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
