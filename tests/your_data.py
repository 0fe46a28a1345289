"""Users' data and models written by the tests: image folders, .npz archives and a model
factory module, all tiny (16×16, 6 classes) so that a CLI run takes seconds."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")


def class_images(n_per_class: int, seed: int, k: int = len(CLASSES), size: int = 16,
                 channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×size×size×channels images and labels: class c brightens channel c % 3 (grey:
    a brighter level) in the top (c < 3) or bottom half, above background noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    x = rng.integers(0, 50, size=(len(labels), size, size, channels))
    half = size // 2
    for c in range(k):
        rows = slice(0, half) if c < 3 else slice(half, size)
        ch = (c % 3) if channels == 3 else 0
        x[labels == c, rows, :, ch] += 120 + (60 * (c % 3) if channels == 1 else 80)
    return np.clip(x, 0, 255).astype(np.uint8), labels


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def image_folder(root: Path, n_per_class: int = 20, seed: int = 0, split: bool = False) -> Path:
    """An ImageFolder tree ``root/<class>/<i>.png`` (with ``split``: under train/ and test/)."""
    x, y = class_images(n_per_class, seed)
    for i, (img, label) in enumerate(zip(x, y)):
        part = ("test" if i % 5 == 0 else "train") if split else ""
        write_png(root / part / CLASSES[label] / f"{i:03d}.png", img)
    return root


def npz_archive(path: Path, n_per_class: int = 20, seed: int = 0, **extra) -> Path:
    x, y = class_images(n_per_class, seed)
    np.savez(path, x=x, y=y, **extra)
    return path


FACTORY_MODULE = '''
from torch import nn


class Net(nn.Module):
    """A user's CNN: features in `body`, the head inside a `classifier` Sequential."""

    def __init__(self, num_classes, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(32, 16), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.body(x))


def make(num_classes, in_channels=3):
    return Net(num_classes, in_channels)


def conv_head(num_classes):
    """No nn.Linear anywhere: the head cannot be found."""
    return nn.Sequential(nn.Conv2d(3, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def broken(num_classes, in_channels=3):
    raise ValueError("no GPU here")
'''


def factory_module(folder: Path, monkeypatch, name: str = "user_models") -> str:
    """Write the user's model module into ``folder``, put it on the import path (as
    PYTHONPATH would) and return its module name; it is forgotten after the test."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name
