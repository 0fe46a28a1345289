"""Tiny synthetic images and fitted runs shared by the failure, fuzz and durability tests.

A "run" here is a GradientOSR on a LeNet trained for one epoch on K = 4 synthetic
28×28 grey classes (each class lights one quadrant), saved like ``gradosr fit`` saves
it, so that ``GradientOSR.load`` and ``gradosr predict`` read it without a model. It
takes about 2 s to build on one CPU thread.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from torch import nn

from gradosr.data.imageset import ImageSet
from gradosr.osr import GradientOSR
from gradosr.preprocess import Preprocessing
from gradosr.train import TrainConfig, train_classifier

K = 4
PRE = Preprocessing.default((28, 28), 1)
TRAIN_CONFIG = TrainConfig(model="lenet", epochs=1, batch_size=32, seed=0)


def quadrant_images(n_per_class: int, seed: int, k: int = K) -> ImageSet:
    """uint8 N×28×28×1 images: class c lights quadrant c (of 4) above background noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), 28, 28, 1))
    for c in range(k):
        r, q = divmod(c % 4, 2)
        images[labels == c, 14 * r:14 * r + 14, 14 * q:14 * q + 14, 0] += 180
    return ImageSet(np.clip(images, 0, 255).astype(np.uint8), labels)


TRAIN = quadrant_images(24, seed=0)
VAL = quadrant_images(6, seed=1)


def quiet(_line: str) -> None:
    """A ``log`` callback that drops the per-epoch lines."""


def build_run(run_dir: str | Path | None) -> GradientOSR:
    """Fit the tiny LeNet run (saved into ``run_dir`` when given)."""
    clf = train_classifier(TRAIN, VAL, list(range(K)), TRAIN_CONFIG, PRE, progress=False, log=quiet)
    osr = GradientOSR("paper", classifier=clf, train_config=TRAIN_CONFIG, max_epochs=5)
    return osr.fit(TRAIN.images, TRAIN.labels, VAL.images, VAL.labels, run_dir=run_dir)


class FlatNet(nn.Module):
    """A custom model without preprocessing: float 1×8×8 inputs -> k logits."""

    def __init__(self, k: int = K):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


def snapshot(root: str | Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (recursively): relative path -> (sha256, mtime_ns)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def mat_bytes(variables: dict) -> bytes:
    """A MATLAB 5 file (scipy.io.savemat) holding ``variables``."""
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, variables)
    return buf.getvalue()


def crashing_mat() -> bytes:
    """An SVHN-like .mat file on which scipy.io.loadmat (1.17) dies with a segmentation
    fault when run in-process: the data element of X has type 0."""
    data = bytearray(mat_bytes({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [10]], np.uint8)}))
    assert data[184:188] == b"\x02\x00\x00\x00"  # the type of X's data element: miUINT8
    data[184:188] = bytes(4)
    return bytes(data)
