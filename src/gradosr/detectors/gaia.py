"""GAIA-Z and GAIA-A: abnormality of the attribution gradients of intermediate layers.

Chen, Li, Qu, Wang, Wan & Xiao, "GAIA: Delving into Gradient-based Attribution
Abnormality for Out-of-distribution Detection", NeurIPS 2023. Both are training-free
(no fit) and read the gradients of intermediate feature maps A^l (N×C×H×W; an N×C
output counts as H = W = 1), as the authors' code (github.com/JGEthanChen/GAIA-OOD,
``cal_method.py``) computes them.

**GAIA-Z, zero-deflation abnormality** (``gaia_z``). With G^l = ∂ max_k f_k(x) / ∂A^l
(the gradient of the largest logit) at the output of every normalisation layer, the
share of non-zero partial derivatives of each channel c,

    ρ^l_c = (1/HW) Σ_ij 1[G^l_{c,ij} ≠ 0],

is squared and averaged over all channels of all layers; in-distribution gradients are
sparser (more zeros: the ReLU after the normalisation layer cuts them), so

    score(x) = − mean_{l,c} (ρ^l_c)²,    higher = more likely known.

Layers: the ``norms`` role of :mod:`gradosr.detectors.intermediate`: every BatchNorm
(the paper's CIFAR ``bn`` hook; ResNet18: its 20 BatchNorm2d, LeNet: 2, CNN32: 9);
models without normalisation layers: every Linear/Conv layer except the head.

**GAIA-A, channel-wise average abnormality** (``gaia_a``). With h the head's input (the
penultimate features), the output component

    O(x) = sqrt( mean_d |∂ Σ_k log softmax(f(x))_k / ∂h_d| )

and, for the inner layers l, the channel-wise averages of the gradient of Σ_d h_d,

    ā^l_c = (1/HW) Σ_ij ∂(Σ_d h_d) / ∂A^l_{c,ij},

    score(x) = − mean_{l,c} ( |ā^l_c| / O(x) )²,    higher = more likely known.

Layers: the ``late_norms`` role: the last half of the normalisation layers (ResNet18:
exactly the BatchNorms of layer3 and layer4, the paper's CIFAR ``before_head`` hooks).
The authors take O from the gradient at the last feature map (ResNet layer4, averaged
over H×W); with a global-average-pool head that is ∂/∂h divided by H×W, the same for
every sample, so O here differs from theirs by the constant factor sqrt(H×W), which
does not change the ranking (and makes the score defined for heads on N×D features).

Both: the model runs in eval mode; one batched forward and one backward per batch of
``batch_size`` inputs (:func:`gradosr.gradients.capture.run`, tensor hooks on the
layers' outputs, which see the gradient before an in-place ReLU changes the output);
``.grad`` of the parameters is not touched. Float64 where the model is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.intermediate import batched, channel_mean, check_batch_size, layer_pass, select_layers
from gradosr.detectors.registry import register
from gradosr.models import find_head


def _nonzero_share(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return channel_mean((g != 0).to(torch.float64)).cpu()


def _channel_average(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return channel_mean(g).to(device="cpu", dtype=torch.float64)


def _max_logit(z: torch.Tensor) -> torch.Tensor:
    return z.max(dim=1).values


class _GAIA(Scorer):
    family = "gradient"
    paper = "Chen, Li, Qu, Wang, Wan & Xiao, NeurIPS 2023"
    needs = ("model", "inputs")
    role = ""

    def __init__(self, layers: tuple[str, ...] | None = None, batch_size: int = 256) -> None:
        """``layers``: module names (None: the rule of the module docstring)."""
        self.layers = None if layers is None else tuple(layers)
        self.batch_size = check_batch_size(batch_size)
        self.params = {"layers": list(self.layers) if self.layers else self.role}

    def _layers(self, model, x) -> list[str]:
        return list(self.layers) if self.layers else select_layers(model, x, self.role)

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """The negated abnormality of the inputs N×C×H×W -> N (float64)."""
        parts = batched(outputs, self.batch_size, self.method_id, self._batch)
        if not parts:
            return np.zeros(0, dtype=np.float64)
        return (-torch.cat(parts)).numpy()


@register
class GAIAZ(_GAIA):
    method_id = "gaia_z"
    role = "norms"

    def _batch(self, model, xb) -> torch.Tensor:
        res = layer_pass(model, xb, self._layers(model, xb), "grad", _nonzero_share, _max_logit, self.method_id)
        return torch.cat(list(res.values()), dim=1).pow(2).mean(dim=1)


@register
class GAIAA(_GAIA):
    method_id = "gaia_a"
    role = "late_norms"

    def _batch(self, model, xb) -> torch.Tensor:
        head = find_head(model)
        seen: dict[str, torch.Tensor] = {}
        hook = head.register_forward_hook(lambda m, i, o: seen.update(h=i[0], z=o))

        def loss(z):
            return seen["h"].reshape(len(z), -1).sum(dim=1)

        try:
            res = layer_pass(model, xb, self._layers(model, xb), "grad", _channel_average, loss, self.method_id)
        finally:
            hook.remove()
        z = seen["z"].detach().to(torch.float64).cpu()
        w = head.weight.detach().to(device="cpu", dtype=torch.float64)
        # ∂ Σ_k log softmax_k / ∂z = 1 − K softmax(z); through the linear head: (1 − K p) W
        dh = (1.0 - z.shape[1] * F.softmax(z, dim=1)) @ w
        out = dh.abs().mean(dim=1).sqrt().clamp_min(1e-300)
        inner = torch.cat(list(res.values()), dim=1).abs()
        return (inner / out[:, None]).pow(2).mean(dim=1)
