"""Gradient-based uncertainty: the sum of squared gradient norms (no detector).

Lee & AlRegib, "Gradients as a Measure of Uncertainty in Neural Networks", ICIP 2020.
The loss is the binary cross-entropy between the softmax outputs p = softmax(z) (N
outputs) and the all-ones *confounding* label, J(x) = -Σ_k log p_k; the score sums, over
every parameter tensor θ_p of the network, the squared L2 norm of its gradient:

    score(x) = Σ_p ‖∇_{θ_p} J(x)‖².

Orientation: with all N ones the logit gradient is dJ/dz = N p - 1 = N (p - 1/N), which
vanishes for a uniform output and grows with confidence, so larger = more likely known
and the score is +Σ (the 2020 paper reads large gradients as uncertainty; with this
softmax/all-ones choice the magnitude is larger for confident inputs, docs/design.md, "The method").

Computed with the per-sample gradient engine (:func:`gradosr.gradients.squared_norms`,
target "confounding", n_ones = N, output "softmax", all parameters), in batches of
inputs to bound memory. The model runs in eval mode; training flags and ``.grad`` are
left as they were.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.detectors.odin import _model_and_inputs
from gradosr.errors import ConfigError
from gradosr.gradients import squared_norms


@register
class GradUnc(Scorer):
    method_id = "gradunc"
    family = "gradient"
    paper = "Lee & AlRegib, ICIP 2020"
    needs = ("model", "inputs")
    params: dict = {"target": "confounding", "n_ones": "N", "output": "softmax",
                    "params": "all"}

    def __init__(self, batch_size: int = 256) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.params = dict(GradUnc.params)
        self.batch_size = batch_size

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Σ_p ‖∇_{θ_p} J(x)‖² of the inputs N×C×H×W -> N (float64)."""
        model, x = _model_and_inputs(outputs, self.method_id)
        scores = []
        for xb in x.split(self.batch_size):
            r, _ = squared_norms(model, xb, target="confounding", n_ones=None,
                                 output="softmax", params=None)
            scores.append(r.detach().to(device="cpu", dtype=torch.float64).sum(dim=1))
        if not scores:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(scores).numpy()
