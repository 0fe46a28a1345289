"""Per-sample gradient engine: the gradient-based representation of Lee & AlRegib,
"Open-Set Recognition with Gradient-Based Representations" (ICIP 2021), Eq. 1.

For an input x and a per-sample loss J(x) (see :mod:`gradosr.gradients.targets`), the
representation is the squared L2 norm of the gradient of J for every selected
parameter tensor of the classifier::

    r(x) = [ ||grad_{theta_0} J(x)||^2, ..., ||grad_{theta_{P-1}} J(x)||^2 ]

Three ways to compute it, with the model in eval mode (BatchNorm on running statistics,
Dropout off), so that samples are independent:

- ``"fast"``: one batched forward and one batched backward of the summed per-sample
  losses per chunk; hooks capture every supported layer's input and output gradient and
  the per-sample squared norms follow layer by layer in closed form (Opacus/BackPACK
  rules of :mod:`gradosr.gradients.rules`, reduction ``"sqnorms"``, on the capture of
  :mod:`gradosr.gradients.capture`). Parameters without such a rule (other layer types,
  tied weights) or whose capture does not hold in a chunk (parameters used outside their
  module, modules called twice, inputs modified in place) are computed by ``"func"``
  restricted to them;
- ``"func"``: ``torch.func.functional_call`` + ``vmap(grad(...))`` over the samples of a
  chunk, reducing every gradient to its squared norm inside the vmapped function;
- ``"head"``: exact closed form when only the final ``nn.Linear`` head's weight and/or
  bias are selected. With head input h (D) and logit gradient g = dJ/dz (N),
  dJ/dW = g h^T and dJ/db = g, so ||dJ/dW||^2 = ||g||^2 ||h||^2 and ||dJ/db||^2 = ||g||^2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _NormBase

from gradosr.errors import ConfigError, DataError, GradOSRError
from gradosr.gradients import capture, rules
from gradosr.gradients.targets import check_n_ones, check_target, per_sample_loss
from gradosr.models import eval_mode, find_head_name

ParamSelection = None | Sequence[str] | Callable[[str, nn.Parameter], bool]

#: default samples per chunk: closed form; hook-based fast path; general path (at most,
#: see _func_chunk)
HEAD_CHUNK, FAST_CHUNK, FUNC_CHUNK = 512, 64, 32
#: the general path holds chunk x (selected parameter elements) gradient entries at once
FUNC_BUDGET = 2**26
METHODS = ("auto", "fast", "func", "head")


def select_parameters(model: nn.Module, params: ParamSelection = None) -> list[str]:
    """Names of the selected parameters, in ``model.named_parameters()`` order.

    Args:
        model: the classifier.
        params: ``None`` for every parameter (frozen ones included), a list of parameter
            names, or a predicate ``params(name, param) -> bool``.

    Raises:
        ConfigError: an unknown name, an invalid ``params``, or an empty selection.
    """
    named = dict(model.named_parameters())
    if params is None:
        names = list(named)
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    else:
        if isinstance(params, str):
            params = [params]
        try:
            wanted = set(params)
        except TypeError:
            raise ConfigError(
                f"params must be None, a list of names or a predicate, got {params!r}"
            ) from None
        unknown = sorted(str(n) for n in wanted - set(named))
        if unknown:
            valid = ", ".join(list(named)[:5]) + (", ..." if len(named) > 5 else "")
            raise ConfigError(f"unknown parameter name(s) {', '.join(unknown)}; valid: {valid}")
        names = [n for n in named if n in wanted]
    if not names:
        raise ConfigError("no parameter selected: the representation would be empty")
    return names


def _check_x(x: object, ref: Tensor) -> Tensor:
    """Validate ``x`` and move it to ``ref``'s device and dtype."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise DataError(f"x must be a floating-point tensor of shape (B, ...), got {desc}")
    x = x.to(device=ref.device, dtype=ref.dtype)
    if not torch.isfinite(x).all():
        raise DataError("x contains NaN or Inf values")
    return x


def _check_out(out: object, batch: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
        desc = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"model output must be (B, N) logits with B={batch}, N >= 2; got {desc}")
    return out


def _head_only(model: nn.Module, names: list[str]) -> nn.Linear | None:
    """The head module if ``names`` are only its weight/bias and it is safe to use."""
    try:
        head_name = find_head_name(model)
    except GradOSRError:
        return None
    prefix = f"{head_name}." if head_name else ""
    if not set(names) <= {prefix + "weight", prefix + "bias"}:
        return None
    # Batch statistics in eval mode would couple the samples of a batch.
    if any(isinstance(m, _NormBase) and not m.track_running_stats for m in model.modules()):
        return None
    return model.get_submodule(head_name)


