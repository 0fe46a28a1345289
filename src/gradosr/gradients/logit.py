"""The gradient of a per-sample loss with respect to the logits.

For a classifier whose head is linear, z = W h + b, the gradient of a sample's loss J
with respect to the head's weight is exactly g hᵀ with g = dJ/dz (K) and h the head's
input (D): the head gradient is rank one, and g carries all of it that the features h
do not (Lee & AlRegib, ICIP 2021, use its norms; the ``plus`` preset's kNN in gradient
space uses the direction of g hᵀ).
"""

from __future__ import annotations

import torch

from gradosr.gradients.targets import per_sample_loss


def logit_gradient(logits: torch.Tensor, target: str = "confounding", n_ones: int | None = None,
                   output: str = "softmax") -> torch.Tensor:
    """g = dJ/dz (float64 N×K) of the per-sample loss J of ``target`` at logits N×K
    (:func:`gradosr.gradients.targets.per_sample_loss`)."""
    z = torch.as_tensor(logits).detach().to(torch.float64).requires_grad_(True)
    if len(z) == 0:
        return torch.zeros_like(z, requires_grad=False)
    (g,) = torch.autograd.grad(per_sample_loss(z, target=target, n_ones=n_ones, output=output).sum(), z)
    return g
