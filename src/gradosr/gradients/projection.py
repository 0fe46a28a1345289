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

How the factors are obtained: the model runs in eval mode (samples independent) and
:func:`gradosr.gradients.capture.run` captures every layer's input and output gradient in
ONE batched forward and backward of the sum of the per-sample losses; each layer's
registered rule (:mod:`gradosr.gradients.rules`, reduction ``"projection"``: the
per-sample gradient rules of Opacus, Yousefpour et al. 2021, and BackPACK, Dangel,
Kunstner and Hennig, ICLR 2020) turns them into the projected gradient. Every layer whose
rule has the ``"projection"`` reduction is included (today Linear, Conv1d and Conv2d).

Refused (ConfigError): a model that mixes the samples of a batch in eval mode
(:func:`gradosr.gradients.capture.batch_coupled`), a layer called more than once in a forward,
a weight registered in several modules or used outside its module's forward, a subclass of
a supported layer with its own forward. A layer that the forward does not use (or whose
output does not reach the loss) contributes zeros.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from gradosr.distributed import map_rows
from gradosr.errors import ConfigError, DataError
from gradosr.gradients import capture, rules
from gradosr.gradients.targets import check_n_ones, check_target, per_sample_loss
from gradosr.models import eval_mode

__all__ = ["projected_gradients", "projection_matrices", "projection_size", "layer_widths"]


def _check_pos_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, rules.LayerRule]]:
    """The layers whose rule has the projection reduction, ``(name, module, rule)`` in
    ``named_modules()`` order.

    Raises:
        ConfigError: a subclass overriding the torch forward, a configuration the rule
            does not support, no weight tensor, or a weight registered in several modules.
    """
    shared = capture.shared_parameters(model)
    found = []
    for name, m in model.named_modules():
        hit = rules.match(m)
        if hit is None or not hit.rule.has(rules.PROJECTION):
            continue
        label = name or "<root>"
        if hit.overridden is not None:
            raise ConfigError(f"layer {label} ({type(m).__name__}) overrides the forward of "
                              f"nn.{hit.cls.__name__}: its per-sample gradient rule is unknown")
        if not hit.rule.supports(m):
            raise ConfigError(f"layer {label} ({type(m).__name__}): this configuration has no "
                              "per-sample gradient rule")
        if not isinstance(m.weight, Tensor):
            raise ConfigError(f"layer {label} has no weight tensor")
        if id(m.weight) in shared:
            raise ConfigError(f"the weight of layer {label} is shared with another module; "
                              "projected gradients need every weight used by one layer")
        found.append((name, m, hit.rule))
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
    return [(name, _side(m.weight.shape[0], dim) * _side(m.weight[0].numel(), dim))
            for name, m, _ in _layers(model)]


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
    for name, m, _ in _layers(model):
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


def _capture_layers(model: nn.Module, mats: list[tuple[str, Tensor | None, Tensor | None]]
                    ) -> list[capture.Layer]:
    """One capture layer per projected layer (``mats`` of :func:`projection_matrices`),
    reducing to its ``(B, r_out * r_in)`` rows."""
    modules = {name: (m, rule) for name, m, rule in _layers(model)}
    layers = []
    for name, p_out, p_in in mats:
        m, rule = modules[name]
        project = rule.reduction(rules.PROJECTION, m)

        def reduce(a: Tensor, g: Tensor, m=m, project=project, p_out=p_out, p_in=p_in) -> Tensor:
            proj = project(m, a, g, p_out, p_in)
            return proj.reshape(proj.shape[0], -1)

        layers.append(capture.Layer(name, m, ("weight",), reduce, partial(rule.check_input, m)))
    return layers


def _refuse(layer: capture.Layer, reason: str) -> None:
    """The capture's ``on_failure``: stop the pass with a ConfigError."""
    need = ("its gradient rule needs that input" if reason == capture.INPUT_MODIFIED
            else "projected gradients need every layer called once per forward, on a batch")
    raise ConfigError(f"layer {layer.label} {reason}: {need}")


def _batch(model: nn.Module, layers: list[capture.Layer], widths: list[int], x: Tensor,
           loss) -> Tensor:
    """One forward and ONE backward: ``(B, P)`` for a batch already on the device."""

    def loss_of_output(z: object) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
            desc = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise DataError(f"model output must be (B, N) logits with B={x.shape[0]}; got {desc}")
        return loss(z)

    uses = capture.run(model, layers, x, loss_of_output, request_all_outputs=True,
                       on_failure=_refuse)
    cols = []
    for layer, width in zip(layers, widths):
        found = capture.verdict(layer, layer.module.weight, uses)
        if found == capture.OK:
            cols.append(layer.result)
        elif found == capture.ZERO:  # not used, or its output does not reach the loss
            cols.append(x.new_zeros(x.shape[0], width))
        elif found == capture.USED_OUTSIDE:
            raise ConfigError(f"the weight of layer {layer.label} is also used outside its "
                              "forward; projected gradients need every weight used by one "
                              "layer call")
        elif found == capture.NOT_CAPTURED:
            raise ConfigError(f"the output gradient of layer {layer.label} could not be "
                              "captured (its weight is used outside its forward, or its input "
                              "depends on neither x nor the layers before it)")
        else:
            raise ConfigError(f"layer {layer.label} {found}")
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
    if capture.batch_coupled(model):
        raise ConfigError("projected gradients need samples that are independent in eval mode; "
                          "the model has BatchNorm without running statistics")
    mats = projection_matrices(model, dim, seed)
    if not mats:
        raise ConfigError("the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer: "
                          "the projected gradients would be empty")
    widths = [width for _, width in layer_widths(model, dim)]
    p_total = sum(widths)
    if x.shape[0] == 0:
        return torch.zeros(0, p_total, dtype=torch.float64)
    ref = next(model.parameters())

    def loss(z: Tensor) -> Tensor:
        return per_sample_loss(z, target=target, n_ones=n_ones, output=output)

    def local(xs: Tensor) -> Tensor:
        if xs.shape[0] == 0:
            return torch.zeros(0, p_total, dtype=torch.float64)
        layers = _capture_layers(model, mats)
        parts = []
        with capture.requiring_grad(layer.module.weight for layer in layers), eval_mode(model):
            for start in range(0, xs.shape[0], batch_size):
                xb = xs[start:start + batch_size].to(device=ref.device, dtype=ref.dtype)
                parts.append(_batch(model, layers, widths, xb, loss).to("cpu", torch.float64))
        return torch.cat(parts)

    return map_rows(local, x, align=batch_size)
