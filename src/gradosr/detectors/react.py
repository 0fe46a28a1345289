"""ReAct: rectified (clipped) penultimate activations, scored by the energy.

Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
NeurIPS 2021. On the penultimate activations h (D; ``features``, the input of the
linear head W, b), with c the p-th percentile of the known training activations,

    ReAct(h) = min(h, c)  (elementwise),
    score(x) = logsumexp_k (W · min(h, c) + b)_k,

higher = more likely known (:mod:`gradosr.detectors.shaping`: recomputing the logits
through the head is exact because it is linear; a model whose head is not its last
linear map needs its penultimate layer as ``features``).

- Layer: the penultimate layer, as in the paper's main results.
- p = 90, the paper's default, fixed (never tuned on unknowns). The percentile is
  taken over all entries of the N×D matrix of known training activations (every unit of
  every sample: one scalar c, as in the paper), with NumPy's default linear
  interpolation. The fitted c is recorded in ``params["clip"]``.
- Score: the energy (T = 1), the paper's default score on top of ReAct.

Differences from the reference implementations, deliberate:

- OpenOOD v1.5 estimates c on the in-distribution *validation* split and, in its
  automatic-parameter-search mode, may re-select p on OOD validation data; here c comes
  from the known training samples that ``fit`` receives (the paper: estimated on
  in-distribution data), since the held-out knowns serve the thresholds and no unknown
  is ever seen, and p stays 90.
- pytorch-ood 0.4 takes c itself as a constructor argument (default 1.0, the paper's
  ImageNet ResNet-50 value) rather than fitting it; a fixed c does not carry over to
  other classifiers, so it is fitted here from the percentile.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.detectors.shaping import ENERGY, ShapedEnergy, check_percent, penultimate
from gradosr.errors import DataError


@register
class ReAct(ShapedEnergy):
    method_id = "react"
    paper = "Sun, Guo & Li, NeurIPS 2021"
    needs_fit = True
    _state_meta = ("clip_",)

    def __init__(self, percentile: float = 90.0) -> None:
        """``percentile``: p of the clip value c (the paper's 90)."""
        self.percentile = percentile
        self.params = {"layer": "penultimate", "percentile": check_percent(percentile),
                       "percentile_over": "all units of all known training samples", "score": ENERGY}

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """c = the p-th percentile of every entry of the training activations."""
        h = penultimate(inputs, "react")
        if h.numel() == 0:
            raise DataError("react: fit needs at least one training sample with at least one unit")
        self.clip_ = float(np.percentile(h.numpy().ravel(), self.params["percentile"]))
        self._restored()

    def _restored(self) -> None:
        self.clip_ = float(self.clip_)
        self.params = {**self.params, "clip": self.clip_}

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        """min(h, c)."""
        return h.clamp(max=self.clip_)
