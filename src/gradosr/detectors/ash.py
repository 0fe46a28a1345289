"""ASH: activation shaping of the penultimate activations (ASH-S, ASH-B, ASH-P).

Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR 2023. Per sample, on its penultimate activations
h (D; ``features``, the input of the linear head W, b), with the pruning percentile p:

    k  = D − round(D·p/100)        (at least 1; the top (100 − p)% of the D units),
    T  = the k largest entries of h (per sample; ties to the lower index),
    s1 = Σ_i h_i                   (before pruning),
    s2 = Σ_{i∈T} h_i               (after pruning),

    ASH-P:  h'_i = h_i                 for i ∈ T, 0 otherwise     (prune),
    ASH-B:  h'_i = s1 / k              for i ∈ T, 0 otherwise     (binarise, sum kept),
    ASH-S:  h'_i = h_i · exp(s1 / s2)  for i ∈ T, 0 otherwise     (prune and scale),

    score(x) = logsumexp_k (W h' + b)_k,

higher = more likely known (:mod:`gradosr.detectors.shaping`: recomputing the logits
through the head is exact because it is linear; a model whose head is not its last
linear map needs its penultimate layer as ``features``). Where s2 ≤ 0 (h = 0 for
non-negative activations) ASH-S uses the factor 1 (see :mod:`gradosr.detectors.shaping`
on signed activations).

- Layer: the penultimate activations (after global average pooling), where the authors'
  code applies ASH for the paper's main results.
- Percentile: per sample, over its D units (the paper's per-sample threshold; no
  training statistics, so nothing is fitted).
- p: the paper's ImageNet settings, fixed (never tuned on unknowns): ASH-P p = 60,
  ASH-B p = 65, ASH-S p = 90. One rule for all protocols: the ImageNet table is the
  paper's main result, reported for both of its ImageNet architectures, and for the
  variant it recommends, ASH-S, the authors' released configurations use p = 90 for
  ImageNet and for CIFAR-10 alike; the paper's separate CIFAR settings are not used.
  Recorded in ``params["percentile"]``.
- Score: the energy (T = 1), the paper's score.

Differences from the reference implementations, deliberate:

- OpenOOD v1.5 has one ``ash`` postprocessor, which applies ASH-B, with p = 90 by
  default and an automatic search of p on OOD validation data; here the three variants
  are three methods, each with the paper's own p, never searched.
- pytorch-ood 0.4 uses one default for every variant (a fraction, 0.65) and
  ``torch.topk`` (ties in arbitrary order); here each variant has the paper's p, ties
  go to the lower index (with ReLU zeros ASH-B's kept set would otherwise be
  arbitrary), k is at least 1 (for small D, where D − round(D·p/100) can be 0), and
  s2 ≤ 0 gives a factor of 1 (s2 = 0 gives NaN there).
"""

from __future__ import annotations

import torch

from gradosr.detectors.registry import register
from gradosr.detectors.shaping import ENERGY, ShapedEnergy, check_percent, kept_count, sum_ratio, top_mask

VARIANTS = ("s", "b", "p")


def ash(h: torch.Tensor, percentile: float, variant: str) -> torch.Tensor:
    """ASH-S, ASH-B or ASH-P (``variant`` "s", "b", "p") of the activations h (N×D, float64)."""
    k = kept_count(h.shape[1], percentile)
    kept = top_mask(h, k)
    if variant == "p":
        return h * kept
    if variant == "b":
        return kept * (h.sum(dim=1, keepdim=True) / k)
    if variant == "s":
        return h * kept * torch.exp(sum_ratio(h, kept))[:, None]
    raise ValueError(f"unknown ASH variant {variant!r}; one of {VARIANTS}")


class _ASH(ShapedEnergy):
    """ASH with one variant (``variant``) at pruning percentile ``percentile``."""

    paper = "Djurisic, Bozanic, Ashok & Liu, ICLR 2023"
    variant = ""

    def __init__(self, percentile: float) -> None:
        self.percentile = percentile
        self.params = {"layer": "penultimate", "variant": f"ASH-{self.variant.upper()}",
                       "percentile": check_percent(percentile),
                       "percentile_over": "per sample, over its D units",
                       "kept": "k = D - round(D*p/100), at least 1", "score": ENERGY}

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        return ash(h, self.params["percentile"], self.variant)


@register
class AshS(_ASH):
    method_id = "ash_s"
    variant = "s"

    def __init__(self, percentile: float = 90.0) -> None:
        """``percentile``: p, the share of units pruned per sample (the paper's ASH-S@90)."""
        super().__init__(percentile)


@register
class AshB(_ASH):
    method_id = "ash_b"
    variant = "b"

    def __init__(self, percentile: float = 65.0) -> None:
        """``percentile``: p, the share of units pruned per sample (the paper's ASH-B@65)."""
        super().__init__(percentile)


@register
class AshP(_ASH):
    method_id = "ash_p"
    variant = "p"

    def __init__(self, percentile: float = 60.0) -> None:
        """``percentile``: p, the share of units pruned per sample (the paper's ASH-P@60)."""
        super().__init__(percentile)