def _head_chunk(
    model: nn.Module, head: nn.Linear, names: list[str], x: Tensor, loss: Callable[[Tensor], Tensor]
) -> Tensor | None:
    """Closed-form squared norms for one chunk, or None if the logits are not head(h)."""
    calls: list[tuple[Tensor, Tensor]] = []
    handle = head.register_forward_hook(lambda m, inp, out: calls.append((inp[0], out)))
    try:
        with torch.no_grad():
            z = _check_out(model(x), x.shape[0])
    finally:
        handle.remove()
    if len(calls) != 1 or calls[0][1] is not z or calls[0][0].dim() != 2:
        return None
    h = calls[0][0].detach()
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(zz).sum(), zz)
    g2 = g.pow(2).sum(dim=1)
    cols = [g2 * h.pow(2).sum(dim=1) if n.endswith("weight") else g2 for n in names]
    return torch.stack(cols, dim=1)


def _func_chunk(model: nn.Module, names: list[str]) -> int:
    """Default chunk of the general path: 32, fewer for large selections (memory bound)."""
    named = dict(model.named_parameters())
    numel = sum(named[n].numel() for n in names)
    return max(1, min(FUNC_CHUNK, FUNC_BUDGET // max(numel, 1)))


def _func_fn(
    model: nn.Module, names: list[str], loss: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """A function chunk ``(C, ...)`` -> ``(C, P)`` squared norms via vmap(grad)."""
    named = dict(model.named_parameters())
    selected = {n: named[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in named.items() if n not in selected}
    fixed.update({n: b.detach() for n, b in model.named_buffers()})

    def sample_loss(sel: dict[str, Tensor], xi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **sel}, (xi.unsqueeze(0),))
        return loss(_check_out(out, 1)).sum()

    def sample_norms(sel: dict[str, Tensor], xi: Tensor) -> Tensor:
        g = grad(sample_loss)(sel, xi)
        return torch.stack([g[n].pow(2).sum() for n in names])

    batched = vmap(sample_norms, in_dims=(None, 0))
    return lambda xc: batched(selected, xc)


def _fast_plan(model: nn.Module, names: list[str]
               ) -> tuple[list[capture.Layer], dict[str, tuple[capture.Layer, str]]]:
    """The capture layers of the ``"fast"`` path and ``{name: (layer, attribute)}`` for the
    selected parameters it handles, in selection order; the other selected names go to
    ``"func"``.

    A parameter is handled if its owner module (the prefix of its name) has a rule with
    the ``"sqnorms"`` reduction (:func:`gradosr.gradients.rules.rule_for`) covering that
    attribute, and the same ``nn.Parameter`` is registered nowhere else (tied weights go
    to the fallback).
    """
    shared = capture.shared_parameters(model)
    named = dict(model.named_parameters())
    handled: dict[str, tuple[str, nn.Module, rules.LayerRule, str]] = {}
    for name in names:
        prefix, _, attr = name.rpartition(".")
        mod = model.get_submodule(prefix)
        rule = rules.rule_for(mod, rules.SQNORMS)
        if (rule is not None and attr in rule.params and getattr(mod, attr, None) is named[name]
                and id(named[name]) not in shared):
            handled[name] = (prefix, mod, rule, attr)
    layers: dict[nn.Module, capture.Layer] = {}
    for prefix, mod, rule, _ in handled.values():
        if mod not in layers:
            want = tuple(attr for _, m, _, attr in handled.values() if m is mod)
            sqnorms = rule.reduction(rules.SQNORMS, mod)
            layers[mod] = capture.Layer(prefix, mod, want, partial(sqnorms, mod, want=want),
                                        partial(rule.check_input, mod))
    return (list(layers.values()),
            {name: (layers[mod], attr) for name, (_, mod, _, attr) in handled.items()})


def _fast_norms(
    model: nn.Module,
    names: list[str],
    x: Tensor,
    loss: Callable[[Tensor], Tensor],
    chunk_size: int | None,
) -> Tensor:
    """The ``"fast"`` path over all of ``x`` (model already in eval mode): per chunk, one
    :func:`gradosr.gradients.capture.run`; every parameter whose capture does not hold
    (:func:`~gradosr.gradients.capture.verdict`: reused, used outside its module, input
    modified in place, ...) and every parameter without a rule by ``"func"``."""
    layers, fast = _fast_plan(model, names)
    func_fns: dict[tuple[str, ...], Callable[[Tensor], Tensor]] = {}

    def fallback(missing: list[str], xc: Tensor) -> Tensor:
        key = tuple(missing)
        if key not in func_fns:
            func_fns[key] = _func_fn(model, missing, loss)
        step = _func_chunk(model, missing)
        return torch.cat([func_fns[key](xs) for xs in xc.split(step)])

    def loss_of_output(out: object) -> Tensor:
        return loss(_check_out(out, batch))

    parts = []
    with capture.requiring_grad(getattr(layer.module, attr) for layer, attr in fast.values()):
        for xc in x.split(chunk_size or FAST_CHUNK):
            batch = xc.shape[0]
            cols: dict[str, Tensor] = {}
            if layers:
                uses = capture.run(model, layers, xc, loss_of_output)
                for name, (layer, attr) in fast.items():
                    found = capture.verdict(layer, getattr(layer.module, attr), uses)
                    if found == capture.OK:
                        cols[name] = layer.result[attr]
                    elif found == capture.ZERO:  # not used by this forward: zero gradient
                        cols[name] = xc.new_zeros(batch)
            missing = [n for n in names if n not in cols]
            if missing:
                cols.update(zip(missing, fallback(missing, xc).unbind(1)))
            parts.append(torch.stack([cols[n] for n in names], dim=1))
    return torch.cat(parts).detach()


def squared_norms(
    model: nn.Module,
    x: Tensor,
    target: str = "confounding",
    n_ones: int | None = None,
    output: str = "softmax",
    params: ParamSelection = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> tuple[Tensor, list[str]]:
    """Per-sample, per-parameter squared gradient norms (Lee & AlRegib, ICIP 2021, Eq. 1).

    The model runs in eval mode during the computation; every module's training flag is
    restored afterwards. Parameters' ``requires_grad`` and ``.grad`` are not touched.

    Args:
        model: classifier mapping ``(B, ...)`` inputs to ``(B, N)`` logits, N >= 2.
        x: inputs, floating-point ``(B, ...)``; moved to the model's device and dtype.
        target: ``"confounding"`` (default), ``"predicted"`` or ``"uniform"``; see
            :func:`gradosr.gradients.targets.per_sample_loss`.
        n_ones: number of ones of the confounding label (``None``: N).
        output: ``"softmax"`` or ``"sigmoid"`` for the confounding target.
        params: parameter selection, see :func:`select_parameters` (default: all).
        chunk_size: samples processed at once (memory bound); does not change the
            result. Default: 512 for the closed form; 64 for ``"fast"``; for
            ``"func"``, 32, or fewer when 32 x (selected parameter elements) exceeds
            ``FUNC_BUDGET`` = 2**26 (e.g. 5 for a whole ResNet-18).
        method: ``"auto"`` (closed form when only the head's weight/bias are selected
            and the logits are the head's output, else ``"fast"``, or ``"func"`` for a
            model with BatchNorm on batch statistics), ``"fast"`` (hook-based batched
            path, ``"func"`` for the parameters it has no rule for; ConfigError for a
            model with BatchNorm on batch statistics), ``"func"`` (vmap over samples)
            or ``"head"`` (ConfigError if the selection or model does not allow it).
            ``"fast"`` relies on the samples of a batch being independent in eval mode,
            true of standard layers; a model that mixes samples in another way (its own
            batch statistics) must use ``"func"``, which runs each sample alone.

    Returns:
        ``(features, names)``: ``features`` of shape ``(B, P)`` in the model's parameter
        dtype and device, column p being ``||grad_{theta_p} J(x)||^2``; ``names`` the P
        selected parameter names in ``named_parameters()`` order.

    Raises:
        ConfigError: invalid target, output, n_ones, params, chunk_size or method.
        DataError: invalid ``x`` (not floating point, no batch dim, NaN/Inf) or model
            output that is not ``(B, N)`` logits with N >= 2.
    """
    check_target(target, output)
    check_n_ones(n_ones)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    names = select_parameters(model, params)
    ref = next(model.parameters())
    x = _check_x(x, ref)
    if x.shape[0] == 0:
        return x.new_zeros((0, len(names))), names

    def loss(z: Tensor) -> Tensor:
        return per_sample_loss(z, target=target, n_ones=n_ones, output=output)

    head = _head_only(model, names) if method in ("auto", "head") else None
    if method == "fast" and capture.batch_coupled(model):
        raise ConfigError("method='fast' needs samples that are independent in eval mode; "
                          "the model has BatchNorm without running statistics")
    if method == "head" and head is None:
        raise ConfigError("method='head' needs a selection of only the head's weight/bias "
                          f"(and no batch-statistics normalisation); got {names}")
    with eval_mode(model):
        if head is not None:
            size = chunk_size or HEAD_CHUNK
            parts = []
            for xc in x.split(size):
                part = _head_chunk(model, head, names, xc, loss)
                if part is None:
                    break
                parts.append(part)
            else:
                return torch.cat(parts), names
            if method == "head":
                raise ConfigError("method='head' needs the model's output to be exactly the "
                                  "head's output (logits = head(h)), which it is not")
        if method in ("auto", "fast") and not capture.batch_coupled(model):
            return _fast_norms(model, names, x, loss, chunk_size), names
        fn = _func_fn(model, names, loss)
        size = chunk_size or _func_chunk(model, names)
        return torch.cat([fn(xc) for xc in x.split(size)]), names
