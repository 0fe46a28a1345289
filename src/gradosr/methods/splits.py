"""Proxy splits (Lee & AlRegib, ICIP 2021, §3.2, "training with known classes only"):
which known classes play the unknowns while the paper's detector is trained."""

from __future__ import annotations

import math

import numpy as np

from gradosr.errors import ConfigError


def proxy_split(num_known: int, seed: int, num_unknown: int | None = None) -> list[int]:
    """The proxy-unknown labels (sorted, among 0..K-1): ``num_unknown`` (default
    max(1, round(K/3))) drawn with ``seed``. Needs K >= 3 (2 proxy knowns remain)."""
    n_u = max(1, round(num_known / 3)) if num_unknown is None else int(num_unknown)
    if num_known - n_u < 2:
        raise ConfigError(f"{num_known} known classes leave fewer than 2 proxy knowns with {n_u} proxy unknowns; "
                          "the method needs at least 3 known classes")
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(num_known, n_u, replace=False))


def proxy_splits(num_known: int, seed: int, num_unknown: int | None = None, count: int = 1) -> list[list[int]]:
    """``count`` distinct proxy splits: :func:`proxy_split` with seeds seed, seed + 1, ...,
    skipping repeats; the first is always ``proxy_split(num_known, seed, num_unknown)``."""
    n_u = len(proxy_split(num_known, seed, num_unknown))
    possible = math.comb(num_known, n_u)
    if count > possible:
        raise ConfigError(f"proxy_ensemble {count} exceeds the {possible} distinct sets of {n_u} proxy unknowns "
                          f"among {num_known} known classes")
    splits: list[list[int]] = []
    offset = 0
    while len(splits) < count:
        split = proxy_split(num_known, seed + offset, num_unknown)
        if split not in splits:
            splits.append(split)
        offset += 1
    return splits
