"""Intermediate layers of a classifier for the layer-wise methods (NAC, GAIA,
multi-layer Mahalanobis): which layers, and their activations and gradients in batches.

Layers are named by ``model.named_modules()``. :data:`BUILTIN` maps the project's models
(:mod:`gradosr.models`) onto the layers each paper uses (one *role* per method); any
other model gets a rule, stated per role in :func:`select_layers`:

- ``blocks``: the outputs of the network's stages. ResNet18: ``layer1``-``layer3`` and
  the pooled penultimate ``pool`` (NAC's CIFAR choice: layer1-3 and avgpool); CNN32: the
  last activation of each of its three blocks (``features.9``, ``.19``, ``.29``) and the
  pooled penultimate ``features.31``; LeNet: the two convolution stages' ReLUs
  (``features.2``, ``.6``) and the penultimate ReLU ``features.11``. Other models: the
  last 4 *leaf* modules (modules without children, in the order a probe forward calls
  them, the head excluded) whose output is N×C or N×C×H×W, skipping no-op modules
  (Identity, Dropout, Flatten) and modules whose output is modified in place later.
- ``stages``: Lee et al.'s Mahalanobis layers, the stem and the end of every stage.
  ResNet18: ``stem``, ``layer1``-``layer4``; CNN32 and LeNet: as ``blocks``. Other
  models: as ``blocks``.
- ``norms``: GAIA-Z's layers, every normalisation layer (BatchNorm/GroupNorm/LayerNorm;
  the paper hooks every BatchNorm2d on CIFAR); models without one: every Linear/Conv
  layer except the head.
- ``late_norms``: GAIA-A's inner layers, the last half (rounded up) of the ``norms``
  layers in forward order. ResNet18: exactly the 10 BatchNorms of ``layer3`` and
  ``layer4`` (the paper's CIFAR choice).

Activations and gradients come from :func:`gradosr.gradients.capture.run` (hooks, one
batched forward and one backward per batch; no per-sample loop), in eval mode, in
batches of ``batch_size`` inputs on the model's device and dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.odin import _model_and_inputs
from gradosr.errors import ConfigError, DataError
from gradosr.gradients import capture
from gradosr.models import CNN32, LeNet, ResNet18, eval_mode, find_head_name

ROLES = ("blocks", "stages", "norms", "late_norms")

BUILTIN: dict[type, dict[str, list[str]]] = {
    ResNet18: {"blocks": ["layer1", "layer2", "layer3", "pool"],
               "stages": ["stem", "layer1", "layer2", "layer3", "layer4"]},
    CNN32: {"blocks": ["features.9", "features.19", "features.29", "features.31"],
            "stages": ["features.9", "features.19", "features.29", "features.31"]},
    LeNet: {"blocks": ["features.2", "features.6", "features.11"],
            "stages": ["features.2", "features.6", "features.11"]},
}
_NOOPS = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


def check_batch_size(batch_size) -> int:
    """A positive integer batch size; ConfigError otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _probe(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module, tuple, bool]]:
    """(name, module, output shape, modified in place later) of every leaf module, in the
    order one forward of ``x[:1]`` calls them (once each)."""
    calls: list[tuple[str, nn.Module, Tensor, int]] = []
    handles = []

    def hook(name, module, inputs, out):
        if isinstance(out, Tensor):
            calls.append((name, module, out, out._version))

    for name, mod in model.named_modules():
        if not any(True for _ in mod.children()):
            handles.append(mod.register_forward_hook(lambda m, i, o, n=name: hook(n, m, i, o)))
    try:
        with torch.no_grad(), eval_mode(model):
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for name, mod, t, version in calls:
        if name not in seen:
            seen.add(name)
            out.append((name, mod, tuple(t.shape), t._version != version))
    return out


def select_layers(model: nn.Module, x: Tensor, role: str) -> list[str]:
    """The layer names of ``role`` (see the module docstring) for ``model`` on inputs like ``x``."""
    if role not in ROLES:
        raise ConfigError(f"layer role must be one of {ROLES}, got {role!r}")
    builtin = BUILTIN.get(type(model), {})
    if role in builtin:
        return list(builtin[role])
    head = find_head_name(model)
    leaves = [p for p in _probe(model, x) if p[0] != head and not p[0].startswith(head + ".")]
    if role in ("norms", "late_norms"):
        names = [n for n, m, _, _ in leaves if isinstance(m, _NORMS)]
        if not names:
            names = [n for n, m, _, _ in leaves if isinstance(m, _WEIGHTED)]
        if role == "late_norms":
            names = names[len(names) // 2:]
    else:
        names = [n for n, m, shape, modified in leaves
                 if len(shape) in (2, 4) and not isinstance(m, _NOOPS) and not modified][-4:]
    if not names:
        raise DataError(f"no layer of role {role!r} found in {type(model).__name__}")
    return names


def channel_mean(t: Tensor) -> Tensor:
    """N×C×H×W -> N×C (the mean over H×W); N×C unchanged; other shapes flattened to N×P."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    return t.reshape(len(t), -1)


def model_inputs(outputs: ScorerInputs, method: str) -> tuple[nn.Module, Tensor]:
    """The model and its inputs (DataError if either is missing)."""
    return _model_and_inputs(outputs, method)


def _device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    ref = next(model.parameters(), None)
    return (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), x.dtype)


def layer_pass(model: nn.Module, x: Tensor, names: list[str], keep: str,
               reduce: Callable[[Tensor, Tensor], object],
               loss_of_output: Callable[[Tensor], Tensor] | None, method: str,
               input_grad: list[Tensor] | None = None) -> dict[str, object]:
    """One batched forward (and, with ``loss_of_output``, one backward of the summed
    per-sample losses) of ``x``; ``{name: reduce(a, g)}`` per layer, with ``a`` as
    ``keep`` says (:class:`gradosr.gradients.capture.Layer`). Without a loss the forward
    runs under ``no_grad`` and ``g`` is None. DataError if a layer could not be captured."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise DataError(f"{method}: the model has no modules {missing}")
    if loss_of_output is None:
        results: dict[str, object] = {}
        counts: dict[str, int] = {}

        def hook(name, module, inputs, out):
            counts[name] = counts.get(name, 0) + 1
            results[name] = reduce(out.detach(), None)

        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: hook(n, m, i, o)) for n in names]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        bad = [n for n in names if counts.get(n) != 1]
        if bad:
            raise DataError(f"{method}: layers {bad} are not called exactly once in a forward")
        return results
    layers = [capture.Layer(n, modules[n], (), reduce, keep=keep) for n in names]
    capture.run(model, layers, x, loss_of_output, request_all_outputs=True, input_grad=input_grad)
    out = {}
    for layer in layers:
        if layer.failure is not None or layer.result is None:
            raise DataError(f"{method}: layer {layer.label} {layer.failure or capture.NOT_CAPTURED}")
        out[layer.name] = layer.result
    return out


def batched(outputs: ScorerInputs, batch_size: int, method: str, step: Callable[[nn.Module, Tensor], object]) -> list:
    """``step(model, xb)`` for every batch ``xb`` of the inputs (eval mode, on the model's
    device and dtype); the list of what it returned."""
    model, x = model_inputs(outputs, method)
    device, dtype = _device_dtype(model, x)
    results = []
    with eval_mode(model):
        for xb in x.split(batch_size):
            if len(xb) == 0:
                continue
            results.append(step(model, xb.detach().to(device=device, dtype=dtype)))
    return results
