"""Fast per-sample squared gradient norms from ONE batched forward and backward.

In eval mode (BatchNorm on running statistics, Dropout off) the samples of a batch are
independent, so a single backward pass of the *sum* of the per-sample losses gives, at
the output of every layer, each sample's own back-propagated gradient ``g``. Together with
the layer's input activations ``a`` (captured by a forward hook), the per-sample gradient
of the layer's parameters has a closed form; its squared norm is computed layer by layer,
without ever forming the per-sample gradients of the whole model. These are the rules of
Opacus (Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch",
2021; ``opacus.grad_sample``) and BackPACK (Dangel, Kunstner and Hennig, "BackPACK:
Packing more into Backprop", ICLR 2020; the ``BatchGrad`` / ``BatchL2Grad`` extensions),
and the Gram-matrix identity of Rochette, Manoel and Tramel, "Efficient Per-Example
Gradient Computations in Convolutional Neural Networks" (2019) and Li et al., "Large
Language Models Can Be Strong Differentially Private Learners" (ICLR 2022, "ghost
clipping").

Supported modules (exact forward of the ``torch.nn`` class): :class:`~torch.nn.Linear`,
:class:`~torch.nn.Conv1d`, :class:`~torch.nn.Conv2d` (any stride, padding, padding mode,
dilation, groups), BatchNorm 1d/2d/3d with running statistics, :class:`~torch.nn.LayerNorm`,
:class:`~torch.nn.GroupNorm` and :class:`~torch.nn.Embedding` (without ``max_norm`` or
``scale_grad_by_freq``). :func:`plan` sends every other selected parameter to the caller's
fallback, and :func:`run_chunk` reports, for the chunk it ran, the parameters whose rule
could not be trusted (module called more than once, a parameter also used outside its
module, an input modified in place after the call, a hook that did not fire): the caller
computes those with the general ``torch.func`` path. The result is exact either way.

Only valid when the model treats the samples of a batch independently in eval mode;
:func:`batch_coupled` detects the usual exception (BatchNorm without running statistics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight
from torch.nn.modules.batchnorm import _BatchNorm

#: elements of the largest temporary a rule builds at once (unfolded input, per-sample
#: gradients or Gram matrices); rules split the chunk into sub-batches below it.
FAST_BUDGET = 2**24
#: samples per grouped-convolution call of the conv rule (small: fastest on CPU)
CONV_SUB = 8

Rule = Callable[[nn.Module, Tensor, Tensor, tuple[str, ...]], dict[str, Tensor]]


def _sqsum(t: Tensor) -> Tensor:
    """Per-sample sum of squares of ``t`` (shape ``(n, ...)``) -> ``(n,)``."""
    return t.reshape(t.shape[0], -1).square().sum(dim=1)


def _sqsum_product(s: Tensor, t: Tensor) -> Tensor:
    """Per-sample ``sum(s * t)`` of two ``(n, ...)`` tensors -> ``(n,)``."""
    return (s * t).reshape(s.shape[0], -1).sum(dim=1)


def _sub_batches(n: int, per_sample: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most FAST_BUDGET elements of ``per_sample`` each."""
    step = max(1, FAST_BUDGET // max(per_sample, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


# ---- rules: (module, input a, output gradient g, wanted attributes) -> {attr: (B,)} ----


def linear_rule(m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]) -> dict[str, Tensor]:
    """``nn.Linear``, input ``(B, ..., D)``, output gradient ``(B, ..., O)``.

    Per sample the weight gradient is ``sum_t g_t a_t^T`` over the T leading positions
    (Opacus ``grad_sample/linear.py``; BackPACK ``BatchL2Grad`` for Linear):

    - T = 1 (a 2-D input): ``||g a^T||^2 = ||g||^2 ||a||^2``;
    - T > 1: the Gram identity ``||sum_t g_t a_t^T||^2 = sum_{t,t'} (a_t.a_t')(g_t.g_t')``
      when ``T (D + O) < D O``, else the explicit ``(O, D)`` gradient ``g^T a``.

    Bias: ``||sum_t g_t||^2``.
    """
    b = a.shape[0]
    a3 = a.reshape(b, -1, a.shape[-1])
    g3 = g.reshape(b, -1, g.shape[-1])
    t, d, o = a3.shape[1], a3.shape[2], g3.shape[2]
    out: dict[str, Tensor] = {}
    if "weight" in want:
        if t == 1:
            out["weight"] = _sqsum(g3) * _sqsum(a3)
        else:
            gram = t * (d + o) < d * o
            parts = []
            for s in _sub_batches(b, 2 * t * t if gram else o * d):
                aa, gg = a3[s], g3[s]
                if gram:
                    parts.append(_sqsum_product(aa @ aa.transpose(1, 2), gg @ gg.transpose(1, 2)))
                else:
                    parts.append(_sqsum(gg.transpose(1, 2) @ aa))
            out["weight"] = torch.cat(parts)
    if "bias" in want:
        out["bias"] = _sqsum(g3.sum(dim=1))
    return out


