"""Maximum logit score (MLS).

Vaze, Han, Vedaldi & Zisserman, "Open-Set Recognition: a Good Closed-Set Classifier is
All You Need?", ICLR 2022. Score = max_k z_k, the largest (unnormalised) logit.
Orientation: higher = more likely known.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import ClassifierOutputs, OutputScorer


class MLS(OutputScorer):
    method_id = "mls"
    params: dict = {}

    def score_samples(self, outputs: ClassifierOutputs) -> np.ndarray:
        """Max logit of the logits N×K -> N (float64)."""
        z = torch.as_tensor(outputs.logits, dtype=torch.float64)
        return z.max(dim=1).values.numpy()
