"""Argument checks shared by the built-in models and the head utilities."""

from __future__ import annotations

from numbers import Integral

from gradosr.errors import ConfigError


def check_num_classes(num_classes: object) -> int:
    """Return ``num_classes`` as an int; raise ConfigError unless it is an integer >= 2."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def check_model_args(num_classes: object, in_channels: object) -> tuple[int, int]:
    """Validate a model's ``(num_classes, in_channels)`` and return them as ints.

    Raises:
        ConfigError: ``num_classes`` is not an integer >= 2 or ``in_channels`` is not 1 or 3
            (NumPy integers are accepted).
    """
    classes = check_num_classes(num_classes)
    is_int = isinstance(in_channels, Integral) and not isinstance(in_channels, bool)
    if not is_int or in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    return classes, int(in_channels)
