"""Exact nearest-neighbour search (gradosr.detectors.search) and the bank-based scorers
on it: neighbours as scikit-learn's brute force, ties, chunk sizes, float16 banks, FAISS
agreement (when installed) and the backend recorded in params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from gradosr.detectors import KNN, ScorerInputs
from gradosr.detectors.nnguide import NNGuide
from gradosr.detectors.search import Bank, blocked_topk, faiss_module, resolve_backend
from gradosr.errors import ConfigError

HAVE_FAISS = faiss_module() is not None
needs_faiss = pytest.mark.skipif(not HAVE_FAISS, reason="faiss-cpu is not installed (pip install gradosr[faiss])")
BACKENDS = ["torch"] + (["faiss"] if HAVE_FAISS else [])


def data(n=600, m=40, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_neighbours_are_those_of_sklearn_brute_force(backend, metric):
    bank, query = data()
    if metric == "l2":
        expected = NearestNeighbors(n_neighbors=9, algorithm="brute").fit(bank).kneighbors(query)[1]
    else:
        expected = np.argsort(-(query @ bank.T), axis=1, kind="stable")[:, :9]
    for dtype in ("float32", "float64") if backend == "torch" else ("float32",):
        index = Bank.of(torch.from_numpy(bank), dtype, metric, backend)
        np.testing.assert_array_equal(index.search(torch.from_numpy(query), 9).numpy(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_bank_index(backend):
    bank = np.repeat(np.eye(3), 4, axis=0)  # 4 identical copies of each basis vector
    query = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]])
    got = Bank.of(torch.from_numpy(bank), "float32", "l2", backend).search(torch.from_numpy(query), 6).numpy()
    np.testing.assert_array_equal(got[0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(got[1], [4, 5, 6, 7, 0, 1])
    np.testing.assert_array_equal(got[2], [0, 1, 2, 3, 4, 5])  # all 12 at distance 1


def test_tied_k_th_keys_inside_a_block_and_across_blocks():
    rng = np.random.default_rng(3)
    key = torch.from_numpy(rng.integers(0, 4, size=(17, 50)).astype(np.float64))  # many ties
    expected = np.stack([np.lexsort((np.arange(50), row))[:7] for row in key.numpy()])
    for qc, bc in ((None, None), (1, 7), (5, 13), (17, 50)):
        vals, idx = blocked_topk(17, 50, 7, lambda r, c: key[r, c], qc, bc)
        np.testing.assert_array_equal(idx.numpy(), expected)
        np.testing.assert_array_equal(vals.numpy(), np.take_along_axis(key.numpy(), expected, 1))


def test_later_blocks_keep_only_keys_below_the_running_k_th_best():
    """Past the first block only entries below a query's k-th best so far are selected
    (:func:`gradosr.detectors.search.below`): with many tied integer keys and blocks
    where few or most entries pass, the neighbours and keys are those of a full
    lexicographic sort by (key, index)."""
    rng = np.random.default_rng(4)
    for low, high in ((0, 40), (0, 3)):  # few entries pass / most entries tie with the bound
        key = torch.from_numpy(rng.integers(low, high, size=(23, 3000)).astype(np.float32))
        expected = np.stack([np.lexsort((np.arange(3000), row))[:10] for row in key.numpy()])
        for qc, bc in ((None, None), (5, 64), (23, 250), (1, 10)):
            vals, idx = blocked_topk(23, 3000, 10, lambda r, c: key[r, c], qc, bc)
            np.testing.assert_array_equal(idx.numpy(), expected)
            np.testing.assert_array_equal(vals.numpy(), np.take_along_axis(key.numpy(), expected, 1))


def test_chunk_sizes_do_not_change_the_neighbours():
    bank, query = data(n=300, m=25, seed=1)
    b = Bank.of(torch.from_numpy(bank), "float32", "l2", "torch")
    ref = b.search(torch.from_numpy(query), 5).numpy()
    for qc, bc in ((1, 5), (4, 64), (25, 300), (7, 1000)):
        np.testing.assert_array_equal(b.search(torch.from_numpy(query), 5, qc, bc).numpy(), ref)


def test_knn_scores_on_every_backend_and_dtype_match_sklearn():
    bank, query = data(n=400, m=30, d=10, seed=2)
    y = np.arange(400) % 4
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    expected = -NearestNeighbors(n_neighbors=20, algorithm="brute").fit(unit(bank)).kneighbors(unit(query))[0][:, -1]
    train, test = ScorerInputs(features=torch.from_numpy(bank)), ScorerInputs(features=torch.from_numpy(query))
    for backend in BACKENDS:
        for dtype, rtol in (("float64", 1e-12), ("float32", 1e-6), ("float16", 5e-3)):
            if backend == "faiss" and dtype != "float32":
                with pytest.raises(ConfigError, match="float32"):
                    KNN(20, backend=backend, bank_dtype=dtype).fit(train, y)
                continue
            knn = KNN(20, backend=backend, bank_dtype=dtype, chunk_size=7).fit(train, y)
            assert knn.params["backend"] == backend and knn.params["bank_dtype"] == dtype
            assert knn.bank_[0].dtype == getattr(torch, dtype)
            np.testing.assert_allclose(knn.score_samples(test), expected, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_streamed_fit_keeps_only_its_bank(backend):
    """A chunked fit keeps the chunks' normalised factor rows, not the chunks: the
    chunks (with their other fields) are freed once added, and the scores are those of
    sklearn's brute force on all rows; a chunk of another width is refused."""
    import gc
    import weakref

    from gradosr.errors import DataError

    bank, query = data(n=300, m=20, d=6, seed=4)
    y = np.arange(300) % 3
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    expected = -NearestNeighbors(n_neighbors=10, algorithm="brute").fit(unit(bank)).kneighbors(unit(query))[0][:, -1]
    knn, refs = KNN(10, backend=backend), []
    for s in range(0, 300, 70):
        chunk = ScorerInputs(logits=torch.zeros(len(bank[s:s + 70]), 3), features=torch.from_numpy(bank[s:s + 70]))
        refs.append(weakref.ref(chunk))
        knn.partial_fit(chunk, y[s:s + 70])
        del chunk
    gc.collect()
    assert all(r() is None for r in refs)
    np.testing.assert_allclose(knn.score_samples(ScorerInputs(features=torch.from_numpy(query))), expected, rtol=1e-6)
    with pytest.raises(DataError, match="dimension"):
        KNN(10).partial_fit(ScorerInputs(features=torch.from_numpy(bank[:50])), y[:50]).partial_fit(
            ScorerInputs(features=torch.zeros(50, 4, dtype=torch.float64)), y[:50])


