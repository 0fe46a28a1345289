"""Exact nearest-neighbour search over a bank of known training rows.

The bank-based scorers (``knn``, the ``plus`` preset's kNN signals, ``nnguide``) find,
for every query row, the k bank rows of smallest key: the squared Euclidean distance
(``metric="l2"``) or the negated inner product (``metric="ip"``). Two backends give the
same neighbours (scikit-learn's ``NearestNeighbors(algorithm="brute")`` to float32
tolerance, tested):

- ``torch``: a blocked matrix-product top-k (CPU or GPU). Per block of ``query_chunk``
  queries × ``bank_chunk`` bank rows the keys ‖b‖² − 2 q·b (or −q·b) are one matrix
  product on the queries pre-scaled by −2 (or −1), which is exact, then + ‖b‖²: on the
  GPU torch's ``mm``; on the CPU NumPy's ``matmul``, whose OpenBLAS ran 10-17% faster
  than torch's MKL on the AMD CPU the benchmarks ran on. The k smallest of the block
  are merged into the running k best of the queries. Memory is bounded by the block
  (about 2²⁴ entries by default, 64 MB in float32), never bank × queries.
- ``faiss``: FAISS's exact brute-force search (``pip install gradosr[faiss]``),
  float32 banks only: ``faiss.knn`` on the bank's rows, the function behind
  ``IndexFlatL2.search`` / ``IndexFlatIP.search`` (the same neighbours, tested against
  them), without an index: the index's storage is zero-filled at its full
  size when allocated, so filling it beside the fit's normalised rows peaked at twice
  the bank, while the bank's own tensor is touched only as the rows are copied in.
- ``auto`` (the default): ``faiss`` when it is importable and the bank is float32,
  else ``torch``. The backend in use is recorded in the scorer's ``params["backend"]``.

**Ties** are resolved deterministically on both backends: among equal keys the lowest
bank index comes first (torch: an exact selection of the rows whose k-th key is tied;
FAISS: its heap keeps the earlier index, and the k found are ordered by (key, index)).

**Bank dtype** (``bank_dtype``): ``float32`` (default; 4·N·D bytes), ``float16``
(half the memory; keys computed in float32 on blocks converted on the fly) or
``float64`` (the exact keys of runs saved before this module). The scorers recompute
the score of the neighbours they select in float64 from the stored rows, so only the
choice of neighbours among near-ties and the rows' rounding depend on the dtype.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gradosr.errors import ConfigError

BACKENDS = ("auto", "torch", "faiss")
BANK_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
METRICS = ("l2", "ip")
#: query × bank entries per block of the torch backend
BLOCK_ENTRIES = 1 << 24
#: queries per block of the torch backend (fewer when the block budget is smaller)
QUERY_CHUNK = 4096


def faiss_module():
    """The ``faiss`` module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_bank_dtype(bank_dtype: str) -> torch.dtype:
    if bank_dtype not in BANK_DTYPES:
        raise ConfigError(f"bank_dtype must be one of {tuple(BANK_DTYPES)}, got {bank_dtype!r}")
    return BANK_DTYPES[bank_dtype]


def resolve_backend(backend: str, bank_dtype: str, faiss_supported: bool = True) -> str:
    """The backend ``backend`` gives for a bank of ``bank_dtype`` ("torch" or "faiss");
    ``faiss_supported``: whether the search is one FAISS does (one factor)."""
    check_backend(backend)
    usable = faiss_supported and bank_dtype == "float32"
    if backend == "faiss":
        if faiss_module() is None:
            raise ConfigError("backend 'faiss' needs the faiss-cpu package: pip install gradosr[faiss]")
        if not usable:
            raise ConfigError(f"backend 'faiss' searches float32 banks of one factor; this bank is {bank_dtype}"
                              + ("" if faiss_supported else " with several factors"))
        return "faiss"
    if backend == "auto" and usable and faiss_module() is not None:
        return "faiss"
    return "torch"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype keys are computed in for a bank of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_smallest(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest entries of every row of ``key`` (rows × n), as (values, column
    indices), ascending, ties by lowest column index, exactly. A key of +inf marks an
    absent entry: the order among +inf keys is unspecified."""
    kk = min(k, key.shape[1])
    vals, idx = torch.topk(key, min(kk + 1, key.shape[1]), dim=1, largest=False, sorted=True)
    # the k smallest are one set unless the (k+1)-th smallest key equals the k-th
    tied = ((vals[:, kk] == vals[:, kk - 1]) & (vals[:, kk - 1] < float("inf"))).nonzero().flatten() \
        if vals.shape[1] > kk else vals[:0, 0].long()
    vals, idx = vals[:, :kk].contiguous(), idx[:, :kk].contiguous()
    kth = vals[:, -1:]
    if len(tied):  # rows where topk may have taken a later index among equal k-th keys
        sub, bound = key[tied], kth[tied]
        eq = sub == bound
        need = kk - (sub < bound).sum(dim=1, keepdim=True)
        take = (sub < bound) | (eq & (eq.cumsum(dim=1) <= need))
        cols = take.nonzero()[:, 1].view(len(tied), kk)  # ascending column order
        idx[tied], vals[tied] = cols, sub.gather(1, cols)
    return sort_by_key_then_index(vals, idx)


def sort_by_key_then_index(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals, idx) of every row reordered by (value, index)."""
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, stable=True)
    return vals, idx.gather(1, order)


