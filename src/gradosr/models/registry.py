"""Build the built-in models by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gradosr.errors import ConfigError
from gradosr.models.cnn32 import CNN32
from gradosr.models.lenet import LeNet
from gradosr.models.resnet import ResNet18
from gradosr.models.resnet50 import ResNet50

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "cnn32": CNN32,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_MODELS)


def build_model(name: str, num_classes: int, in_channels: int = 1) -> nn.Module:
    """Build a fresh model by name (``"lenet"``, ``"cnn32"``, ``"resnet18"`` or the ImageNet-style ``"resnet50"``).

    Raises:
        ConfigError: unknown name, or invalid ``num_classes`` / ``in_channels``.
    """
    try:
        cls = _MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}"
        ) from None
    return cls(num_classes, in_channels)
