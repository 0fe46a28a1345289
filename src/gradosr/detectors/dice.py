"""DICE: directed sparsification of the head's weights, scored by the energy.

Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV
2022. With the penultimate activations h (D; ``features``, the input of the linear
head W (K×D), b) and their mean over the N known training samples h̄ = (1/N) Σ_n h_n,
the contribution matrix is

    V = W ⊙ h̄        (V_kj = W_kj · h̄_j: unit j's expected contribution to logit k),

M keeps the weights of the m = K·D − round(K·D·p/100) largest entries of V (at least
1; ties to the lower row-major index) and zeroes the others, and

    score(x) = logsumexp_k ((W ⊙ M) h + b)_k,

higher = more likely known (:mod:`gradosr.detectors.shaping`: the energy of the
sparsified linear head on the penultimate activations; a model whose head is not its
last linear map needs its penultimate layer as ``features``).

- Layer: the final linear layer's weights, with the penultimate activations' training
  mean, as in the paper.
- Sparsity p = 90 (the paper's default for CIFAR-10/100; it uses 70 for ImageNet),
  fixed, never tuned on unknowns: the top 10% of the K·D contributions are kept, taken
  over the whole matrix V (not per class). Recorded in ``params["sparsity"]``, with the
  number of kept weights (``params["kept_weights"]``).
- Fitted: h̄ (over all known training samples) and the mask M, from the head of the
  training outputs; scoring reads the same head's weight and bias.
- Score: the energy (T = 1), as in the paper.

Differences from the reference implementations, deliberate: the authors' code, OpenOOD
v1.5 and pytorch-ood 0.4 keep the entries of V strictly above ``percentile(V, p)``
(linear interpolation); here M is an exact top-m with m = K·D − round(K·D·p/100), the
same rounding as ASH and SCALE. The kept counts agree or, for some K·D, differ by one
weight, and tied contributions at the cut are all dropped there but split by index
here. pytorch-ood also computes V in float32; here float64.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.detectors.shaping import ENERGY, ShapedEnergy, check_percent, kept_count, linear_head, penultimate, top_mask
from gradosr.errors import DataError


@register
class Dice(ShapedEnergy):
    method_id = "dice"
    paper = "Sun & Li, ECCV 2022"
    needs_fit = True
    _state_tensors = ("mean_", "mask_")

    def __init__(self, sparsity: float = 90.0) -> None:
        """``sparsity``: p, the percentage of the head's weights zeroed (the paper's 90)."""
        self.sparsity = sparsity
        self.params = {"layer": "penultimate (head weights)", "sparsity": check_percent(sparsity, "sparsity"),
                       "contribution": "W * mean of the known training activations",
                       "kept": "top K*D - round(K*D*p/100) contributions of the whole matrix", "score": ENERGY}

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """h̄ and the mask of the largest contributions W ⊙ h̄."""
        h = penultimate(inputs, "dice")
        if len(h) == 0:
            raise DataError("dice: fit needs at least one training sample")
        w, _ = linear_head(inputs, "dice", h.shape[1])
        self.mean_ = h.mean(dim=0).numpy()
        contribution = (w * torch.as_tensor(self.mean_)).reshape(1, -1)
        self.mask_ = top_mask(contribution, kept_count(contribution.shape[1], self.params["sparsity"])) \
            .reshape(w.shape).numpy()
        self._restored()

    def _restored(self) -> None:
        self.mean_ = np.asarray(self.mean_, dtype=np.float64)
        self.mask_ = np.asarray(self.mask_, dtype=bool)
        self.params = {**self.params, "kept_weights": int(self.mask_.sum())}

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """W ⊙ M."""
        if tuple(w.shape) != self.mask_.shape:
            raise DataError(f"dice: head weight {tuple(w.shape)} does not match the fitted {self.mask_.shape}")
        return w * torch.as_tensor(self.mask_)
