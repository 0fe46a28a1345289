"""GROOD: the gradient of a nearest-class-prototype loss with respect to an OOD prototype.

ElAraby, Sahoo, Pequignot, Novello & Paull, "GROOD: GRadient-aware Out-Of-Distribution
detection", TMLR 2025 (arXiv 2312.14427). On the penultimate features h (D; the head's
input) of the known training samples with labels 0..K-1:

- class prototypes p_k = the mean feature of class k;
- an OOD prototype p_o = the mean feature of synthetic samples (below);
- with d_j = ‖h − p_j‖₂ over the K class prototypes and p_o, the nearest-class-prototype
  softmax loss with the nearest class prototype ŷ = argmin_{k ≤ K} d_k as target,

      L(h) = −log( exp(−d_ŷ) / (Σ_k exp(−d_k) + exp(−d_o)) ),

  whose gradient with respect to the OOD prototype is, with q_o = exp(−d_o) / (Σ_k
  exp(−d_k) + exp(−d_o)) the softmax weight of p_o,

      g(h) = ∂L/∂p_o = q_o · (h − p_o) / d_o        (D);

- the score is the Euclidean distance to the nearest of the training samples' gradients
  {g(h_i)} (k = 1, brute force, exact, float64):

      score(x) = − min_i ‖g(h(x)) − g(h_i)‖₂,    higher = more likely known.

Synthetic samples: ``n_synthetic`` = 256 images of Gaussian noise with the per-pixel
mean and standard deviation of the known training inputs (seeded, ``seed`` = 0), passed
through the model; p_o is the mean of their penultimate features. The paper builds its
OOD prototype from synthetic samples without seeing real unknowns; this generator is
our choice of the simplest such samples (stated here because the construction of the
synthetic set varies between the paper's versions). The model runs only at fit; the
scores need the features alone. The gradient is evaluated in closed form (the formula
above, float64); the test checks it against autograd on the loss written out.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_labels, class_counts, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.intermediate import batched, check_batch_size, model_inputs
from gradosr.detectors.registry import register
from gradosr.detectors.search import Bank
from gradosr.errors import ConfigError, DataError
from gradosr.models import find_head


def prototype_gradient(h: torch.Tensor, protos: torch.Tensor, ood: torch.Tensor) -> torch.Tensor:
    """∂L/∂p_o (N×D, float64) for features h (N×D), class prototypes K×D and the OOD
    prototype (D), in closed form."""
    d = torch.cdist(h, torch.cat([protos, ood[None]]))  # N×(K+1)
    d_o = d[:, -1]
    q_o = torch.softmax(-d, dim=1)[:, -1]
    return (q_o / d_o.clamp_min(1e-300))[:, None] * (h - ood[None])


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every query row to its nearest row of ``bank``: the neighbour
    from the project's exact search (:class:`gradosr.detectors.search.Bank`, float64,
    memory bounded by its blocks, ties to the lowest index), the distance by explicit
    difference."""
    if not len(queries):
        return torch.zeros(0, dtype=queries.dtype)
    idx = Bank.of(bank, "float64", "l2", "torch").search(queries, 1)[:, 0]
    return (queries - bank[idx]).norm(dim=1)


@register
class GROOD(Scorer):
    method_id = "grood"
    family = "gradient"
    paper = "ElAraby, Sahoo, Pequignot, Novello & Paull, TMLR 2025"
    needs = ("features", "model", "inputs")
    needs_fit = True
    _state_tensors = ("prototypes_", "ood_prototype_", "bank_")

    def __init__(self, n_synthetic: int = 256, seed: int = 0, batch_size: int = 256) -> None:
        """``n_synthetic``: noise images behind the OOD prototype; ``seed``: their seed."""
        if isinstance(n_synthetic, bool) or not isinstance(n_synthetic, int) or n_synthetic < 1:
            raise ConfigError(f"n_synthetic must be a positive integer, got {n_synthetic!r}")
        self.n_synthetic, self.seed = n_synthetic, int(seed)
        self.batch_size = check_batch_size(batch_size)
        self.params = {"layer": "penultimate", "loss": "nearest-class-prototype softmax of -euclidean distances",
                       "ood_prototype": f"mean feature of {n_synthetic} Gaussian-noise images (training pixel mean/std)",
                       "knn_k": 1, "seed": self.seed}

    def _synthetic_features(self, inputs: ScorerInputs) -> torch.Tensor:
        model, x = model_inputs(inputs, self.method_id)
        xd = x.detach().to(torch.float64)
        mean, std = xd.mean(dim=0), xd.std(dim=0, unbiased=False)
        gen = torch.Generator().manual_seed(self.seed)
        noise = mean + std * torch.randn((self.n_synthetic, *x.shape[1:]), generator=gen, dtype=torch.float64)
        head = find_head(model)
        feats: list[torch.Tensor] = []

        def step(m, xb):
            hook = head.register_forward_hook(lambda mod, i, o: feats.append(i[0].detach()))
            try:
                with torch.no_grad():
                    m(xb)
            finally:
                hook.remove()

        batched(ScorerInputs(inputs=noise.to(x.dtype), model=model), self.batch_size, self.method_id, step)
        return torch.cat(feats).to(device="cpu", dtype=torch.float64).reshape(self.n_synthetic, -1)

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """Class prototypes, the OOD prototype and the training gradients."""
        h = torch.as_tensor(float_rows(inputs, "features", "grood (fit)"))
        y, k = check_labels(labels, len(h), inputs)
        counts = class_counts(y, k, "grood")
        protos = torch.zeros(k, h.shape[1], dtype=torch.float64)
        protos.index_add_(0, torch.as_tensor(y), h)
        self.prototypes_ = protos / torch.as_tensor(counts, dtype=torch.float64)[:, None]
        synth = self._synthetic_features(inputs)
        if synth.shape[1] != h.shape[1]:
            raise DataError(f"grood: the head's input has {synth.shape[1]} features, the features {h.shape[1]}")
        self.ood_prototype_ = synth.mean(dim=0)
        self.bank_ = prototype_gradient(h, self.prototypes_, self.ood_prototype_)

    def gradients(self, outputs: ScorerInputs) -> torch.Tensor:
        """∂L/∂p_o of the samples, float64 N×D."""
        self.check_fitted()
        h = torch.as_tensor(float_rows(outputs, "features", "grood (score)"))
        if h.shape[1] != self.prototypes_.shape[1]:
            raise DataError(f"grood: features have {h.shape[1]} dimensions, fitted with {self.prototypes_.shape[1]}")
        return prototype_gradient(h, self.prototypes_, self.ood_prototype_)

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """−(distance to the nearest training gradient) -> N (float64)."""
        return (-nearest_distance(self.gradients(outputs), self.bank_)).numpy()
