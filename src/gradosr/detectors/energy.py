"""Energy score.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020.
The free energy of the logits z (K) at temperature T is
E(x; T) = -T · logsumexp_k(z_k / T); the score is the *negative* free energy,

    score(x) = T · logsumexp_k(z_k / T),     T = 1,

so that higher = more likely known (knowns have lower energy). Computed in float64 with
a stable logsumexp, finite for any finite logits.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_temperature
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register


@register
class Energy(Scorer):
    method_id = "energy"
    family = "logit"
    paper = "Liu et al., NeurIPS 2020"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        self.params = {"temperature": check_temperature(temperature)}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """T · logsumexp(z / T) of the logits N×K -> N (float64)."""
        t = self.params["temperature"]
        z = torch.as_tensor(outputs.get("logits", "energy"), dtype=torch.float64)
        return (t * torch.logsumexp(z / t, dim=1)).numpy()
