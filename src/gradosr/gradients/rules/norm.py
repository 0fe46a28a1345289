"""Rules of the normalisation layers: BatchNorm 1d/2d/3d on running statistics,
:class:`torch.nn.LayerNorm` and :class:`torch.nn.GroupNorm`.

Each is a per-channel affine map ``y = w * xhat + b`` of a normalised input ``xhat``
(recomputed from the captured input ``a`` without the affine part), so the per-sample
gradients are ``sum g xhat`` (weight) and ``sum g`` (bias) over the positions sharing one
affine entry (Opacus ``grad_sample/group_norm.py`` and ``layer_norm.py``; BackPACK's
LayerNorm ``BatchGrad``). No projection reduction: the projected gradients cover only the
Linear/Conv weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradosr.gradients.rules.per_sample import sqsum
from gradosr.gradients.rules.registry import LayerRule, register_rule


def _affine_sqnorms(xhat: Tensor, g: Tensor, want: tuple[str, ...], channels: int | None
                    ) -> dict[str, Tensor]:
    """Squared norms ``{attr: (B,)}`` of the per-sample grads ``sum g xhat`` and ``sum g``.

    ``channels`` given: the affine dimension is dim 1 of ``xhat`` and ``g`` ``(B, C, ...)``
    (BatchNorm, GroupNorm); ``None``: ``xhat`` is ``(B, T, n)`` with the ``n`` affine
    entries last (LayerNorm).
    """
    b = g.shape[0]
    if channels is not None:
        g3, x3 = g.reshape(b, channels, -1), xhat.reshape(b, channels, -1)
        sum_gx = (lambda: torch.einsum("bcl,bcl->bc", g3, x3))
        sum_g = (lambda: g3.sum(dim=2))
    else:
        n = xhat.shape[-1]
        g3, x3 = g.reshape(b, -1, n), xhat.reshape(b, -1, n)
        sum_gx = (lambda: (g3 * x3).sum(dim=1))
        sum_g = (lambda: g3.sum(dim=1))
    out: dict[str, Tensor] = {}
    if "weight" in want:
        out["weight"] = sqsum(sum_gx())
    if "bias" in want:
        out["bias"] = sqsum(sum_g())
    return out


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(LayerRule):
    """BatchNorm in eval mode, input ``(B, C, *)``: ``xhat = (a - running_mean) /
    sqrt(running_var + eps)``, the Opacus GroupNorm rule with the running statistics
    (Opacus itself has no BatchNorm rule: in training mode BatchNorm mixes the samples)."""

    def supports(self, m: nn.Module) -> bool:
        return m.track_running_stats and m.running_mean is not None

    def sqnorms(self, m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """Weight ``||sum_spatial g xhat||^2``, bias ``||sum_spatial g||^2``, each ``(B,)``."""
        xhat = F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        return _affine_sqnorms(xhat, g, want, a.shape[1])


@register_rule(nn.LayerNorm)
class LayerNormRule(LayerRule):
    """``nn.LayerNorm``, input ``(B, ..., *normalized_shape)``: ``xhat`` normalised per
    position over ``normalized_shape``."""

    def sqnorms(self, m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """Weight ``||sum_{leading dims} g xhat||^2``, bias ``||sum_{leading dims} g||^2``."""
        xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
        n = math.prod(m.normalized_shape)
        return _affine_sqnorms(xhat.reshape(a.shape[0], -1, n), g, want, None)


@register_rule(nn.GroupNorm)
class GroupNormRule(LayerRule):
    """``nn.GroupNorm``, input ``(B, C, *)``: ``xhat`` normalised per sample and group,
    per-channel affine map (Opacus ``grad_sample/group_norm.py``)."""

    def sqnorms(self, m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """Weight ``||sum_spatial g xhat||^2``, bias ``||sum_spatial g||^2``, each ``(B,)``."""
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
        return _affine_sqnorms(xhat, g, want, a.shape[1])

