"""Image preprocessing stored with every classifier and applied by ``predict``.

Images arrive as uint8 N×H×W×C (C = 1, 3 or 4). They are converted to the stored
channel count (RGB→grey by ITU-R BT.601 luma, grey→RGB by repetition, alpha dropped),
resized bilinearly to the stored size, scaled to [0, 1] and normalised per channel:
``(x / 255 - mean) / std``. Output: float32 tensor N×C×H×W.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gradosr.errors import ConfigError, DataError

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs.

    Attributes:
        size: (H, W) the model expects.
        channels: 1 or 3.
        mean, std: per-channel normalisation, applied after scaling to [0, 1].
    """

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"invalid preprocessing {self}")
        if len(self.size) != 2 or min(self.size) < 1 or not all(s > 0 for s in self.std):
            raise ConfigError(f"invalid preprocessing {self}")

    @classmethod
    def default(cls, size: tuple[int, int], channels: int) -> "Preprocessing":
        """docs/design.md, "Training defaults": pixels /255, then (x - 0.5) / 0.5."""
        return cls(size, channels, (0.5,) * channels, (0.5,) * channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        try:
            return cls(tuple(d["size"]), int(d["channels"]), tuple(d["mean"]), tuple(d["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid preprocessing record {d!r}: {exc}") from None

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×C (or N×H×W) images -> float32 N×C×H×W model input."""
        if not isinstance(images, torch.Tensor):
            try:
                images = np.asarray(images)
            except (ValueError, TypeError) as exc:
                raise DataError(f"images could not be converted to an array: {exc}") from None
            if images.dtype != np.uint8:
                raise DataError(f"images must be uint8 (0..255), got {images.dtype}")
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        if x.ndim != 4:
            raise DataError(f"images must be N×H×W×C or N×H×W, got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise DataError(f"images must be uint8 (0..255), got {x.dtype}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise DataError(f"images must be at least 1×1 pixels, got shape {tuple(x.shape)}")
        x = convert(x.permute(0, 3, 1, 2).float().div_(255.0), self.size, self.channels)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


def convert(x: torch.Tensor, size: tuple[int, int], channels: int) -> torch.Tensor:
    """Float images N×C×H×W in [0, 1] (C = 1, 2, 3 or 4) converted to ``channels`` (1 or 3)
    and resized bilinearly to ``size`` (H, W): alpha dropped (C = 4 -> 3, 2 -> 1),
    RGB -> grey by ITU-R BT.601 luma, grey -> RGB by repetition. The rule of every
    conversion in gradosr (model inputs, and images read from folders and arrays)."""
    c = x.shape[1]
    if c == 4:
        x, c = x[:, :3], 3
    if c == 2:
        x, c = x[:, :1], 1
    if c not in (1, 3):
        raise DataError(f"images must have 1, 3 or 4 channels, got {c}")
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * w).sum(1, keepdim=True)
    elif c == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


def convert_uint8(images: np.ndarray, size: tuple[int, int], channels: int, chunk: int = 1024) -> np.ndarray:
    """uint8 images N×H×W×C converted by :func:`convert` to N×size×channels uint8
    (rounded to the nearest integer), in chunks of ``chunk`` images; returned as they
    are when nothing changes."""
    if images.shape[1:3] == tuple(size) and images.shape[3] == channels:
        return images
    out = np.empty((len(images), *size, channels), np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.as_tensor(images[start:start + chunk]).permute(0, 3, 1, 2).float().div_(255.0)
        y = convert(x, size, channels).mul_(255.0).round_().clamp_(0, 255)
        out[start:start + chunk] = y.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