#: columns per group of :func:`below`'s prefilter (one row minimum per group)
GROUP = 32


def below(key: torch.Tensor, bound: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The candidates of every row of ``key`` for the k best: its k smallest entries
    among those strictly below the row's ``bound`` (rows × 1: the k-th best key so far,
    of lower bank indices, so an entry equal to it can never enter), as
    :func:`select_smallest` gives them, rows with fewer padded with +inf (index: the
    block's width). When many groups pass, the block's plain k smallest instead (the
    entries at or above the bound among them fall behind the k best in :func:`merge`).
    (None, None) when no entry of the block is below its bound.

    After the first blocks few entries pass, so the block is read once, as the minima of
    its groups of :data:`GROUP` consecutive columns (one fast reduction), and only the
    groups whose minimum is below the bound are gathered and selected from. That is
    what makes the search about as fast as its matrix product."""
    rows, n = key.shape
    whole = n - n % GROUP
    mins = [key[:, :whole].view(rows, whole // GROUP, GROUP).amin(dim=2)] if whole else []
    if whole < n:
        mins.append(key[:, whole:].amin(dim=1, keepdim=True))  # the last, narrower group
    r, g = (torch.cat(mins, dim=1) < bound).nonzero(as_tuple=True)  # row-major: ascending groups within a row
    if len(r) == 0:
        return None, None
    if len(r) * GROUP * 8 >= key.numel():  # many groups pass: a plain selection is as cheap
        # (not masked to the entries below the bound: those at or above it, of higher
        # indices than the k best so far, fall behind them in :func:`merge`)
        return select_smallest(key, k)
    counts = torch.bincount(r, minlength=rows)
    slot = torch.arange(len(r), device=key.device) - (torch.cumsum(counts, 0) - counts)[r]
    cols = g[:, None] * GROUP + torch.arange(GROUP, device=key.device)  # groups × GROUP bank columns
    vals = key[r[:, None], cols.clamp_max(n - 1)]
    drop = (cols >= n) | (vals >= bound[r])
    width = int(counts.max()) * GROUP
    cand = torch.full((rows, width), float("inf"), dtype=key.dtype, device=key.device)
    where = torch.full((rows, width), n, dtype=torch.long, device=key.device)
    at = slot[:, None] * GROUP + torch.arange(GROUP, device=key.device)  # ascending columns within a row
    cand[r[:, None], at] = vals.masked_fill(drop, float("inf"))
    where[r[:, None], at] = cols.masked_fill(drop, n)
    vals, j = select_smallest(cand, k)
    return vals, where.gather(1, j)


def merge(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor],
          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two sorted candidate lists, ``best`` holding only lower indices than ``new``."""
    if best is None:
        return new
    vals, order = torch.cat([best[0], new[0]], dim=1).sort(dim=1, stable=True)
    idx = torch.cat([best[1], new[1]], dim=1).gather(1, order)
    return vals[:, :k], idx[:, :k]


def blocked_topk(n_query: int, n_bank: int, k: int, block_key: Callable[[slice, slice], torch.Tensor],
                 query_chunk: int | None = None, bank_chunk: int | None = None,
                 block_entries: int = BLOCK_ENTRIES) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest keys of every query over the whole bank: ``block_key(queries,
    bank_rows)`` gives the keys of one block (slices; it may reuse the previous block's
    memory, which is not read again); blocks of ``query_chunk`` ×
    ``bank_chunk`` (default: about ``block_entries`` entries). Returns (values, bank
    indices), n_query × min(k, n_bank), ascending, ties by lowest index, on the device
    of the keys. The result does not depend on the chunk sizes beyond the keys' own
    rounding (a BLAS may round a product differently for another block shape, which can
    swap two neighbours whose keys differ by one float32 ulp)."""
    if n_query == 0:  # e.g. an empty shard of a distributed run
        empty = block_key(slice(0, 0), slice(0, min(k, n_bank)))
        return empty, torch.empty(empty.shape, dtype=torch.long, device=empty.device)
    qc = query_chunk or max(1, min(n_query, QUERY_CHUNK, block_entries // max(1, k)))
    bc = bank_chunk or max(k, block_entries // qc)
    vals_out, idx_out = [], []
    for qs in range(0, n_query, qc):
        rows, best = slice(qs, min(qs + qc, n_query)), None
        for bs in range(0, n_bank, bc):
            key = block_key(rows, slice(bs, min(bs + bc, n_bank)))
            if best is not None and best[0].shape[1] >= k:
                vals, idx = below(key, best[0][:, -1:], k)
                if vals is None:
                    continue  # nothing in this block beats any query's k-th best so far
            else:
                vals, idx = select_smallest(key, k)
            best = merge(best, (vals, idx + bs), k)
        vals_out.append(best[0])
        idx_out.append(best[1])
    return torch.cat(vals_out), torch.cat(idx_out)


class BlockBuffer:
    """One reusable block of keys: :func:`blocked_topk` keeps nothing of a block's keys
    once the next is asked for, so every block is written into the same memory instead
    of a fresh allocation (which glibc maps anew, and the kernel zeroes, page by page)."""

    def __init__(self, dtype: torch.dtype, device) -> None:
        self.dtype, self.device, self.flat = dtype, device, None

    def get(self, rows: int, cols: int) -> torch.Tensor:
        """A contiguous rows × cols tensor (its values undefined)."""
        if self.flat is None or self.flat.numel() < rows * cols:
            self.flat = torch.empty(rows * cols, dtype=self.dtype, device=self.device)
        return self.flat[:rows * cols].view(rows, cols)


class Bank:
    """N bank rows of dimension D in ``bank_dtype`` on ``device``, filled by :meth:`put`
    (chunks of rows, any float dtype), searched by :meth:`search`.

    ``metric``: ``l2`` (nearest in Euclidean distance) or ``ip`` (largest inner product);
    ``backend``: "torch" or "faiss" (resolved, see :func:`resolve_backend`)."""

    def __init__(self, n: int, d: int, bank_dtype: str = "float32", metric: str = "l2", backend: str = "torch",
                 device: str | torch.device = "cpu") -> None:
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dtype, self.metric, self.backend = check_bank_dtype(bank_dtype), metric, backend
        self.n, self.d, self.filled = n, d, 0
        # allocated, not touched: pages become resident as put() copies rows in
        self.device = torch.device("cpu" if backend == "faiss" else device)
        self._rows = torch.empty((n, d), dtype=self.dtype, device=self.device)

    @classmethod
    def of(cls, rows: torch.Tensor, bank_dtype: str, metric: str, backend: str, device="cpu") -> "Bank":
        """A bank holding ``rows`` (N×D), filled in chunks."""
        bank = cls(len(rows), rows.shape[1], bank_dtype, metric, backend, device)
        for start in range(0, len(rows), 1 << 16):
            bank.put(rows[start:start + (1 << 16)])
        return bank.done()

    def put(self, chunk) -> None:
        """Append the rows ``chunk`` (n×D)."""
        chunk = torch.as_tensor(chunk).detach()
        self._rows[self.filled:self.filled + len(chunk)] = chunk.to(self.device, self.dtype)
        self.filled += len(chunk)

    def done(self) -> "Bank":
        """Finish filling: squared norms of the rows (torch backend, metric l2)."""
        if self.filled != self.n:
            raise ValueError(f"the bank has {self.filled} of its {self.n} rows")
        if self.backend == "torch" and self.metric == "l2":
            c = compute_dtype(self.dtype)
            self.sq_ = torch.cat([self._rows[s:s + (1 << 16)].to(c).square().sum(dim=1)
                                  for s in range(0, self.n, 1 << 16)]) if self.n else torch.empty(0, dtype=c)
        return self

    @property
    def rows(self) -> torch.Tensor:
        """The stored rows N×D."""
        return self._rows

    @property
    def nbytes(self) -> int:
        return self.n * self.d * torch.empty(0, dtype=self.dtype).element_size()

    def search(self, query: torch.Tensor, k: int, query_chunk: int | None = None,
               bank_chunk: int | None = None) -> torch.Tensor:
        """Bank indices (int64, n×k, CPU) of the k nearest rows of every query row, best
        first, ties by lowest index."""
        if self.backend == "faiss":
            faiss = faiss_module()
            q = np.ascontiguousarray(torch.as_tensor(query).detach().cpu().to(torch.float32).numpy())
            metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
            dist, idx = faiss.knn(q, self._rows.numpy(), k, metric=metric)
            key = torch.from_numpy(dist if self.metric == "l2" else -dist)
            return sort_by_key_then_index(key, torch.from_numpy(idx))[1]
        c = compute_dtype(self.dtype)
        q = torch.as_tensor(query).to(self.device, c)
        buffer = BlockBuffer(c, self.device)
        # the queries scaled by −2 (l2) or −1 (ip), which is exact: a block's keys are then
        # one product (+ ‖b‖² for l2); on the CPU by NumPy's BLAS (OpenBLAS, the BLAS of
        # FAISS's wheels too), 10-17% faster than torch's MKL on this project's AMD CPU
        scaled = q.detach() * (-2.0 if self.metric == "l2" else -1.0)
        cpu = self.device.type == "cpu"
        scaled_np = scaled.numpy() if cpu else None

        def block_key(rows: slice, cols: slice) -> torch.Tensor:
            b = self._rows[cols].to(c)
            out = buffer.get(rows.stop - rows.start, cols.stop - cols.start)
            if cpu:
                np.matmul(scaled_np[rows], b.numpy().T, out=out.numpy())
            else:
                torch.mm(scaled[rows], b.T, out=out)
            return out.add_(self.sq_[cols]) if self.metric == "l2" else out

        return blocked_topk(len(q), self.n, k, block_key, query_chunk, bank_chunk)[1].cpu()
