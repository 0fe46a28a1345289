"""NAC-UE: neuron activation coverage of intermediate layers.

Liu, Tian, Li, Ma & Wang, "Neuron Activated Coverage: Rethinking Out-of-distribution
Detection and Generalization", ICLR 2024. For a layer with output z (N×C×H×W or N×C;
spatial maps are pooled per channel, as the authors' code does for ResNets) and the KL
divergence between the uniform distribution u and the softmax of the logits f(x),

    L(x) = KL(u ‖ softmax(f(x))) = −(1/K) Σ_k log softmax(f(x))_k − log K,

every neuron (channel) c gets the state

    φ_c(x) = sigmoid(α · z̄_c ⊙ ḡ_c / σ),    z̄_c, ḡ_c = the means over H×W of z_c and ∂L/∂z_c,

with σ the root mean square of z̄ ⊙ ḡ over the layer's neurons and the known training
samples. The states of the N known training samples are histogrammed per neuron into M
equal bins of [0, 1] (counts κ_c(b)); the coverage of bin b is

    NAC_c(b) = min(κ_c(b) / (r · N), 1),

and the score averages, over the layers and their neurons, the coverage of the bin the
sample's state falls in:

    score(x) = mean_layers mean_c NAC_c(bin(φ_c(x))),    higher = more likely known.

- Layers: the ``blocks`` role of :mod:`gradosr.detectors.intermediate` (the paper's
  CIFAR ResNet-18 choice, layer1-3 and the pooled penultimate ``avgpool``; for CNN32 its
  three block outputs and the penultimate; for LeNet its two convolution ReLUs and the
  penultimate ReLU; for a model never seen before, the last 4 leaf modules with an N×C
  or N×C×H×W output before the head). ``layers`` overrides them.
- M = 50 bins (the paper's CIFAR-10 avgpool value), r = 0.05: the paper's minimum
  count O = 50 for the 1000 training images it samples on CIFAR-10, expressed as a
  fraction of the training samples seen, so that it does not depend on the size of the
  training set. Every known training sample is used (no subsampling).
- α = 1 on the σ-standardised product. Deviation: the paper's α (100 for avgpool, 1000
  or 0.001 for layer1-3 on CIFAR-10) is swept per layer and benchmark (OpenOOD's
  automatic parameter search on OOD validation data) and tied to the scale of the
  authors' sum-pooled ResNet states; here no unknown may be seen, so the product is
  divided by its training RMS σ per layer and α stays 1 for every layer and model.
- Bins: equal width (the paper's histogram over [0, 1]; the authors' code spaces the
  edges logarithmically towards 0 and 1). Their code sums over H×W where this mean
  pools; σ absorbs the difference.

``statistic="activation"`` drops the gradient from the state, φ_c(x) = sigmoid(α · z̄_c / σ)
(σ the RMS of z̄ instead), with no backward pass: the non-gradient control of NAC as a
signal of the ``plus`` family (docs/ablation.md, round 5), not a method of the paper.

The gradient ∂L/∂z of every selected layer comes from one batched forward and backward
per batch of ``batch_size`` inputs (:func:`gradosr.gradients.capture.run`), in eval
mode; ``.grad`` of the parameters is not touched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gradosr.detectors.base import Scorer
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.intermediate import batched, channel_mean, check_batch_size, layer_pass, model_inputs, select_layers
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError


def kl_to_uniform(z: torch.Tensor) -> torch.Tensor:
    """KL(u ‖ softmax(z)) per row of the logits z (N×K) -> N."""
    k = z.shape[1]
    return -F.log_softmax(z, dim=1).mean(dim=1) - float(np.log(k))


def _product(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (channel_mean(a) * channel_mean(g)).to(device="cpu", dtype=torch.float64)


def _activation(a: torch.Tensor, g: None) -> torch.Tensor:
    return channel_mean(a).to(device="cpu", dtype=torch.float64)


#: the neuron state before standardisation: (reduce of the layer pass, loss whose gradient it reads)
STATES = {"product": (_product, kl_to_uniform), "activation": (_activation, None)}


@register
class NAC(Scorer):
    method_id = "nac"
    family = "gradient"
    paper = "Liu, Tian, Li, Ma & Wang, ICLR 2024"
    needs = ("model", "inputs")
    needs_fit = True
    _state_tensors = ("coverage_",)
    _state_meta = ("layers_", "widths_", "sigma_")

    def __init__(self, bins: int = 50, min_fraction: float = 0.05, alpha: float = 1.0,
                 layers: tuple[str, ...] | None = None, batch_size: int = 256, statistic: str = "product") -> None:
        """``bins``: M; ``min_fraction``: r (coverage saturates at r·N training states);
        ``alpha``: the sigmoid steepness on the standardised state; ``layers``: module
        names (None: the rule of the module docstring); ``statistic``: ``product`` (the
        paper's z̄ ⊙ ḡ) or ``activation`` (z̄ alone, the non-gradient control)."""
        if statistic not in STATES:
            raise ConfigError(f"nac statistic must be one of {tuple(STATES)}, got {statistic!r}")
        self.statistic = statistic
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ConfigError(f"bins must be a positive integer, got {bins!r}")
        if not 0 < min_fraction <= 1:
            raise ConfigError(f"min_fraction must lie in (0, 1], got {min_fraction!r}")
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {alpha!r}")
        self.bins, self.min_fraction, self.alpha = bins, min_fraction, alpha
        self.layers = None if layers is None else tuple(layers)
        self.batch_size = check_batch_size(batch_size)
        self.params = {"bins": bins, "min_fraction": float(min_fraction), "alpha": float(alpha),
                       "state": "sigmoid(alpha * mean_hw(z) * mean_hw(dKL(u||p)/dz) / rms_train)"
                       if statistic == "product" else "sigmoid(alpha * mean_hw(z) / rms_train)",
                       "layers": list(self.layers) if self.layers else "blocks"}

    def raw_states(self, outputs: ScorerInputs, layers: list[str]) -> list[torch.Tensor]:
        """z̄ ⊙ ḡ (or z̄) per layer (float64 N×C_l), before standardisation and sigmoid."""
        reduce, loss = STATES[self.statistic]
        parts = batched(outputs, self.batch_size, self.method_id, lambda model, xb: layer_pass(
            model, xb, layers, "output", reduce, loss, self.method_id))
        if not parts:
            return [torch.zeros(0, 0, dtype=torch.float64) for _ in layers]
        return [torch.cat([p[name] for p in parts]) for name in layers]

    def states(self, outputs: ScorerInputs) -> list[torch.Tensor]:
        """φ per fitted layer (float64 N×C_l, in [0, 1])."""
        raw = self.raw_states(outputs, self.layers_)
        return [torch.sigmoid(self.alpha * r / s) for r, s in zip(raw, self.sigma_)]

    def _bins(self, phi: torch.Tensor) -> torch.Tensor:
        return (phi * self.bins).floor().clamp(0, self.bins - 1).long()

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """Histogram of the training states per neuron -> coverage M × ΣC_l."""
        model, x = model_inputs(inputs, self.method_id)
        self.layers_ = list(self.layers) if self.layers else select_layers(model, x, "blocks")
        raw = self.raw_states(inputs, self.layers_)
        n = len(x)
        if n == 0:
            raise DataError("nac: fit needs at least one training sample")
        self.sigma_ = [max(float(r.pow(2).mean().sqrt()), 1e-300) for r in raw]
        self.widths_ = [int(r.shape[1]) for r in raw]
        cover = []
        for r, s in zip(raw, self.sigma_):
            b = self._bins(torch.sigmoid(self.alpha * r / s))  # N×C
            counts = torch.zeros(self.bins, b.shape[1], dtype=torch.float64)
            counts.scatter_add_(0, b, torch.ones_like(b, dtype=torch.float64))
            cover.append(torch.clamp(counts / (self.min_fraction * n), max=1.0))
        self.coverage_ = torch.cat(cover, dim=1)
        self._restored()

    def _restored(self) -> None:
        self.coverage_ = torch.as_tensor(self.coverage_, dtype=torch.float64)
        self.layers_, self.widths_ = list(self.layers_), [int(w) for w in self.widths_]
        self.sigma_ = [float(s) for s in self.sigma_]
        self.params = {**self.params, "layers_used": self.layers_}

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """Mean over layers of the mean coverage of each neuron's state bin -> N (float64)."""
        self.check_fitted()
        if len(outputs) == 0:
            return np.zeros(0, dtype=np.float64)
        phis = self.states(outputs)
        covers = self.coverage_.split(self.widths_, dim=1)
        per_layer = []
        for phi, cover in zip(phis, covers):
            if phi.shape[1] != cover.shape[1]:
                raise DataError(f"nac: a layer has {phi.shape[1]} neurons, fitted with {cover.shape[1]}")
            per_layer.append(cover.gather(0, self._bins(phi)).mean(dim=1))
        return torch.stack(per_layer).mean(dim=0).numpy()
