"""Gradient-based representations of whole datasets, and their input transform.

Lee & AlRegib, ICIP 2021, Eq. 1: r(x) = [‖∇θ_0 J(x)‖², …, ‖∇θ_{P-1} J(x)‖²], computed
by :func:`gradosr.gradients.squared_norms` batch by batch (streamed: memory does not
grow with the dataset) and then log-transformed and standardised for the detector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gradosr.distributed import map_rows
from gradosr.errors import ConfigError
from gradosr.gradients import squared_norms
from gradosr.gradients.targets import OUTPUTS, TARGETS, check_n_ones, check_target
from gradosr.options import option
from gradosr.progress import progress_bar

#: squared norms below this are clamped before the log (a dead ReLU layer gives 0)
LOG_FLOOR = 1e-30


@dataclass(frozen=True)
class RepresentationConfig:
    """Which gradients make the representation.

    Attributes:
        target: ``confounding`` (the paper), ``predicted`` or ``uniform``.
        n_ones: ones in the confounding label (None = all N outputs).
        output: ``softmax`` or ``sigmoid`` outputs for the confounding loss.
        params: names of the parameter tensors (None = every ``named_parameters()``).
        log: take log(r) before standardising.
    """

    target: str = option("confounding", help="loss target whose gradients make the representation",
                         choices=TARGETS)
    n_ones: int | None = option(None, kind="int", help="ones in the confounding label (default N; 0 or 2..N)")
    output: str = option("softmax", help="activation of the confounding loss", choices=OUTPUTS)
    params: tuple[str, ...] | None = option(None, kind="csv",
                                            help="comma-separated parameter names (default: every parameter)")
    log: bool = option(True, help="do not take the log of the squared norms")

    def __post_init__(self) -> None:
        check_target(self.target, self.output)
        if self.n_ones is not None:
            check_n_ones(self.n_ones)
        if self.params is not None:
            object.__setattr__(self, "params", tuple(self.params))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = list(self.params) if self.params is not None else None
        return d


def extract(model: nn.Module, x: torch.Tensor, config: RepresentationConfig, batch_size: int = 256,
            progress: bool = False, desc: str = "gradients") -> tuple[torch.Tensor, list[str]]:
    """Squared-norm representations of every row of ``x`` (model inputs N×C×H×W).

    Returns (features float64 N×P on the CPU, parameter names). Batches of
    ``batch_size`` are moved to the model's device one at a time.

    In a distributed run (torchrun) every process extracts its contiguous shard of the
    rows, cut at multiples of ``batch_size`` so that each batch holds the same rows as in
    one process, and the shards are all-gathered (:func:`gradosr.distributed.map_rows`):
    every process returns the features of all rows.
    """
    return map_rows(lambda xs: _extract_local(model, xs, config, batch_size, progress, desc), x, align=batch_size)


def _extract_local(model: nn.Module, x: torch.Tensor, config: RepresentationConfig, batch_size: int,
                   progress: bool, desc: str) -> tuple[torch.Tensor, list[str]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    params = list(config.params) if config.params is not None else None
    out, names = [], None
    starts = range(0, len(x), batch_size)
    for start in progress_bar(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        xb = x[start:start + batch_size].to(device=device, dtype=dtype)
        feats, names = squared_norms(model, xb, target=config.target, n_ones=config.n_ones,
                                     output=config.output, params=params)
        out.append(feats.detach().to("cpu", torch.float64))
    if names is None:  # empty input
        feats, names = squared_norms(model, x[:0].to(device=device, dtype=dtype), target=config.target,
                                     n_ones=config.n_ones, output=config.output, params=params)
        return feats.to("cpu", torch.float64), names
    return torch.cat(out), names


def transform(r: torch.Tensor, log: bool) -> torch.Tensor:
    """log(max(r, LOG_FLOOR)) when ``log``, else r (float64 N×P)."""
    r = r.to(torch.float64)
    return torch.log(r.clamp_min(LOG_FLOOR)) if log else r


@dataclass
class Standardizer:
    """Per-feature standardisation (x - mean) / std; std below 1e-12 counts as 1."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> "Standardizer":
        if len(x) < 2:
            raise ConfigError("standardisation needs at least 2 samples")
        x = x.to(torch.float64)
        std = x.std(0, unbiased=False)
        return cls(x.mean(0), torch.where(std < 1e-12, torch.ones_like(std), std))

    @classmethod
    def identity(cls, p: int) -> "Standardizer":
        return cls(torch.zeros(p, dtype=torch.float64), torch.ones(p, dtype=torch.float64))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float64) - self.mean) / self.std


def check_params_exist(names: list[str], model: nn.Module) -> None:
    """ConfigError unless every name in ``names`` is a parameter of ``model``."""
    have = {n for n, _ in model.named_parameters()}
    missing = [n for n in names if n not in have]
    if missing:
        raise ConfigError(f"the model has no parameters {missing[:3]}: the proxy and final classifiers "
                          "must share parameter names")


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