def test_auto_backend_and_the_recorded_backend():
    assert resolve_backend("auto", "float32") == ("faiss" if HAVE_FAISS else "torch")
    assert resolve_backend("auto", "float16") == "torch"
    assert resolve_backend("auto", "float32", faiss_supported=False) == "torch"
    x, _ = data(n=50, d=4)
    knn = KNN(3).fit(ScorerInputs(features=torch.from_numpy(x)), np.zeros(50, dtype=int))
    assert knn.params["backend"] == ("faiss" if HAVE_FAISS else "torch")
    with pytest.raises(ConfigError):
        KNN(backend="annoy")
    with pytest.raises(ConfigError):
        KNN(bank_dtype="int8")


def test_without_faiss_auto_is_torch_and_forcing_faiss_says_how_to_install_it(monkeypatch):
    import gradosr.detectors.search as search

    monkeypatch.setattr(search, "faiss_module", lambda: None)  # as if faiss-cpu were not installed
    assert resolve_backend("auto", "float32") == "torch"
    with pytest.raises(ConfigError, match=r"gradosr\[faiss\]"):
        resolve_backend("faiss", "float32")


@needs_faiss
def test_faiss_and_torch_agree_on_clustered_features():
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 3, size=(6, 32))
    bank = np.concatenate([c + rng.normal(size=(300, 32)) for c in centres]).astype(np.float32)
    query = np.concatenate([c + rng.normal(size=(20, 32)) for c in centres]).astype(np.float32)
    got = {b: Bank.of(torch.from_numpy(bank), "float32", "l2", b).search(torch.from_numpy(query), 50).numpy()
           for b in ("torch", "faiss")}
    assert (got["torch"] == got["faiss"]).mean() > 0.999  # float32 rounding may swap near-equal neighbours
    np.testing.assert_array_equal(np.sort(got["torch"][:, :10]), np.sort(got["faiss"][:, :10]))


