"""Rule of :class:`torch.nn.Embedding` (without ``max_norm`` or ``scale_grad_by_freq``):
input ``idx`` integer ``(B, ...)``, output gradient ``g`` ``(B, ..., D)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradosr.gradients.rules.registry import LayerRule, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """``nn.Embedding`` (weight only; no projection reduction)."""

    params = ("weight",)

    def supports(self, m: nn.Module) -> bool:
        return m.max_norm is None and not m.scale_grad_by_freq

    def sqnorms(self, m: nn.Module, idx: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """The per-sample weight gradient scatter-adds ``g_t`` into row ``idx_t`` (rows at
        ``padding_idx`` get none), so its squared norm is ``sum_rows ||sum_{t: idx_t = row}
        g_t||^2`` (Opacus ``grad_sample/embedding.py``), ``{"weight": (B,)}``; one scatter
        over the distinct (sample, row) pairs."""
        b, v = idx.shape[0], m.num_embeddings
        d = g.shape[-1]
        idx2 = idx.reshape(b, -1)
        g2 = g.reshape(b, -1, d)
        if m.padding_idx is not None:
            g2 = g2 * (idx2 != m.padding_idx).unsqueeze(-1).to(g2.dtype)
        keys = idx2 + torch.arange(b, device=idx2.device).unsqueeze(1) * v
        uniq, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
        rows = g2.new_zeros(uniq.shape[0], d).index_add_(0, inverse, g2.reshape(-1, d))
        per_row = torch.einsum("rd,rd->r", rows, rows)
        return {"weight": g2.new_zeros(b).index_add_(
            0, torch.div(uniq, v, rounding_mode="floor"), per_row)}
