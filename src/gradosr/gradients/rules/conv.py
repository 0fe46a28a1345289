"""Rule of :class:`torch.nn.Conv1d` and :class:`torch.nn.Conv2d` (any stride, padding,
padding mode, dilation and groups): input ``a`` ``(B, C_in, *spatial)``, output gradient
``g`` ``(B, C_out, *out_spatial)``.

The per-sample weight gradient of group j is ``G_j U_j^T`` with ``U`` the unfolded input
``(B, C_in k, L)`` (``F.unfold``, k the kernel size, L the output positions) and ``G`` the
output gradient ``(B, C_out, L)`` (Opacus ``grad_sample/conv.py``; BackPACK's conv
``BatchGrad``). A Conv1d is handled as a Conv2d of height 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from gradosr.gradients.rules import per_sample
from gradosr.gradients.rules.per_sample import sqsum, sqsum_product
from gradosr.gradients.rules.registry import LayerRule, register_rule

#: samples per grouped-convolution call of the ``"grouped"`` branch (small: fastest on CPU)
CONV_SUB = 8
#: below this many weight columns per group (C_in / groups x kernel size), the squared
#: norms unfold the input and multiply (the grouped convolution is slow for thin inputs)
CONV_UNFOLD_MAX_K = 64


@dataclass(frozen=True)
class _Geometry:
    """A conv layer's captured tensors as 2-D convolution operands.

    ``a4`` the input as ``(B, C_in, H, W)``, already padded where the module pads itself
    (padding mode, ``padding="same"``); ``g3`` the output gradient ``(B, C_out, L)``;
    ``kg = C_in / groups * kernel size`` and ``og = C_out / groups`` per group.
    """

    a4: Tensor
    g3: Tensor
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    kg: int
    og: int

    @property
    def n_pos(self) -> int:
        return self.g3.shape[2]


def _geometry(m: nn.Module, a: Tensor, g: Tensor) -> _Geometry:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        # what the module itself does (same as nn.Conv*._conv_forward for a padding mode;
        # padding="same" is this zero padding, asymmetric for even kernels)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        a = F.pad(a, m._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(m.kernel_size)
    else:
        padding = tuple(m.padding)
    kernel, dilation, stride = tuple(m.kernel_size), tuple(m.dilation), tuple(m.stride)
    if a.dim() == 3:  # Conv1d: (B, C, L) -> (B, C, 1, L)
        a = a.unsqueeze(2)
        kernel, dilation = (1, kernel[0]), (1, dilation[0])
        padding, stride = (0, padding[0]), (1, stride[0])
    b, c_out, groups = g.shape[0], g.shape[1], m.groups
    return _Geometry(a, g.reshape(b, c_out, -1), kernel, dilation, padding, stride,  # type: ignore[arg-type]
                     groups, a.shape[1] // groups * kernel[0] * kernel[1], c_out // groups)


def _unfolded(geo: _Geometry, extra: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Per sub-batch of at most FAST_BUDGET elements (the unfolded input plus ``extra``
    per sample): ``U`` as ``(n, groups, kg, L)`` and ``G`` as ``(n, groups, og, L)``."""
    n_pos = geo.n_pos
    for s in per_sample.sub_batches(geo.g3.shape[0], geo.groups * geo.kg * n_pos + extra):
        u = F.unfold(geo.a4[s], geo.kernel, dilation=geo.dilation, padding=geo.padding,
                     stride=geo.stride)
        n = u.shape[0]
        yield (u.view(n, geo.groups, geo.kg, n_pos),
               geo.g3[s].view(n, geo.groups, geo.og, n_pos))


def _conv_branch(n_pos: int, kg: int, og: int) -> str:
    """How :meth:`ConvRule.sqnorms` computes the weight's squared norm: ``"gram"`` when the
    Gram identity (``L^2 (K_g + O_g)`` multiply-adds per group) is cheaper than the
    per-sample gradient (``K_g O_g L``), else ``"unfold"`` for thin inputs, else
    ``"grouped"``."""
    if n_pos * (kg + og) < kg * og:
        return "gram"
    return "unfold" if kg <= CONV_UNFOLD_MAX_K else "grouped"