def _conv_geometry(m: nn.Module, a: Tensor) -> tuple[Tensor, tuple[int, int], tuple[int, int],
                                                     tuple[int, int], tuple[int, int]]:
    """The conv input as 4-D and padded, and 2-D kernel, dilation, padding and stride."""
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
    return a, kernel, dilation, padding, stride  # type: ignore[return-value]


#: below this many weight columns per group (C_in / groups x kernel size), the conv rule
#: unfolds the input and multiplies (the grouped convolution is slow for thin inputs)
CONV_UNFOLD_MAX_K = 64


def _conv_branch(n_pos: int, kg: int, og: int) -> str:
    """How :func:`conv_rule` computes the weight's squared norm: ``"gram"`` when the Gram
    identity (``L^2 (K_g + O_g)`` multiply-adds per group) is cheaper than the per-sample
    gradient (``K_g O_g L``), else ``"unfold"`` for thin inputs, else ``"grouped"``."""
    if n_pos * (kg + og) < kg * og:
        return "gram"
    return "unfold" if kg <= CONV_UNFOLD_MAX_K else "grouped"


def conv_rule(m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]) -> dict[str, Tensor]:
    """``nn.Conv1d`` / ``nn.Conv2d`` with any stride, padding, dilation and groups.

    The per-sample weight gradient of group j is ``G_j U_j^T`` with ``U`` the unfolded
    input ``(B, C_in k, L)`` (``F.unfold``, k the kernel size, L the output positions)
    and ``G`` the output gradient ``(B, C_out, L)`` (Opacus ``grad_sample/conv.py``;
    BackPACK's conv ``BatchGrad``). Three ways to its squared norm (:func:`_conv_branch`):

    - ``"gram"``, small feature maps (``L^2 (K_g + O_g) < K_g O_g L``): the Gram
      identity ``sum_j <U_j^T U_j, G_j^T G_j>`` on two ``L x L`` matrices per sample;
    - ``"unfold"``, thin inputs (``K_g <= CONV_UNFOLD_MAX_K``): ``G_j U_j^T`` by a
      batched matrix product;
    - ``"grouped"``, otherwise: the per-sample gradients of CONV_SUB samples at once as
      the weight gradient of ONE grouped convolution whose groups are (sample, group)
      pairs (``torch.nn.grad.conv2d_weight``; the "batch as groups" trick of Rochette,
      Manoel and Tramel 2019), which needs no unfolded copy.

    Bias: ``||sum_L G||^2``.
    """
    b, c_out = g.shape[0], g.shape[1]
    g3 = g.reshape(b, c_out, -1)
    out: dict[str, Tensor] = {}
    if "weight" in want:
        a4, kernel, dilation, padding, stride = _conv_geometry(m, a)
        groups, c_in = m.groups, a4.shape[1]
        n_pos = g3.shape[2]
        kg, og = c_in // groups * kernel[0] * kernel[1], c_out // groups
        parts = []
        branch = _conv_branch(n_pos, kg, og)
        if branch in ("gram", "unfold"):
            extra = 2 * groups * n_pos * n_pos if branch == "gram" else c_out * kg
            for s in _sub_batches(b, c_in * kernel[0] * kernel[1] * n_pos + extra):
                u = F.unfold(a4[s], kernel, dilation=dilation, padding=padding, stride=stride)
                n = u.shape[0]
                u = u.view(n, groups, kg, n_pos)
                gg = g3[s].view(n, groups, og, n_pos)
                if branch == "gram":
                    parts.append(_sqsum_product(u.transpose(2, 3) @ u, gg.transpose(2, 3) @ gg))
                else:
                    parts.append(_sqsum(gg @ u.transpose(2, 3)))
        else:
            g4 = g if g.dim() == 4 else g.unsqueeze(2)  # Conv1d: (B, O, 1, L)
            step = max(1, min(CONV_SUB, FAST_BUDGET // max(c_out * kg, 1)))
            for i in range(0, b, step):
                aa, gg = a4[i : i + step], g4[i : i + step]
                n = aa.shape[0]
                w = conv2d_weight(aa.reshape(1, n * c_in, *aa.shape[2:]),
                                  (n * c_out, c_in // groups, *kernel),
                                  gg.reshape(1, n * c_out, *gg.shape[2:]),
                                  stride, padding, dilation, n * groups)
                parts.append(_sqsum(w.reshape(n, -1)))
        out["weight"] = torch.cat(parts)
    if "bias" in want:
        out["bias"] = _sqsum(g3.sum(dim=2))
    return out


def _affine_norm_rule(xhat: Tensor, g: Tensor, want: tuple[str, ...], channels: int | None
                      ) -> dict[str, Tensor]:
    """Per-channel affine map ``y = w xhat + b``: grads ``sum g xhat`` and ``sum g``.

    ``channels`` given: the affine dimension is dim 1 (BatchNorm, GroupNorm); ``None``:
    the trailing ``xhat.shape[1:]`` dims already flattened as the last dim (LayerNorm).
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
        out["weight"] = _sqsum(sum_gx())
    if "bias" in want:
        out["bias"] = _sqsum(sum_g())
    return out


def batchnorm_rule(m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                   ) -> dict[str, Tensor]:
    """BatchNorm in eval mode: a per-channel affine map of the fixed normalisation
    ``xhat = (a - running_mean) / sqrt(running_var + eps)``, hence the same rule as
    Opacus's GroupNorm/LayerNorm samplers (``grad_sample/group_norm.py``) with the
    running statistics (Opacus itself has no BatchNorm rule: in training mode BatchNorm
    mixes the samples). Weight: ``||sum_spatial g xhat||^2``; bias:
    ``||sum_spatial g||^2``.
    """
    xhat = F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return _affine_norm_rule(xhat, g, want, a.shape[1])


def layernorm_rule(m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                   ) -> dict[str, Tensor]:
    """``nn.LayerNorm``: ``xhat`` normalised per position over ``normalized_shape``;
    weight ``||sum_{leading dims} g xhat||^2``, bias ``||sum_{leading dims} g||^2``
    (Opacus ``grad_sample/layer_norm.py``; BackPACK LayerNorm ``BatchGrad``)."""
    xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
    n = 1
    for s in m.normalized_shape:
        n *= s
    return _affine_norm_rule(xhat.reshape(a.shape[0], -1, n), g, want, None)


def groupnorm_rule(m: nn.Module, a: Tensor, g: Tensor, want: tuple[str, ...]
                   ) -> dict[str, Tensor]:
    """``nn.GroupNorm``: ``xhat`` normalised per sample and group; per-channel affine
    weight ``||sum_spatial g xhat||^2``, bias ``||sum_spatial g||^2`` (Opacus
    ``grad_sample/group_norm.py``)."""
    xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
    return _affine_norm_rule(xhat, g, want, a.shape[1])


def embedding_rule(m: nn.Module, idx: Tensor, g: Tensor, want: tuple[str, ...]
                   ) -> dict[str, Tensor]:
    """``nn.Embedding``: the per-sample weight gradient scatter-adds ``g_t`` into row
    ``idx_t`` (rows at ``padding_idx`` get none), so its squared norm is
    ``sum_rows ||sum_{t: idx_t = row} g_t||^2`` (Opacus ``grad_sample/embedding.py``).
    Computed with one scatter over the distinct (sample, row) pairs.
    """
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
    return {"weight": g2.new_zeros(b).index_add_(0, torch.div(uniq, v, rounding_mode="floor"),
                                                 per_row)}


def _rule_and_attrs(m: nn.Module) -> tuple[Rule, tuple[str, ...]] | None:
    """The rule of ``m`` and the parameter attributes it handles, or None if unsupported.

    Subclasses are accepted only if they keep the ``torch.nn`` forward.
    """
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return linear_rule, ("weight", "bias")
    for cls in (nn.Conv1d, nn.Conv2d):
        if (isinstance(m, cls) and type(m).forward is cls.forward
                and type(m)._conv_forward is cls._conv_forward):
            return conv_rule, ("weight", "bias")
    if (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
            and type(m).forward is _BatchNorm.forward
            and m.track_running_stats and m.running_mean is not None):
        return batchnorm_rule, ("weight", "bias")
    if isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward:
        return layernorm_rule, ("weight", "bias")
    if isinstance(m, nn.GroupNorm) and type(m).forward is nn.GroupNorm.forward:
        return groupnorm_rule, ("weight", "bias")
    if (isinstance(m, nn.Embedding) and type(m).forward is nn.Embedding.forward
            and m.max_norm is None and not m.scale_grad_by_freq):
        return embedding_rule, ("weight",)
    return None


def batch_coupled(model: nn.Module) -> bool:
    """True if some module mixes the samples of a batch in eval mode (BatchNorm without
    running statistics), where one batched backward does not give per-sample gradients."""
    return any(isinstance(m, _BatchNorm) and (not m.track_running_stats or m.running_mean is None)
               for m in model.modules())


@dataclass(frozen=True)
class Plan:
    """Which selected parameters the fast rules handle.

    ``fast`` maps a parameter name to ``(module, attribute)``; ``rest`` lists the other
    selected names (for the fallback), in selection order.
    """

    fast: dict[str, tuple[nn.Module, str]]
    rest: list[str]


def plan(model: nn.Module, names: list[str]) -> Plan:
    """Split the selected ``names`` into those with a fast rule and the rest.

    A parameter is fast if its owner module (the prefix of its name) is supported and the
    same ``nn.Parameter`` is registered nowhere else (tied weights go to the fallback).
    """
    holders: Counter[int] = Counter()
    for mod in model.modules():  # each module object once
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] += 1
    named = dict(model.named_parameters())
    fast: dict[str, tuple[nn.Module, str]] = {}
    rest: list[str] = []
    for name in names:
        prefix, _, attr = name.rpartition(".")
        mod = model.get_submodule(prefix)
        found = _rule_and_attrs(mod)
        if (found is not None and attr in found[1] and getattr(mod, attr, None) is named[name]
                and holders[id(named[name])] == 1):
            fast[name] = (mod, attr)
        else:
            rest.append(name)
    return Plan(fast, rest)


@dataclass
class _Record:
    module: nn.Module
    rule: Rule
    want: tuple[str, ...]
    calls: int = 0
    a: Tensor | None = None
    a_version: int = 0
    a_requires_grad: bool = False
    out: Tensor | None = None
    out_version: int = 0
    result: dict[str, Tensor] | None = None
    broken: bool = False


def _forward_hook(rec: _Record, module: nn.Module, inputs: tuple, out: object) -> None:
    rec.calls += 1
    if (rec.calls > 1 or not inputs or not isinstance(inputs[0], Tensor)
            or not isinstance(out, Tensor) or not out.requires_grad):
        rec.broken, rec.a, rec.out = True, None, None
        return
    a = inputs[0]
    rec.a, rec.a_version, rec.a_requires_grad = a.detach(), a._version, a.requires_grad
    if not a.requires_grad:  # nothing upstream: its output is requested explicitly
        rec.out, rec.out_version = out, out._version
    out.register_hook(lambda g: _grad_hook(rec, g))


def _grad_hook(rec: _Record, g: Tensor) -> None:
    if rec.result is not None or rec.broken or rec.a is None:
        return
    a, rec.a = rec.a, None
    if a._version != rec.a_version:  # the input was modified in place after the call
        rec.broken = True
        return
    with torch.no_grad():
        rec.result = rec.rule(rec.module, a, g, rec.want)


def _param_edges(root: Tensor) -> Counter[int]:
    """Number of graph edges into each leaf's gradient accumulator, keyed by ``id(leaf)``
    (one per differentiable use of a parameter in the forward)."""
    counts: Counter[int] = Counter()
    if root.grad_fn is None:
        return counts
    stack, seen = [root.grad_fn], {root.grad_fn}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                counts[id(var)] += 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return counts


def run_chunk(
    model: nn.Module,
    the_plan: Plan,
    x: Tensor,
    loss_of_output: Callable[[object], Tensor],
) -> tuple[dict[str, Tensor], list[str]]:
    """One batched forward and backward of ``loss_of_output(model(x)).sum()``.

    The model must be in eval mode and every parameter of ``the_plan.fast`` must require
    grad (the caller sets and restores the flags). Parameters' ``.grad`` is not touched.

    Returns:
        ``(columns, failed)``: the ``(B,)`` squared norms of the fast parameters whose rule
        applied, and the fast parameter names (selection order) it did not apply to.
    """
    records: dict[int, _Record] = {}
    for name, (mod, attr) in the_plan.fast.items():
        rec = records.get(id(mod))
        if rec is None:
            found = _rule_and_attrs(mod)
            assert found is not None
            rec = records[id(mod)] = _Record(mod, found[0], ())
        rec.want = rec.want + (attr,)
    handles = []
    try:
        for rec in records.values():
            handles.append(rec.module.register_forward_hook(
                lambda m, i, o, rec=rec: _forward_hook(rec, m, i, o)))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            total = loss_of_output(model(leaf.clone())).sum()
        for h in handles:
            h.remove()
        handles = []
        edges = _param_edges(total)
        requests: list[Tensor] = [leaf]
        for rec in records.values():
            if rec.calls == 1 and not rec.broken and not rec.a_requires_grad:
                if rec.out is not None and rec.out._version == rec.out_version:
                    requests.append(rec.out)
                else:  # output changed in place: reach the node through its parameters
                    requests.extend(getattr(rec.module, a) for a in rec.want)
            rec.out = None
        if total.requires_grad:
            torch.autograd.grad(total, requests, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    columns: dict[str, Tensor] = {}
    failed: list[str] = []
    for name, (mod, attr) in the_plan.fast.items():
        rec = records[id(mod)]
        uses = edges[id(getattr(mod, attr))]
        if rec.calls == 0 and uses == 0:  # not used by this forward: zero gradient
            columns[name] = x.new_zeros(x.shape[0])
        elif rec.calls == 1 and uses == 1 and rec.result is not None:
            columns[name] = rec.result[attr]
        else:
            failed.append(name)
    return columns, failed
