"""Maximum softmax probability (MSP).

Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
Examples in Neural Networks", ICLR 2017. Score = max_k softmax(z)_k.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register


@register
class MSP(Scorer):
    method_id = "msp"
    family = "logit"
    paper = "Hendrycks & Gimpel, ICLR 2017"
    params: dict = {}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Max softmax probability of the logits N×K -> N (float64)."""
        z = torch.as_tensor(outputs.get("logits", "msp"), dtype=torch.float64)
        return torch.softmax(z, dim=1).max(dim=1).values.numpy()