def _grouped_sqnorms(geo: _Geometry, g: Tensor) -> list[Tensor]:
    """Squared norms of the per-sample weight gradients of CONV_SUB samples at once, as the
    weight gradient of ONE grouped convolution whose groups are (sample, group) pairs
    (``torch.nn.grad.conv2d_weight``; the "batch as groups" trick of Rochette, Manoel and
    Tramel, "Efficient Per-Example Gradient Computations in Convolutional Neural
    Networks", 2019), which needs no unfolded copy."""
    a4, b, c_in, c_out = geo.a4, g.shape[0], geo.a4.shape[1], g.shape[1]
    g4 = g if g.dim() == 4 else g.unsqueeze(2)  # Conv1d: (B, O, 1, L)
    step = max(1, min(CONV_SUB, per_sample.FAST_BUDGET // max(c_out * geo.kg, 1)))
    parts = []
    for i in range(0, b, step):
        aa, gg = a4[i : i + step], g4[i : i + step]
        n = aa.shape[0]
        w = conv2d_weight(aa.reshape(1, n * c_in, *aa.shape[2:]),
                          (n * c_out, c_in // geo.groups, *geo.kernel),
                          gg.reshape(1, n * c_out, *gg.shape[2:]),
                          geo.stride, geo.padding, geo.dilation, n * geo.groups)
        parts.append(sqsum(w.reshape(n, -1)))
    return parts


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (weight and bias); the module's own
    ``_conv_forward`` is assumed too."""

    exact = ("forward", "_conv_forward")

    def check_input(self, m: nn.Module, a: Tensor) -> str | None:
        return "receives an unbatched input" if a.dim() != len(m.kernel_size) + 2 else None

    def sqnorms(self, m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                ) -> dict[str, Tensor]:
        """Per-sample squared norms ``{attr: (B,)}``. Weight, three ways
        (:func:`_conv_branch`):

        - ``"gram"``, small feature maps (``L^2 (K_g + O_g) < K_g O_g L``): the Gram
          identity ``sum_j <U_j^T U_j, G_j^T G_j>`` on two ``L x L`` matrices per sample;
        - ``"unfold"``, thin inputs (``K_g <= CONV_UNFOLD_MAX_K``): ``G_j U_j^T`` by a
          batched matrix product;
        - ``"grouped"``, otherwise: :func:`_grouped_sqnorms`.

        Bias: ``||sum_L G||^2``.
        """
        out: dict[str, Tensor] = {}
        if "weight" in want:
            geo = _geometry(m, a, g)
            n_pos, groups = geo.n_pos, geo.groups
            branch = _conv_branch(n_pos, geo.kg, geo.og)
            if branch == "grouped":
                parts = _grouped_sqnorms(geo, g)
            elif branch == "gram":
                parts = [sqsum_product(u.transpose(2, 3) @ u, gg.transpose(2, 3) @ gg)
                         for u, gg in _unfolded(geo, 2 * groups * n_pos * n_pos)]
            else:
                parts = [sqsum(gg @ u.transpose(2, 3))
                         for u, gg in _unfolded(geo, g.shape[1] * geo.kg)]
            out["weight"] = torch.cat(parts)
        if "bias" in want:
            out["bias"] = sqsum(g.reshape(g.shape[0], g.shape[1], -1).sum(dim=2))
        return out

    def projection(self, m: nn.Module, a: Tensor, g: Tensor, p_out: Tensor | None,
                   p_in: Tensor | None) -> Tensor:
        """LoGra: ``(P_out^T G)(P_in^T U)^T`` -> ``(B, r_out, r_in)``, the gradient being
        block-stacked by group (rows of group j: ``G_j U_j^T``)."""
        geo = _geometry(m, a, g)
        parts = []
        for u, gg in _unfolded(geo):
            n = u.shape[0]
            pu = u if p_in is None else p_in.T @ u  # (n, groups, r_in, L)
            if p_out is None:  # rows of group j are G_j (P_in^T U_j)^T: stacked
                parts.append((gg @ pu.transpose(2, 3)).reshape(n, g.shape[1], -1))
            else:  # P_out^T dW = sum_j P_out[rows of j]^T G_j U_j^T
                pg = p_out.view(geo.groups, geo.og, -1).transpose(1, 2) @ gg  # (n, groups, r_out, L)
                parts.append((pg @ pu.transpose(2, 3)).sum(dim=1))
        return torch.cat(parts)
