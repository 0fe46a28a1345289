"""Capture of every selected layer's input and output gradient in ONE batched forward and
backward, reduced layer by layer by the layer rules (:mod:`gradosr.gradients.rules`).

In eval mode (BatchNorm on running statistics, Dropout off) the samples of a batch are
independent, so a single backward pass of the *sum* of the per-sample losses gives, at
the output of every layer, each sample's own back-propagated gradient ``g``. A forward hook
keeps the layer's input ``a`` (its first positional input, ``(B, ...)``) and registers a
tensor hook on its output; when the output gradient ``g`` (the output's shape) arrives,
the layer's ``reduce(a, g)`` (a rule's reduction bound to the layer) runs under
``torch.no_grad()`` and ``a`` is released, so that no per-sample gradient of the whole
model is ever formed. This is the hook scheme of Opacus (Yousefpour et al., 2021,
``opacus.grad_sample.GradSampleModule``) and BackPACK (Dangel, Kunstner and Hennig, ICLR
2020), and LoGra's (Choe et al., 2024) for projected gradients. The backward is
``torch.autograd.grad`` w.r.t. a leaf copy of the input (and the outputs listed below),
so parameters' ``.grad`` is never touched. A tensor hook registered before an in-place
operation on the output (e.g. ``ReLU(inplace=True)``) receives the gradient w.r.t. the
pre-modification value, i.e. the layer's own output gradient.

What the pass finds per layer (:func:`verdict`), for the caller to decide (the squared
norms send the parameter to the ``torch.func`` path, the projection raises ConfigError):

- a module called more than once in a forward, with a non-tensor input or output, or with
  an input its rule refuses (:meth:`~gradosr.gradients.rules.LayerRule.check_input`):
  :data:`CALLED_TWICE`, :data:`NOT_TENSOR` or the rule's reason (:attr:`Layer.failure`);
- an input modified in place after the call: :data:`INPUT_MODIFIED`;
- a parameter also used outside its module's forward (more than one graph edge into its
  gradient accumulator, or edges although the module was not called): :data:`USED_OUTSIDE`;
- no graph edge into the parameter: :data:`ZERO`, its gradient is zero;
- an output gradient that never arrived (the input depends on neither the input leaf nor
  the layers before it, and the output was not requested): :data:`NOT_CAPTURED`.

Tied weights (one ``nn.Parameter`` registered in several modules,
:func:`shared_parameters`) are the caller's to exclude before the pass. Only valid when
the model treats the samples of a batch independently in eval mode; :func:`batch_coupled`
detects the usual exception (BatchNorm without running statistics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CALLED_TWICE", "INPUT_MODIFIED", "Layer", "NOT_CAPTURED", "NOT_TENSOR", "OK",
           "USED_OUTSIDE", "ZERO", "batch_coupled", "param_uses", "requiring_grad", "run",
           "shared_parameters", "verdict"]

CALLED_TWICE = "is called more than once in a forward"
NOT_TENSOR = "has a non-tensor input or output"
INPUT_MODIFIED = "has its input modified in place after the call"
USED_OUTSIDE = "is also used outside its forward"
NOT_CAPTURED = "could not be captured"
OK, ZERO = "ok", "zero"


@dataclass(eq=False)
class Layer:
    """One layer of a capture: what to reduce, and the state of the last pass.

    ``params`` are the parameter attributes of ``module`` whose gradients ``reduce(a, g)``
    describes; ``check_input(a)`` returns why an input cannot be used, or None. ``keep``
    says what ``a`` is: the layer's first input (``"input"``, the default), its output
    (``"output"``: the activation, which must not be modified in place later), or an empty
    tensor (``"grad"``: only the output gradient ``g`` is used). After
    :func:`run`: ``calls`` forward calls, ``result`` what ``reduce`` returned (None if it
    did not run), ``failure`` the first reason the capture is not valid (None if none).
    """

    name: str
    module: nn.Module
    params: tuple[str, ...]
    reduce: Callable[[Tensor, Tensor], object]
    check_input: Callable[[Tensor], str | None] | None = None
    keep: str = "input"
    calls: int = 0
    result: object = None
    failure: str | None = None
    a: Tensor | None = None
    a_version: int = 0
    a_requires_grad: bool = False
    out: Tensor | None = None
    out_version: int = 0

    @property
    def label(self) -> str:
        return self.name or "<root>"

    def _reset(self) -> None:
        self.calls, self.result, self.failure, self.a, self.out = 0, None, None, None, None

    def _fail(self, reason: str, on_failure: Callable[[Layer, str], None] | None) -> None:
        self.failure = self.failure or reason
        self.a, self.out = None, None
        if on_failure is not None:
            on_failure(self, reason)


def batch_coupled(model: nn.Module) -> bool:
    """True if some module mixes the samples of a batch in eval mode (BatchNorm without
    running statistics), where one batched backward does not give per-sample gradients."""
    return any(isinstance(m, _BatchNorm) and (not m.track_running_stats or m.running_mean is None)
               for m in model.modules())


def shared_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter registered in more than one module (tied weights)."""
    holders: Counter[int] = Counter()
    for mod in model.modules():  # each module object once
        for p in mod._parameters.values():
            if p is not None:
                holders[id(p)] += 1
    return {key for key, n in holders.items() if n > 1}


