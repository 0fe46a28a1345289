"""Rule of :class:`torch.nn.Linear`: input ``a`` ``(B, ..., I)``, output gradient ``g``
``(B, ..., O)``; per sample the weight gradient is ``sum_t g_t a_t^T`` over the T leading
positions (one for a 2-D input). Opacus ``grad_sample/linear.py``; BackPACK (Dangel,
Kunstner and Hennig, ICLR 2020) ``BatchGrad`` / ``BatchL2Grad`` for Linear."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradosr.gradients.rules.per_sample import sqsum, sqsum_product, sub_batches
from gradosr.gradients.rules.registry import LayerRule, register_rule


def _positions(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` as ``(B, T, I)`` and ``g`` as ``(B, T, O)``."""
    b = a.shape[0]
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """``nn.Linear`` (weight and bias)."""

    def sqnorms(self, m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """Per-sample squared norms ``{attr: (B,)}``:

        - weight, T = 1 (a 2-D input): ``||g a^T||^2 = ||g||^2 ||a||^2``;
        - weight, T > 1: the Gram identity ``||sum_t g_t a_t^T||^2 = sum_{t,t'}
          (a_t.a_t')(g_t.g_t')`` (Li et al., "Large Language Models Can Be Strong
          Differentially Private Learners", ICLR 2022, "ghost clipping") when
          ``T (I + O) < I O``, else the explicit ``(O, I)`` gradient ``g^T a``;
        - bias: ``||sum_t g_t||^2``.
        """
        a3, g3 = _positions(a, g)
        b, t, d, o = a3.shape[0], a3.shape[1], a3.shape[2], g3.shape[2]
        out: dict[str, Tensor] = {}
        if "weight" in want:
            if t == 1:
                out["weight"] = sqsum(g3) * sqsum(a3)
            else:
                gram = t * (d + o) < d * o
                parts = []
                for s in sub_batches(b, 2 * t * t if gram else o * d):
                    aa, gg = a3[s], g3[s]
                    if gram:
                        parts.append(sqsum_product(aa @ aa.transpose(1, 2), gg @ gg.transpose(1, 2)))
                    else:
                        parts.append(sqsum(gg.transpose(1, 2) @ aa))
                out["weight"] = torch.cat(parts)
        if "bias" in want:
            out["bias"] = sqsum(g3.sum(dim=1))
        return out

    def projection(self, m: nn.Module, a: Tensor, g: Tensor, p_out: Tensor | None,
                   p_in: Tensor | None) -> Tensor:
        """LoGra: ``sum_t (P_out^T g_t)(P_in^T a_t)^T`` -> ``(B, r_out, r_in)``."""
        a3, g3 = _positions(a, g)  # (B, T, I), (B, T, O)
        pa = a3 if p_in is None else a3 @ p_in
        pg = g3 if p_out is None else g3 @ p_out
        return pg.transpose(1, 2) @ pa
