"""Low-dimensional random projections of every sample's FULL weight gradient.

For a classifier and the per-sample loss J(x) of :func:`gradosr.gradients.targets.per_sample_loss`,
this computes, for every sample, a random projection of the gradient of J with respect to
the weights of all the model's :class:`~torch.nn.Linear`, :class:`~torch.nn.Conv1d` and
:class:`~torch.nn.Conv2d` layers, with the Kronecker-factored projection of LoGra (Choe et
al., "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence Functions",
2024), a structured form of the random projection of per-sample gradients of TRAK (Park et
al., "TRAK: Attributing Model Behavior at Scale", ICML 2023).

A layer's per-sample weight gradient, as an ``O x I`` matrix (``O`` output features or
channels; ``I`` input features, or ``C_in/groups * kernel size`` for a convolution), is::

    dJ/dW = G U^T = sum_p g_p u_p^T

over the positions p (one for a 2-D Linear input; the leading positions of a 3-D+ Linear
input; the output positions of a convolution), with ``g_p`` (``O``) the gradient at the
layer's output and ``u_p`` (``I``) its input (for a convolution the unfolded input patch,
``F.unfold``). With Gaussian matrices ``P_out`` (``O x r_out``) and ``P_in`` (``I x r_in``)
of i.i.d. ``N(0, 1/dim)`` entries, the projected gradient is::

    P_out^T (dJ/dW) P_in = (P_out^T G) (P_in^T U)^T        (r_out x r_in)

computed from the two projected factors, never forming the ``O x I`` per-sample gradient.
A side whose size is ``<= dim`` is not projected (identity, ``r_side`` = its size); else
``r_side = dim``. Since ``E[P P^T] = Id``, squared norms and inner products of gradients
are preserved in expectation, and by the Johnson-Lindenstrauss lemma the cosine similarity
of two samples' projected gradients approximates that of their full gradients, which is
what the ``plus`` preset's kNN uses. A grouped convolution's gradient is block-stacked by
group (rows of group j: ``G_j U_j^T``), and projected as that ``O x I`` matrix.

The output row of a sample is the concatenation, over the layers in ``named_modules()``
order, of the row-major flattened ``r_out x r_in`` matrices; ``P`` = sum of
``r_out * r_in`` (:func:`projection_size`). Biases, normalisation parameters and the
parameters of other layer types are NOT included. The projection matrices are drawn from a
CPU ``torch.Generator`` seeded with ``seed``, layer by layer in module order (``P_out``
then ``P_in``, only for projected sides), in float64, then cast to the weight's device and
dtype: the same seed gives the same matrices (:func:`projection_matrices`).

How the factors are obtained: the per-sample gradient rules of Opacus (Yousefpour et al.,
2021, ``opacus.grad_sample``) and BackPACK (Dangel, Kunstner and Hennig, ICLR 2020), as in
:mod:`gradosr.gradients.fast`. The model runs in eval mode (samples independent); forward
hooks capture every layer's input, tensor hooks on the layers' outputs capture the output
gradients during ONE batched backward of the sum of the per-sample losses, requested with
``torch.autograd.grad`` w.r.t. a leaf copy of the input (parameters' ``.grad`` is never
touched). A tensor hook registered before an in-place operation on the output (e.g.
``ReLU(inplace=True)`` after a Linear) receives the gradient w.r.t. the pre-modification
value, i.e. the layer's own output gradient, as needed.

Refused (ConfigError): a model that mixes the samples of a batch in eval mode
(:func:`gradosr.gradients.fast.batch_coupled`), a layer called more than once in a forward,
a weight registered in several modules or used outside its module's forward, a subclass of
a supported layer with its own forward. A layer that the forward does not use (or whose
output does not reach the loss) contributes zeros.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradosr.distributed import map_rows
from gradosr.errors import ConfigError, DataError
from gradosr.gradients import fast
from gradosr.gradients.targets import check_n_ones, check_target, per_sample_loss
from gradosr.models import eval_mode

__all__ = ["projected_gradients", "projection_matrices", "projection_size", "layer_widths"]

_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _check_pos_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The supported layers ``(name, module)`` in ``named_modules()`` order.

    Raises:
        ConfigError: a subclass overriding the torch forward, a grouped convolution
            whose channels do not split, or a weight registered in several modules.
    """
    holders: Counter[int] = Counter()
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] += 1
    found = []
    for name, m in model.named_modules():
        cls = next((c for c in _CLASSES if isinstance(m, c)), None)
        if cls is None:
            continue
        label = name or "<root>"
        if type(m).forward is not cls.forward or (
                cls is not nn.Linear and type(m)._conv_forward is not cls._conv_forward):
            raise ConfigError(f"layer {label} ({type(m).__name__}) overrides the forward of "
                              f"nn.{cls.__name__}: its per-sample gradient rule is unknown")
        if not isinstance(m.weight, Tensor):
            raise ConfigError(f"layer {label} has no weight tensor")
        if holders[id(m.weight)] > 1:
            raise ConfigError(f"the weight of layer {label} is shared with another module; "
                              "projected gradients need every weight used by one layer")
        found.append((name, m))
    return found


