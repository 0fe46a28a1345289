"""Device selection shared by every command (``--device auto|cpu|cuda|mps``)."""

from __future__ import annotations

import torch

from gradosr.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps if available, else cpu."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but MPS is not available")
    return device
