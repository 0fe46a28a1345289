"""Per-sample tensor helpers shared by the layer rules, and their memory budget."""

from __future__ import annotations

from torch import Tensor

#: elements of the largest temporary a rule builds at once (unfolded input, per-sample
#: gradients or Gram matrices); rules split the chunk into sub-batches below it.
FAST_BUDGET = 2**24


def sqsum(t: Tensor) -> Tensor:
    """Per-sample sum of squares of ``t`` (shape ``(n, ...)``) -> ``(n,)``."""
    return t.reshape(t.shape[0], -1).square().sum(dim=1)


def sqsum_product(s: Tensor, t: Tensor) -> Tensor:
    """Per-sample ``sum(s * t)`` of two ``(n, ...)`` tensors -> ``(n,)``."""
    return (s * t).reshape(s.shape[0], -1).sum(dim=1)


def sub_batches(n: int, per_sample: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most FAST_BUDGET elements of ``per_sample`` each."""
    step = max(1, FAST_BUDGET // max(per_sample, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