def _side(size: int, dim: int) -> int:
    return size if size <= dim else dim


def projection_size(model: nn.Module, dim: int) -> int:
    """P, the number of columns of :func:`projected_gradients` for ``model`` and ``dim``."""
    return sum(width for _, width in layer_widths(model, dim))


def layer_widths(model: nn.Module, dim: int) -> list[tuple[str, int]]:
    """``(layer name, r_out * r_in)`` of every layer, in the column order of
    :func:`projected_gradients`."""
    dim = _check_pos_int(dim, "dim")
    return [(name, _side(m.weight.shape[0], dim) * _side(m.weight[0].numel(), dim)) for name, m in _layers(model)]


def projection_matrices(model: nn.Module, dim: int, seed: int = 0
                        ) -> list[tuple[str, Tensor | None, Tensor | None]]:
    """``(layer name, P_out, P_in)`` for every layer, in module order.

    ``P_out`` is ``O x dim`` and ``P_in`` is ``I x dim`` with i.i.d. ``N(0, 1/dim)`` entries
    (on the weight's device and dtype), or ``None`` where that side (size ``<= dim``) is
    not projected. Deterministic in ``seed``.
    """
    dim = _check_pos_int(dim, "dim")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(dim)
    out = []
    for name, m in _layers(model):
        w = m.weight
        mats: list[Tensor | None] = []
        for size in (w.shape[0], w[0].numel()):
            if size <= dim:
                mats.append(None)
            else:
                p = torch.randn(size, dim, generator=gen, dtype=torch.float64) * scale
                mats.append(p.to(device=w.device, dtype=w.dtype))
        out.append((name, mats[0], mats[1]))
    return out


# ---- per-layer rules: (module, input a, output gradient g, P_out, P_in) -> (B, r_out, r_in) ----


def _linear_proj(m: nn.Module, a: Tensor, g: Tensor, p_out: Tensor | None, p_in: Tensor | None
                 ) -> Tensor:
    """``sum_t (P_out^T g_t)(P_in^T a_t)^T`` over the leading positions t of a Linear."""
    b = a.shape[0]
    a3 = a.reshape(b, -1, a.shape[-1])  # (B, T, I)
    g3 = g.reshape(b, -1, g.shape[-1])  # (B, T, O)
    pa = a3 if p_in is None else a3 @ p_in
    pg = g3 if p_out is None else g3 @ p_out
    return pg.transpose(1, 2) @ pa


def _conv_proj(m: nn.Module, a: Tensor, g: Tensor, p_out: Tensor | None, p_in: Tensor | None
               ) -> Tensor:
    """``(P_out^T G)(P_in^T U)^T`` with U the unfolded input ``(B, I, L)`` per group."""
    a4, kernel, dilation, padding, stride = fast._conv_geometry(m, a)
    b, c_out, groups = g.shape[0], g.shape[1], m.groups
    g3 = g.reshape(b, c_out, -1)
    n_pos = g3.shape[2]
    og = c_out // groups
    kg = a4.shape[1] // groups * kernel[0] * kernel[1]
    parts = []
    for s in fast._sub_batches(b, groups * kg * n_pos):
        u = F.unfold(a4[s], kernel, dilation=dilation, padding=padding, stride=stride)
        n = u.shape[0]
        u = u.view(n, groups, kg, n_pos)
        pu = u if p_in is None else p_in.T @ u  # (n, groups, r_in, L)
        gg = g3[s].view(n, groups, og, n_pos)
        if p_out is None:  # rows of group j are G_j (P_in^T U_j)^T: stacked
            parts.append((gg @ pu.transpose(2, 3)).reshape(n, c_out, -1))
        else:  # P_out^T dW = sum_j P_out[rows of j]^T G_j U_j^T
            pg = p_out.view(groups, og, -1).transpose(1, 2) @ gg  # (n, groups, r_out, L)
            parts.append((pg @ pu.transpose(2, 3)).sum(dim=1))
    return torch.cat(parts)


