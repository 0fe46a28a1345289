"""Maximum logit score (MLS).

Vaze, Han, Vedaldi & Zisserman, "Open-Set Recognition: a Good Closed-Set Classifier is
All You Need?", ICLR 2022. Score = max_k z_k, the largest (unnormalised) logit.
Orientation: higher = more likely known.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register


@register
class MLS(Scorer):
    method_id = "mls"
    family = "logit"
    paper = "Vaze et al., ICLR 2022"
    params: dict = {}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Max logit of the logits N×K -> N (float64)."""
        z = torch.as_tensor(outputs.get("logits", "mls"), dtype=torch.float64)
        return z.max(dim=1).values.numpy()
