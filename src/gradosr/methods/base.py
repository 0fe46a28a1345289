"""What a method strategy of :class:`gradosr.osr.GradientOSR` is, and their registry.

A strategy (``OSRConfig.method``: ``proxy``, the paper's; ``fusion``, the ``plus``
preset's) owns its fit, its score and its state:

- ``check(k)``: ConfigError, before anything is trained or written, when the options do
  not fit K known classes;
- ``fit(ctx, data)``: :class:`FitContext` (classifier, training recipe, proxy store,
  device, run folder) and :class:`FitData` (known training and held-out inputs);
- ``score_samples(classifier, x)``: float64 N, higher = more likely known;
- ``state()`` / ``from_state(tensors, meta, config, classifier, seed)``: what
  :mod:`gradosr.methods.persistence` writes to ``detector/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradosr.classifier import Classifier
from gradosr.methods.proxy_store import ProxyStore
from gradosr.train import TrainConfig

#: OSRConfig.method -> strategy class
STRATEGIES: dict[str, type] = {}


def register_strategy(name: str):
    """Class decorator: the strategy of ``OSRConfig.method == name``."""
    def add(cls):
        STRATEGIES[name] = cls
        return cls
    return add


@dataclass
class FitContext:
    """Collaborators of one fit."""

    classifier: Classifier
    train_config: TrainConfig | None
    proxy_factory: Callable[[int], nn.Module] | None
    store: ProxyStore
    device: torch.device
    progress: bool
    run_dir: Path | None


@dataclass
class FitData:
    """Model inputs (float N×C×H×W) and labels 0..K-1 of the known training samples and
    of the held-out knowns; ``split_seed`` draws the proxy splits; ``identity`` is what a
    stored proxy must match (the protocol split)."""

    xt: torch.Tensor
    yt: np.ndarray
    xv: torch.Tensor
    yv: np.ndarray
    split_seed: int
    identity: dict