@dataclass
class _Record:
    name: str
    module: nn.Module
    p_out: Tensor | None
    p_in: Tensor | None
    calls: int = 0
    a: Tensor | None = None
    a_version: int = 0
    a_requires_grad: bool = False
    out: Tensor | None = None
    out_version: int = 0
    result: Tensor | None = None
    error: str | None = None


def _forward_hook(rec: _Record, module: nn.Module, inputs: tuple, out: object) -> None:
    rec.calls += 1
    error = None
    if rec.calls > 1:
        error = "is called more than once in a forward"
    elif not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
        error = "has a non-tensor input or output"
    elif ((isinstance(module, nn.Conv2d) and inputs[0].dim() != 4)
          or (isinstance(module, nn.Conv1d) and inputs[0].dim() != 3)):
        error = "receives an unbatched input"
    if error is not None:  # stops the forward here (the hooks are removed by the caller)
        raise ConfigError(f"layer {rec.name or '<root>'} {error}: projected gradients need "
                          "every layer called once per forward, on a batch")
    a = inputs[0]
    rec.a, rec.a_version, rec.a_requires_grad = a.detach(), a._version, a.requires_grad
    rec.out, rec.out_version = out, out._version
    if out.requires_grad:
        out.register_hook(lambda g: _grad_hook(rec, g))


def _grad_hook(rec: _Record, g: Tensor) -> None:
    if rec.result is not None or rec.error is not None or rec.a is None:
        return
    a, rec.a = rec.a, None
    if a._version != rec.a_version:
        rec.error = "has its input modified in place after the call"
        return
    rule = _linear_proj if isinstance(rec.module, nn.Linear) else _conv_proj
    with torch.no_grad():
        proj = rule(rec.module, a, g, rec.p_out, rec.p_in)
    rec.result = proj.reshape(proj.shape[0], -1)


