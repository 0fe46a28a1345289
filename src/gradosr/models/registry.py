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


def build_model(name: str, num_classes: int, in_channels: int = 1, head: str | None = None) -> nn.Module:
    """Build a fresh model by name (``"lenet"``, ``"cnn32"``, ``"resnet18"``, the ImageNet-style
    ``"resnet50"``) or by import
    path (``"package.module:factory"``, :func:`gradosr.models.user.build_user_model`);
    ``head`` names its classification layer (``--head``).

    Raises:
        ConfigError: unknown name, invalid ``num_classes`` / ``in_channels``, or a user
            factory that cannot be imported or called.
    """
    from gradosr.models.heads import set_head
    from gradosr.models.user import build_user_model, is_import_path

    if is_import_path(name):
        return build_user_model(name, num_classes, in_channels, head)
    try:
        cls = _MODELS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown model {name!r}; available models: {', '.join(available_models())}, or your own as "
            "package.module:factory"
        ) from None
    model = cls(num_classes, in_channels)
    return set_head(model, head) if head is not None else model
