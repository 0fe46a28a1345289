"""Deep nearest neighbours (kNN).

Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors",
ICML 2022. With the L2-normalised penultimate features z = f / max(‖f‖₂, 1e-12) of the
M known training samples {z_1..z_M},

    score(f) = − ‖z − z_(k)‖₂,

where z_(k) is the k-th nearest normalised training feature to z in Euclidean distance
(the paper's negative k-th nearest-neighbour distance; higher = more likely known).
For unit vectors ‖z − z_i‖² = 2 − 2 cos(z, z_i), so this ranks like the cosine
similarity to the k-th neighbour. A zero feature vector stays zero after normalisation
(the epsilon): its distance to every unit training feature is 1, never NaN.

k = min(50, size of the smallest training class): the paper's k = 50 for CIFAR-10,
reduced when some known class has fewer than 50 training samples (docs/design.md, "Architecture"); the
k actually used is recorded in ``params["k"]``. No training-set subsampling.

Exact brute force (:mod:`gradosr.detectors.search`): the normalised training features
are stored in ``bank_dtype`` (float32 by default; float16 halves the bank; float64 is
what runs saved before it hold), the k nearest are found by the ``backend`` (``auto``:
FAISS ``IndexFlatL2`` when installed, else the chunked torch top-k, whose memory is
bounded by the block; the backend used is ``params["backend"]``), and the k-th distance
is then recomputed in float64 from the selected bank row by explicit differences.
Chunking and the backend do not change the neighbours beyond float rounding of near-ties.

The same scorer serves other representations through two parameters:

- ``factors``: the :class:`ScorerInputs` fields (or ``gradients`` keys) whose rows make
  a sample's representation. With several factors, each L2-normalised, the similarity of
  two samples is the product of their factors' cosines, which is the cosine of the
  factors' outer (Kronecker) product, and the distance is sqrt(2 − 2·Π cos): the ``plus``
  preset's kNN in gradient space uses ``factors=("logit_grad", "features")``, since the
  head's weight gradient of a sample is g hᵀ and cos(g₁h₁ᵀ, g₂h₂ᵀ) = cos(g₁, g₂)·cos(h₁, h₂),
  so the K×D gradients are never formed (neighbours by ``torch.topk`` on that distance);
- ``normalize``: ``False`` for plain Euclidean kNN on one unnormalised factor (for
  example standardised log gradient norms).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import (Scorer, check_chunk_size, check_labels, class_counts, float_row_chunks,
                                    float_rows, matrix_field)
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.detectors.search import BANK_DTYPES, Bank, blocked_topk, check_backend, check_bank_dtype, compute_dtype, resolve_backend
from gradosr.errors import CheckpointError, ConfigError, DataError

_NORM_EPS = 1e-12


def _factor(outputs: ScorerInputs, name: str, what: str, normalize: bool) -> torch.Tensor:
    return _normalised(torch.from_numpy(float_rows(outputs, name, f"kNN ({what})")), normalize)


def _normalised(f: torch.Tensor, normalize: bool) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS) if normalize else f


def fill_bank(outputs: ScorerInputs, name: str, method: str, bank_dtype: str, metric: str, backend: str,
              device, transform) -> Bank:
    """A :class:`Bank` of ``transform(start, float64 chunk)`` over the rows of the field ``name``,
    filled chunk by chunk (no float64 copy of the whole field)."""
    x = matrix_field(outputs, name, method)
    bank = Bank(len(x), x.shape[1], bank_dtype, metric, backend, device)
    for start, chunk in float_row_chunks(outputs, name, method):
        bank.put(transform(start, torch.from_numpy(chunk)))
    return bank.done()


@register
class KNN(Scorer):
    method_id = "knn"
    family = "feature"
    paper = "Sun, Ming, Zhu & Li, ICML 2022"
    needs = ("features",)
    needs_fit = True

    def __init__(self, k: int = 50, chunk_size: int | None = None, factors: tuple[str, ...] = ("features",),
                 normalize: bool = True, backend: str = "auto", bank_dtype: str = "float32",
                 device: str = "cpu") -> None:
        """``k``: the largest k (reduced to the smallest class size at fit);
        ``chunk_size``: queries per block (None: automatic); it does not change results;
        ``factors``, ``normalize``: the representation (module docstring); ``backend``:
        ``auto``, ``torch`` or ``faiss`` (FAISS searches one float32 factor);
        ``bank_dtype``: ``float32``, ``float16`` or ``float64``; ``device``: where the
        torch backend keeps the bank and searches (e.g. ``cuda``)."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        factors = tuple(factors)
        if not factors or (len(factors) > 1 and not normalize):
            raise ConfigError(f"kNN takes one factor, or several L2-normalised ones; got {list(factors)} "
                              f"with normalize={normalize}")
        self.k, self.chunk_size, self.factors, self.normalize = k, chunk_size, factors, bool(normalize)
        self.backend, self.bank_dtype, self.device = check_backend(backend), bank_dtype, device
        check_bank_dtype(bank_dtype)
        self.k_max = int(k)
        check_chunk_size(chunk_size)
        self.needs = factors
        self.params = {"k_max": self.k_max, "k": None, "normalize": "l2" if normalize else "none",
                       "distance": "euclidean" if len(factors) == 1 else "cosine of the factors' outer product",
                       **({"factors": list(factors)} if factors != ("features",) else {}),
                       "backend": None, "bank_dtype": bank_dtype}
        self.bank_: list[torch.Tensor] | None = None

    def _factors(self, outputs: ScorerInputs, what: str) -> list[torch.Tensor]:
        parts = [_factor(outputs, name, what, self.normalize) for name in self.factors]
        if any(len(p) != len(parts[0]) for p in parts):
            raise DataError(f"{what}: the factors {list(self.factors)} have different numbers of rows")
        return parts

    # ------------------------------------------------------------------ fit (streamed)
    # A chunk's factor rows are normalised (in float64) and kept in the bank's dtype; the
    # bank is assembled when the fit ends, each piece freed as it is copied in. What the
    # fit holds is the bank (by definition) and one piece, never the chunks' other fields.
    def _start_fit(self) -> None:
        self._pieces: list[list[torch.Tensor]] = []
        self._labels: list[np.ndarray] = []
        self._n_classes = 0

    def _pending(self) -> bool:
        return bool(getattr(self, "_pieces", None))  # emptied when the fit ends

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        if getattr(self, "_pieces", None) is None:
            self._start_fit()
        fields = [matrix_field(chunk, name, "kNN (fit)") for name in self.factors]
        if any(len(f) != len(fields[0]) for f in fields):
            raise DataError(f"fit: the factors {list(self.factors)} have different numbers of rows")
        if labels is None:
            raise DataError("kNN: fit needs the training labels")
        if len(fields[0]) == 0 and len(np.asarray(labels)) == 0:
            return  # an empty chunk (e.g. a distributed run's empty shard)
        y, n_classes = check_labels(labels, len(fields[0]), chunk)
        dtype = BANK_DTYPES[self.bank_dtype]
        widths = [f.shape[1] for f in fields]
        if self._pieces and widths != [p[0].shape[1] for p in self._pieces[0]]:
            raise DataError(f"kNN (fit): feature dimension {widths} differs from the earlier chunks' "
                            f"{[p[0].shape[1] for p in self._pieces[0]]}")
        # per factor, the chunk's rows in pieces of ROW_CHUNK (no float64 copy of a whole field)
        self._pieces.append([[_normalised(torch.from_numpy(f), self.normalize).to(dtype)
                              for _, f in float_row_chunks(chunk, name, "kNN (fit)")] for name in self.factors])
        self._labels.append(y)
        self._n_classes = max(self._n_classes, n_classes)

    def _finalize(self) -> None:
        """k = min(k_max, smallest class size); the banks of the normalised training factors."""
        pieces = getattr(self, "_pieces", None) or []
        if not pieces:
            raise DataError("kNN: fit needs at least one training sample")
        y = np.concatenate(self._labels)
        counts = class_counts(y, self._n_classes, "kNN")  # K: the widest chunk's (check_labels)
        self.k_ = int(min(self.k_max, counts.min()))
        backend = self._resolved_backend()
        self.banks_ = [Bank(len(y), pieces[0][i][0].shape[1], self.bank_dtype, "l2", backend, self.device)
                       for i in range(len(self.factors))]
        while pieces:
            for bank, parts in zip(self.banks_, pieces.pop(0)):
                while parts:
                    bank.put(parts.pop(0))
        self.banks_ = [b.done() for b in self.banks_]
        self._start_fit()
        self._restored()
        self._chunks = []
        self.fitted_ = True

    def _resolved_backend(self) -> str:
        return resolve_backend(self.backend, self.bank_dtype, faiss_supported=len(self.factors) == 1)

    def _restored(self) -> None:
        self.bank_ = [b.rows for b in self.banks_]
        self.params = {**self.params, "k": self.k_, "backend": self.banks_[0].backend}

    def kth_distances(self, outputs: ScorerInputs) -> np.ndarray:
        """Distance N of each query to its k-th nearest training sample (float64)."""
        self.check_fitted()
        query = self._factors(outputs, "score")
        for q, b in zip(query, self.bank_):
            if q.shape[1] != b.shape[1]:
                raise DataError(f"feature dimension {q.shape[1]} does not match the fitted {b.shape[1]}")
        if len(query) == 1:
            idx = self.banks_[0].search(query[0], self.k_, query_chunk=self.chunk_size)[:, -1]
            return (query[0] - self._rows64(0, idx)).norm(dim=1).numpy()
        c = compute_dtype(self.bank_[0].dtype)
        qs = [q.to(self.bank_[0].device, c) for q in query]

        def block_key(rows: slice, cols: slice) -> torch.Tensor:
            sim = None
            for q, b in zip(qs, self.bank_):
                s = q[rows] @ b[cols].to(c).T
                sim = s if sim is None else sim * s
            return -sim

        idx = blocked_topk(len(qs[0]), len(self.bank_[0]), self.k_, block_key, self.chunk_size)[1][:, -1].cpu()
        # 1 − Π_f cos_f without cancellation: with e_f = 1 − cos_f = ‖a_f − b_f‖²/2 for unit
        # vectors (1 when either is zero), r ← r + e_f − r·e_f gives r = 1 − Π (1 − e_f)
        r = torch.zeros(len(idx), dtype=torch.float64)
        for i, q in enumerate(query):
            b = self._rows64(i, idx)
            e = (q - b).square().sum(dim=1) / 2
            e = torch.where((q.norm(dim=1) > 0.5) & (b.norm(dim=1) > 0.5), e, torch.ones_like(e))
            r = r + e - r * e
        return (2.0 * r).clamp_min(0.0).sqrt().numpy()

    def _rows64(self, factor: int, idx: torch.Tensor) -> torch.Tensor:
        """The bank rows ``idx`` of one factor in float64, normalised again in float64
        (so that a float32 or float16 bank's rounding leaves them unit vectors)."""
        rows = self.bank_[factor][idx.to(self.bank_[factor].device)].cpu().to(torch.float64)
        return _normalised(rows, self.normalize)

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """−(distance to the k-th nearest training sample) -> N (float64)."""
        return -self.kth_distances(outputs)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        self.check_fitted()
        tensors = {f"bank.{i}": b.cpu().contiguous() for i, b in enumerate(self.bank_)}
        params = {"k": self.k_max, "factors": list(self.factors), "normalize": self.normalize,
                  "backend": self.backend, "bank_dtype": self.bank_dtype}
        return tensors, {"method_id": self.method_id, "params": params, "fitted": {"k_": self.k_}}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "KNN":
        """The stored scorer; a bank stored without ``bank_dtype`` (before it existed)
        is float64 and stays so, which scores exactly as it did."""
        try:
            params = dict(meta["params"])
            params.setdefault("bank_dtype", "float64")
            self = cls(**params)
            backend = self._resolved_backend()
            self.banks_ = [Bank.of(tensors[f"bank.{i}"], self.bank_dtype, "l2", backend, self.device)
                           for i in range(len(self.factors))]
            self.k_ = int(meta["fitted"]["k_"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the stored kNN scorer is incomplete: {exc}") from None
        self._restored()
        self.fitted_ = True
        return self