def _batch(model: nn.Module, records: list[_Record], x: Tensor, loss) -> Tensor:
    """One forward and ONE backward: ``(B, P)`` for a batch already on the device."""
    for rec in records:
        rec.calls, rec.a, rec.out, rec.result, rec.error = 0, None, None, None, None
    handles = []
    try:
        for rec in records:
            handles.append(rec.module.register_forward_hook(
                lambda m, i, o, rec=rec: _forward_hook(rec, m, i, o)))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            z = model(leaf.clone())
        for h in handles:
            h.remove()
        handles = []
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
            desc = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise DataError(f"model output must be (B, N) logits with B={x.shape[0]}; got {desc}")
        for rec in records:
            if rec.a is not None and rec.a._version != rec.a_version:
                raise ConfigError(f"layer {rec.name or '<root>'} has its input modified in "
                                  "place after the call: its gradient rule needs that input")
        with torch.enable_grad():
            total = loss(z).sum()
        edges = fast._param_edges(total)
        requests: list[Tensor] = [leaf]
        for rec in records:
            # outputs are requested too, so that their tensor hooks fire even where the
            # gradient does not flow on to the input leaf (an input independent of x); an
            # output modified in place since is reached through its weight instead, when
            # its input does not require grad
            if rec.calls == 1 and rec.out is not None:
                if rec.out._version == rec.out_version:
                    requests.append(rec.out)
                elif not rec.a_requires_grad:
                    requests.append(rec.module.weight)
            rec.out = None
        if total.requires_grad:
            torch.autograd.grad(total, requests, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    cols = []
    for rec in records:
        label = rec.name or "<root>"
        uses = edges[id(rec.module.weight)]
        size = (rec.p_out.shape[1] if rec.p_out is not None else rec.module.weight.shape[0]) * (
            rec.p_in.shape[1] if rec.p_in is not None else rec.module.weight[0].numel())
        if uses > 1 or (rec.calls == 0 and uses > 0):
            raise ConfigError(f"the weight of layer {label} is also used outside its forward; "
                              "projected gradients need every weight used by one layer call")
        if rec.error is not None:
            raise ConfigError(f"layer {label} {rec.error}")
        if uses == 0:  # not used, or its output does not reach the loss
            cols.append(x.new_zeros(x.shape[0], size))
        elif rec.result is None:
            raise ConfigError(f"the output gradient of layer {label} could not be captured "
                              "(its weight is used outside its forward, or its input depends on "
                              "neither x nor the layers before it)")
        else:
            cols.append(rec.result)
    rows = torch.cat(cols, dim=1) if cols else x.new_zeros(x.shape[0], 0)
    return rows.detach()


def projected_gradients(model: nn.Module, x: Tensor, dim: int = 16, target: str = "confounding",
                        n_ones: int | None = None, output: str = "softmax", seed: int = 0,
                        batch_size: int = 64) -> Tensor:
    """Every sample's LoGra projection of its full Linear/Conv weight gradient.

    Args:
        model: classifier mapping ``(B, ...)`` inputs to ``(B, N)`` logits. Run in eval
            mode; training flags, ``requires_grad`` and ``.grad`` are left as they were.
        x: inputs, floating point ``(B, ...)`` and finite; batches of ``batch_size`` rows
            are moved to the model's device and dtype one at a time.
        dim: projected size per side (``r_out``, ``r_in`` <= ``dim``).
        target, n_ones, output: the per-sample loss, see
            :func:`gradosr.gradients.targets.per_sample_loss`.
        seed: seed of the projection matrices (:func:`projection_matrices`).
        batch_size: samples per forward/backward; does not change the result (up to
            floating-point rounding). In a distributed run the rows are sharded at
            multiples of it (:func:`gradosr.distributed.map_rows`).

    Returns:
        float64 tensor ``(N, P)`` on the CPU, P = :func:`projection_size` (layers in
        ``named_modules()`` order, each the row-major ``r_out x r_in`` matrix).

    Raises:
        ConfigError: invalid ``dim``, ``seed``, ``batch_size``, target options; a model
            without supported layers, mixing samples in eval mode, or with a layer called
            twice or a shared weight (see the module docstring).
        DataError: ``x`` not floating point with a batch dim, or not finite; model output
            not ``(B, N)`` logits.
    """
    _check_pos_int(dim, "dim")
    batch_size = _check_pos_int(batch_size, "batch_size")
    check_target(target, output)
    check_n_ones(n_ones)
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise DataError(f"x must be a floating-point tensor of shape (B, ...), got {desc}")
    if not bool(torch.isfinite(x).all()):
        raise DataError("x contains NaN or Inf values")
    if fast.batch_coupled(model):
        raise ConfigError("projected gradients need samples that are independent in eval mode; "
                          "the model has BatchNorm without running statistics")
    mats = projection_matrices(model, dim, seed)
    if not mats:
        raise ConfigError("the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer: "
                          "the projected gradients would be empty")
    p_total = projection_size(model, dim)
    if x.shape[0] == 0:
        return torch.zeros(0, p_total, dtype=torch.float64)
    modules = dict(model.named_modules())
    ref = next(model.parameters())

    def loss(z: Tensor) -> Tensor:
        return per_sample_loss(z, target=target, n_ones=n_ones, output=output)

    def local(xs: Tensor) -> Tensor:
        if xs.shape[0] == 0:
            return torch.zeros(0, p_total, dtype=torch.float64)
        records = [_Record(name, modules[name], p_out, p_in) for name, p_out, p_in in mats]
        weights = [r.module.weight for r in records]
        flags = [w.requires_grad for w in weights]
        parts = []
        try:
            for w in weights:
                w.requires_grad_(True)
            with eval_mode(model):
                for start in range(0, xs.shape[0], batch_size):
                    xb = xs[start:start + batch_size].to(device=ref.device, dtype=ref.dtype)
                    parts.append(_batch(model, records, xb, loss).to("cpu", torch.float64))
        finally:
            for w, flag in zip(weights, flags):
                w.requires_grad_(flag)
        return torch.cat(parts)

    return map_rows(local, x, align=batch_size)
