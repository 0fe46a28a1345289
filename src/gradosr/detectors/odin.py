"""ODIN: temperature scaling plus input preprocessing.

Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection
in Neural Networks", ICLR 2018. With S(x; T) = softmax(f(x) / T) and ŷ = argmax_k f(x)_k,
the input is moved a small step against the gradient of the predicted class's loss,

    x̃ = x - ε · sign(-∇_x log S_ŷ(x; T)),

and the score is the maximum tempered softmax of the perturbed input,

    score(x) = max_k S_k(x̃; T),      T = 1000, ε = 0.0014 (the paper's CIFAR values).

Orientation: higher = more likely known. The perturbation is applied to the *model
inputs*, i.e. after the preprocessing (already normalised by the stored mean/std), so ε
is in normalised units (the paper perturbs its normalised inputs too).

The model runs in eval mode (every module's training flag is restored afterwards),
in batches; the input gradient comes from ``torch.autograd.grad`` with respect to the
inputs only, so the parameters' ``.grad`` is never touched. Inputs are moved batch by
batch to the model's device and dtype; the final softmax is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError
from gradosr.models import eval_mode


def _model_and_inputs(outputs: ScorerInputs, method: str) -> tuple[nn.Module, Tensor]:
    model, x = outputs.model, outputs.inputs
    if model is None or x is None:
        raise DataError(f"{method} needs the model and its inputs")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        desc = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor)
                else type(x).__name__)
        raise DataError(f"{method}: inputs must be a floating-point tensor (N, ...), got {desc}")
    if outputs.logits is not None and len(x) != len(outputs.logits):
        raise DataError(f"{method}: {len(x)} inputs for {len(outputs.logits)} logits")
    return model, x


@register
class ODIN(Scorer):
    method_id = "odin"
    family = "logit"
    paper = "Liang, Li & Srikant, ICLR 2018"
    needs = ("logits", "model", "inputs")

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014,
                 batch_size: int = 256) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        if not epsilon >= 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.temperature, self.epsilon = temperature, epsilon
        self.params = {"temperature": float(temperature), "epsilon": float(epsilon)}
        self.batch_size = batch_size

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Max tempered softmax of the perturbed inputs N×C×H×W -> N (float64)."""
        model, x = _model_and_inputs(outputs, self.method_id)
        t, eps = self.params["temperature"], self.params["epsilon"]
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else x.dtype
        scores = []
        with eval_mode(model):
            for xb in x.split(self.batch_size):
                xb = xb.detach().to(device=device, dtype=dtype).requires_grad_(True)
                with torch.enable_grad():
                    z = model(xb)
                    pred = z.detach().argmax(dim=1, keepdim=True)
                    # samples are independent in eval mode: the sum's gradient is per sample
                    loss = -F.log_softmax(z / t, dim=1).gather(1, pred).sum()
                    (g,) = torch.autograd.grad(loss, xb)
                # -log S_ŷ is the loss, so sign(-∇ log S_ŷ) = sign(∇ loss)
                x_tilde = xb.detach() - eps * torch.sign(g)
                with torch.no_grad():
                    zt = model(x_tilde).to(torch.float64)
                scores.append(torch.softmax(zt / t, dim=1).max(dim=1).values.cpu())
        if not scores:
            return np.zeros(0, dtype=np.float64)
        return torch.cat(scores).numpy()
