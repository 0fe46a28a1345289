"""Utilities that work on any PyTorch classifier: locate, resize and re-initialise.

The *classification head* of a model is an ``nn.Linear`` whose input is the penultimate
feature vector. :func:`find_head_name` looks, in this order, for:

1. the layer named by :func:`set_head` (``--head NAME``);
2. the attributes ``head``, ``fc``, ``classifier``, ``last_linear`` (the built-in
   models, torchvision's ResNet/DenseNet/VGG/EfficientNet/MobileNet/ConvNeXt, timm's
   ``head`` or ``head.fc``, pretrainedmodels): the attribute itself when it is an
   ``nn.Linear``, else the last ``nn.Linear`` inside it (``classifier =
   Sequential(Dropout, Linear)``);
3. the last ``nn.Linear`` of the model (a final ``nn.Linear`` in a ``Sequential``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from gradosr.errors import ConfigError
from gradosr.models._common import check_num_classes

#: attributes searched for the head, in order
HEAD_ATTRIBUTES = ("head", "fc", "classifier", "last_linear")
#: the plain attribute (not a parameter or buffer) where set_head records a chosen head
_HEAD_NAME = "gradosr_head_name"


def set_head(model: nn.Module, name: str) -> nn.Module:
    """Make the ``nn.Linear`` named ``name`` (as in ``model.named_modules()``) the head
    that :func:`find_head_name` returns; ConfigError naming the Linear layers otherwise."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        sub = model.get_submodule(name)
    except AttributeError:
        sub = None
    if not isinstance(sub, nn.Linear):
        what = "is no submodule" if sub is None else f"is a {type(sub).__name__}, not an nn.Linear"
        raise ConfigError(f"--head {name!r} {what} of {type(model).__name__}; its nn.Linear layers: "
                          f"{', '.join(linears) or 'none'}")
    object.__setattr__(model, _HEAD_NAME, name)
    return model


def _last_linear(module: nn.Module, prefix: str = "") -> str | None:
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = f"{prefix}.{name}" if prefix and name else (prefix or name)
    return found


def find_head_name(module: nn.Module) -> str:
    """Return the qualified name of the classification head of ``module`` (the rule of
    the module docstring).

    The name is the one used by ``module.named_modules()`` (e.g. ``"head"`` or
    ``"classifier.2"``), so the head's parameters appear in ``named_parameters()`` as
    ``f"{name}.weight"`` and ``f"{name}.bias"``.

    Raises:
        ConfigError: the model contains no ``nn.Linear`` (the message names ``--head``).
    """
    chosen = module.__dict__.get(_HEAD_NAME)
    if chosen is not None:
        return chosen
    for attr in HEAD_ATTRIBUTES:
        sub = module._modules.get(attr)
        if isinstance(sub, nn.Module):
            name = _last_linear(sub, attr)
            if name is not None:
                return name
    last = _last_linear(module)
    if last is None:
        raise ConfigError(
            f"cannot find the classification head of {type(module).__name__}: it has no nn.Linear. gradosr needs "
            "an nn.Linear head on the penultimate features; name it with --head NAME (or expose it as `head`)"
        )
    return last


def find_head(module: nn.Module) -> nn.Linear:
    """Return the classification head (an ``nn.Linear``) of ``module``.

    ``module.head`` if it is an ``nn.Linear``, else the last ``nn.Linear`` in
    ``named_modules()`` order.

    Raises:
        ConfigError: the model contains no ``nn.Linear``.
    """
    head = module.get_submodule(find_head_name(module))
    assert isinstance(head, nn.Linear)
    return head


def resize_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the head of ``model`` by a fresh ``nn.Linear(in_features, num_classes)``.

    The new layer keeps the old one's ``bias`` setting, device and dtype, and is set in
    place wherever the old layer was registered (nested modules and aliases included);
    a bare ``nn.Linear`` model gets new parameters instead. All other parameters are
    untouched, and ``model.num_classes`` is updated if present. Returns ``model``.

    Raises:
        ConfigError: ``num_classes`` is not an int >= 2, or the model has no head.
    """
    num_classes = check_num_classes(num_classes)
    old = find_head(model)
    new = nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.train(old.training)
    if old is model:  # a bare nn.Linear: swap its parameters in place
        old.out_features = num_classes
        old.weight = new.weight
        old.bias = new.bias
        return model
    # Collect first, then replace: every place where the old head is registered.
    places = [name for name, sub in model.named_modules(remove_duplicate=False) if sub is old]
    for name in places:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    if hasattr(model, "num_classes") and isinstance(getattr(model, "num_classes"), int):
        model.num_classes = num_classes
    return model


def reset_parameters(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Re-initialise ``model`` in place and return it.

    Calls ``reset_parameters()`` on every submodule that has one and resets the running
    statistics of every BatchNorm layer. With ``seed`` the initialisation is
    deterministic (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``, so
    the global RNG state is left unchanged).
    """
    if seed is None:
        _reset_all(model)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _reset_all(model)
    return model


def _reset_all(model: nn.Module) -> None:
    for sub in model.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        if isinstance(sub, _NormBase) and sub.track_running_stats:
            sub.reset_running_stats()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (BatchNorm running stats, no dropout) inside the block,
    then restore every submodule's own training flag, even on error."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