@contextmanager
def requiring_grad(params: Iterable[Tensor]) -> Iterator[None]:
    """Set ``requires_grad`` on ``params`` for the block, then restore every flag."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def param_uses(root: Tensor) -> Counter[int]:
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


def _forward_hook(layer: Layer, on_failure: Callable[[Layer, str], None] | None,
                  module: nn.Module, inputs: tuple, out: object) -> None:
    layer.calls += 1
    reason = None
    if layer.calls > 1:
        reason = CALLED_TWICE
    elif not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
        reason = NOT_TENSOR
    elif layer.check_input is not None:
        reason = layer.check_input(inputs[0])
    if reason is not None:
        layer._fail(reason, on_failure)
        return
    if not out.requires_grad:  # no gradient reaches it (e.g. run under no_grad)
        return
    a = inputs[0]
    layer.a_requires_grad = a.requires_grad
    if layer.keep == "output":
        a = out
    elif layer.keep == "grad":
        a = out.new_empty(0)
    layer.a, layer.a_version = a.detach(), a._version
    layer.out, layer.out_version = out, out._version
    out.register_hook(partial(_grad_hook, layer))


def _grad_hook(layer: Layer, g: Tensor) -> None:
    if layer.result is not None or layer.failure is not None or layer.a is None:
        return
    a, layer.a = layer.a, None
    if a._version != layer.a_version:  # the input was modified in place after the call
        layer.failure = INPUT_MODIFIED
        return
    with torch.no_grad():
        layer.result = layer.reduce(a, g)


def run(model: nn.Module, layers: list[Layer], x: Tensor,
        loss_of_output: Callable[[object], Tensor], *, request_all_outputs: bool = False,
        on_failure: Callable[[Layer, str], None] | None = None,
        input_grad: list[Tensor] | None = None) -> Counter[int]:
    """One batched forward and ONE backward of ``loss_of_output(model(x)).sum()``.

    The model must be in eval mode and the ``params`` of every layer must require grad
    (:func:`requiring_grad`); parameters' ``.grad`` is not touched. The gradient is
    requested w.r.t. a leaf copy of ``x`` and, so that their hooks fire where the gradient
    does not flow on to that leaf, w.r.t. the outputs of the layers whose input does not
    require grad (every layer's output with ``request_all_outputs``); an output modified
    in place since the call is reached through the layer's parameters instead.

    Args:
        loss_of_output: model output -> per-sample losses ``(B,)`` (it validates the output).
        on_failure: called as ``on_failure(layer, reason)`` when a layer's capture fails
            in the forward or right after it (it may raise to stop the pass).
        input_grad: a list that receives the gradient w.r.t. ``x`` (zeros where the loss
            does not depend on it), for callers that also need it (input perturbations).

    Returns:
        :func:`param_uses` of the pass; each layer's ``calls``, ``result`` and ``failure``
        are updated (see :func:`verdict`).
    """
    for layer in layers:
        layer._reset()
    handles = []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(
                partial(_forward_hook, layer, on_failure)))
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            z = model(leaf.clone())
            for h in handles:
                h.remove()
            handles = []
            total = loss_of_output(z).sum()
        for layer in layers:
            if layer.a is not None and layer.a._version != layer.a_version:
                layer._fail(INPUT_MODIFIED, on_failure)
        uses = param_uses(total)
        requests: list[Tensor] = [leaf]
        for layer in layers:
            if layer.out is not None and layer.failure is None:
                if layer.out._version == layer.out_version:
                    if request_all_outputs or not layer.a_requires_grad:
                        requests.append(layer.out)
                elif not layer.a_requires_grad:
                    requests.extend(getattr(layer.module, p) for p in layer.params)
            layer.out = None
        if total.requires_grad:
            grads = torch.autograd.grad(total, requests, allow_unused=True)
            if input_grad is not None:
                input_grad.append(torch.zeros_like(leaf) if grads[0] is None else grads[0])
        elif input_grad is not None:
            input_grad.append(torch.zeros_like(leaf))
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.a, layer.out = None, None
    return uses


def verdict(layer: Layer, param: Tensor, uses: Counter[int]) -> str:
    """What the last pass gives for ``param`` (one of ``layer.params``): :data:`OK`
    (``layer.result`` holds its reduction), :data:`ZERO` (no graph edge into it: zero
    gradient), or why neither (``layer.failure``, :data:`USED_OUTSIDE`,
    :data:`NOT_CAPTURED`)."""
    if layer.failure is not None:
        return layer.failure
    n = uses[id(param)]
    if n > 1 or (layer.calls == 0 and n > 0):
        return USED_OUTSIDE
    if n == 0:
        return ZERO
    return NOT_CAPTURED if layer.result is None else OK