def test_nnguide_backends_and_float16_bank():
    rng = np.random.default_rng(6)
    x, q = rng.normal(size=(200, 8)), rng.normal(size=(30, 8))
    w, b = rng.normal(size=(3, 8)), rng.normal(size=3)
    y = np.arange(200) % 3

    def outs(f):
        return ScorerInputs(logits=torch.from_numpy(f @ w.T + b), features=torch.from_numpy(f))

    ref = NNGuide(bank_dtype="float64").fit(outs(x), y).score_samples(outs(q))
    for backend in BACKENDS:
        got = NNGuide(backend=backend).fit(outs(x), y)
        assert got.params["backend"] == backend
        np.testing.assert_allclose(got.score_samples(outs(q)), ref, rtol=1e-5)
    half = NNGuide(bank_dtype="float16").fit(outs(x), y)
    assert half.bank_.dtype == torch.float16 and half.params["backend"] == "torch"
    np.testing.assert_allclose(half.score_samples(outs(q)), ref, rtol=5e-3)


def test_a_float16_bank_round_trips_through_state():
    x, q = data(n=80, m=10, d=6, seed=7)
    knn = KNN(5, bank_dtype="float16").fit(ScorerInputs(features=torch.from_numpy(x)), np.arange(80) % 2)
    tensors, meta = knn.state()
    assert tensors["bank.0"].dtype == torch.float16
    back = KNN.from_state(tensors, meta)
    test = ScorerInputs(features=torch.from_numpy(q))
    np.testing.assert_array_equal(back.score_samples(test), knn.score_samples(test))
    meta["params"].pop("bank_dtype")  # a scorer saved before bank_dtype existed: a float64 bank
    assert KNN.from_state({"bank.0": tensors["bank.0"].double()}, meta).bank_[0].dtype == torch.float64


def test_no_queries_give_no_neighbours():  # an empty shard of a distributed run
    bank, _ = data(n=20, d=3)
    for backend in BACKENDS:
        assert Bank.of(torch.from_numpy(bank), "float32", "l2", backend).search(torch.zeros(0, 3), 4).shape == (0, 4)
    x = ScorerInputs(features=torch.from_numpy(bank))
    knn = KNN(3, factors=("features", "features"), bank_dtype="float64").fit(x, np.zeros(20, dtype=int))
    assert knn.score_samples(ScorerInputs(features=torch.zeros(0, 3, dtype=torch.float64))).shape == (0,)


@needs_faiss
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_backend_gives_the_index_flat_search(metric):
    """The faiss backend (faiss.knn on the bank's rows) finds what IndexFlatL2/IP finds."""
    import faiss

    rng = np.random.default_rng(5)
    rows = rng.standard_normal((700, 24)).astype(np.float32)
    q = rng.standard_normal((90, 24)).astype(np.float32)
    index = faiss.IndexFlatL2(24) if metric == "l2" else faiss.IndexFlatIP(24)
    index.add(rows)
    _, expected = index.search(q, 7)
    got = Bank.of(torch.from_numpy(rows), "float32", metric, "faiss").search(torch.from_numpy(q), 7)
    np.testing.assert_array_equal(got.numpy(), expected)
