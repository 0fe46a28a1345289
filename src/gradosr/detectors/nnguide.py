"""NNGuide: nearest-neighbour guidance of a classifier's confidence.

Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection",
ICCV 2023. Acts on the penultimate features h (D, L2-normalised: ĥ = h / max(‖h‖₂, 1e-12))
and the logits z (K), as in the paper. The confidence is the energy score
E(x) = logsumexp_k z_k.

**Bank** (fit): every known training sample i contributes ĥ_i scaled by its own
confidence, b_i = E(x_i) · ĥ_i (M = the number of training samples).

**Score.** The guidance is the mean of the k largest inner products of the query's
normalised feature with the bank, and it scales the query's own confidence:

    G(x) = (1/k) Σ_{i ∈ top-k(ĥ·b_i)} ĥ · b_i,        score(x) = E(x) · G(x),

higher = more likely known. ĥ·b_i = E(x_i) cos(h, h_i): the neighbours are chosen by
this confidence-weighted similarity (the authors' ``faiss.IndexFlatIP`` search on the
scaled bank), not by the cosine alone.

**k and the bank.** The paper's k = 10 (the authors' configuration), reduced to the size
of the smallest known training class when a class has fewer samples (as for ``knn``);
the k used is ``params["k"]``. The paper's ImageNet bank is a random 1% of the training
set, a saving for 1.28M images; here the bank is the whole known training set (no
sampling, deterministic). Exact search (:mod:`gradosr.detectors.search`, metric ``ip``):
the bank is stored in ``bank_dtype`` (float32 by default, float16 or float64), the k
neighbours are found by the ``backend`` (``auto``: FAISS ``IndexFlatIP`` when installed,
else the chunked torch top-k; recorded in ``params["backend"]``), and their inner
products are recomputed in float64 from the stored rows. Chunking does not change the
results.

Differences from the references: OpenOOD v1.5 uses k = 100 with a 1% bank (and adds
1e-10 to the normalised features); pytorch-ood's NNGuide searches neighbours with the
cosine distance on the scaled bank, which discards the bank's confidence scaling, and
divides the bank confidences by their mean. Here the authors' definition: k = 10 and
the scaled bank's inner products. The authors also apply ReAct to their ImageNet
ResNet-50; that is a separate method (not applied here).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_chunk_size, check_labels, class_counts, float_rows, matrix_field
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.knn import fill_bank
from gradosr.detectors.registry import register
from gradosr.detectors.search import Bank, check_backend, check_bank_dtype, resolve_backend
from gradosr.errors import ConfigError, DataError

_NORM_EPS = 1e-12
#: the paper's number of neighbours
NNGUIDE_K = 10


def _normalised(h: np.ndarray) -> np.ndarray:
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), _NORM_EPS)


@register
class NNGuide(Scorer):
    method_id = "nnguide"
    family = "feature"
    paper = "Park, Jung & Teoh, ICCV 2023"
    needs = ("logits", "features")
    needs_fit = True
    _state_tensors = ("bank_",)
    _state_meta = ("k_",)

    def __init__(self, k: int = NNGUIDE_K, chunk_size: int | None = None, backend: str = "auto",
                 bank_dtype: str = "float32", device: str = "cpu") -> None:
        """``k``: the largest number of neighbours (reduced to the smallest class size at
        fit); ``chunk_size``: queries per block (None: automatic); it does not change
        results; ``backend``, ``bank_dtype``, ``device``: the search (module docstring)."""
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        self.k = k
        self.chunk_size = check_chunk_size(chunk_size)
        self.backend, self.bank_dtype, self.device = check_backend(backend), bank_dtype, device
        check_bank_dtype(bank_dtype)
        self.params = {"layer": "penultimate features (L2-normalised) + logits", "confidence": "energy (T = 1)",
                       "k_max": int(k), "k": None, "bank": "all known training samples", "backend": None,
                       "bank_dtype": bank_dtype}

    def _rows(self, inputs: ScorerInputs) -> tuple[np.ndarray, np.ndarray]:
        """(normalised features N×D, energies N)."""
        h = float_rows(inputs, "features", "NNGuide")
        return _normalised(h), self._energy(inputs, len(h))

    @staticmethod
    def _energy(inputs: ScorerInputs, n: int) -> np.ndarray:
        z = float_rows(inputs, "logits", "NNGuide")
        if len(z) != n:
            raise DataError(f"NNGuide: {len(z)} logit rows but {n} feature rows")
        from scipy.special import logsumexp  # imported on use: scipy.special costs every command 0.3 s

        return logsumexp(z, axis=1)

    def _fit(self, inputs: ScorerInputs, labels: np.ndarray) -> None:
        """The bank E(x_i)·ĥ_i of the training samples; k = min(k, smallest class size)."""
        n = len(matrix_field(inputs, "features", "NNGuide"))
        energy = torch.from_numpy(self._energy(inputs, n))
        y, n_classes = check_labels(labels, n, inputs)
        self.k_ = int(min(int(self.k), class_counts(y, n_classes, "NNGuide").min()))

        def scaled(start: int, h: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(_normalised(h.numpy())) * energy[start:start + len(h), None]

        self.index_ = fill_bank(inputs, "features", "NNGuide", self.bank_dtype, "ip",
                                resolve_backend(self.backend, self.bank_dtype), self.device, scaled)
        self._restored()

    def _restored(self) -> None:
        if not hasattr(self, "index_"):  # from_state: the stored bank
            self.index_ = Bank.of(torch.as_tensor(self.bank_), self.bank_dtype, "ip",
                                  resolve_backend(self.backend, self.bank_dtype), self.device)
        self.bank_ = self.index_.rows
        self.k_ = int(self.k_)
        self.params = {**self.params, "k": self.k_, "backend": self.index_.backend}

    def guidance(self, inputs: ScorerInputs) -> tuple[np.ndarray, np.ndarray]:
        """(guidance G N, energy E N) of the queries (float64)."""
        self.check_fitted()
        h, energy = self._rows(inputs)
        if h.shape[1] != self.bank_.shape[1]:
            raise DataError(f"feature dimension {h.shape[1]} does not match the fitted {self.bank_.shape[1]}")
        q = torch.from_numpy(h)
        idx = self.index_.search(q, self.k_, query_chunk=self.chunk_size)
        # one neighbour rank at a time: N×D float64 at once, not the N×k×D neighbours
        sims = torch.stack([(q * self.bank_[idx[:, j]].to(torch.float64)).sum(dim=1) for j in range(idx.shape[1])],
                           dim=1) if idx.shape[1] else torch.zeros((len(q), 0), dtype=torch.float64)
        return np.sort(sims.numpy(), axis=1).mean(axis=1), energy

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """E(x) · G(x) -> N (float64), higher = more likely known."""
        g, energy = self.guidance(inputs)
        return energy * g
