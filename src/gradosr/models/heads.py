"""Utilities that work on any PyTorch classifier: locate, resize and re-initialise.

The *classification head* of a model is ``model.head`` when that is an ``nn.Linear``,
otherwise the last ``nn.Linear`` in ``model.named_modules()`` order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from gradosr.errors import ConfigError
from gradosr.models._common import check_num_classes


def find_head_name(module: nn.Module) -> str:
    """Return the qualified name of the classification head of ``module``.

    The name is the one used by ``module.named_modules()`` (e.g. ``"head"`` or
    ``"classifier.2"``), so the head's parameters appear in ``named_parameters()`` as
    ``f"{name}.weight"`` and ``f"{name}.bias"``.

    Raises:
        ConfigError: the model contains no ``nn.Linear``.
    """
    head = getattr(module, "head", None)
    last_linear: str | None = None
    for name, sub in module.named_modules():
        if isinstance(head, nn.Linear) and sub is head:
            return name
        if isinstance(sub, nn.Linear):
            last_linear = name
    if last_linear is None:
        raise ConfigError(
            f"model has no nn.Linear classification head; {type(module).__name__} must end "
            "in an nn.Linear (or expose one as its `head` attribute)"
        )
    return last_linear


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
