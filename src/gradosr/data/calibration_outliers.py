"""Outliers the fit makes itself from held-out knowns, to calibrate a combination.

The ``learned`` combination of the fused detector (:mod:`gradosr.detectors.calibration`)
weighs its signals by how well each separates held-out knowns from outliers made *from
those knowns*; no unknown class is ever seen. Each generator maps a chunk of model inputs
x (float n×C×H×W) with their labels (int n, 0..K-1) to one outlier per row (float
n×C×H×W; a ``mixup`` row with no partner of another class in its chunk is left out).

Both are exact in model-input space: a per-channel affine normalisation commutes with a
convex combination and with moving pixels, so generating from normalised inputs gives the
normalised outliers of the raw images.

========  ===========================================================  ===========================================
name      construction                                                 source
========  ===========================================================  ===========================================
mixup     λ x_i + (1−λ) x_j, j a random row of another class of the    Zhang et al., ICLR 2018 (mixup); Zhou, Ye &
          same chunk, λ ~ U[0.4, 0.6]: an image between two known      Zhan, CVPR 2021 (PROSER's data placeholders
          classes, a near-OOD stand-in                                 between classes)
jigsaw    the image cut into a 4×4 grid of tiles, shuffled by a random  Noroozi & Favaro, ECCV 2016 (jigsaw
          non-identity permutation: local structure kept, global       puzzles); Li et al., CVPR 2021 (CutPaste)
          shape broken (where 4 does not divide a side, the last
          row or column of tiles, with the remainder, stays put)
========  ===========================================================  ===========================================

Neither is one of the synthetic test sets of :mod:`gradosr.data.synthetic`; ``jigsaw``
moves tiles, the ``permuted`` set moves single pixels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gradosr.errors import ConfigError

GRID = 4


def _mixup(rng: np.random.Generator, x: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    labels = np.asarray(labels)
    rows, partners = [], []
    for i in range(len(x)):
        others = np.flatnonzero(labels != labels[i])
        if len(others):
            rows.append(i)
            partners.append(int(others[rng.integers(len(others))]))
    if not rows:
        return x[:0].clone()
    lam = torch.as_tensor(rng.uniform(0.4, 0.6, len(rows)), dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x[rows] + (1 - lam) * x[partners]


def _jigsaw(rng: np.random.Generator, x: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < GRID or w < GRID:
        raise ConfigError(f"the jigsaw outliers need images of at least {GRID}×{GRID} pixels, got {h}×{w}")
    out = x.clone()
    # tiles of the full step size (all but the last row/column when the size does not divide)
    sh, sw = h // GRID, w // GRID
    full = [(r, c) for r in range(GRID) for c in range(GRID)
            if (r < GRID - 1 or h % GRID == 0) and (c < GRID - 1 or w % GRID == 0)]
    for i in range(len(x)):
        perm = np.arange(len(full))
        while np.array_equal(perm, np.arange(len(full))):
            perm = rng.permutation(len(full))
        for (r, c), p in zip(full, perm):
            pr, pc = full[p]
            out[i, ..., r * sh:(r + 1) * sh, c * sw:(c + 1) * sw] = x[i, ..., pr * sh:(pr + 1) * sh,
                                                                       pc * sw:(pc + 1) * sw]
    return out


#: name -> generator(rng, x n×C×H×W, labels n) -> outliers m×C×H×W
GENERATORS: dict[str, Callable[[np.random.Generator, torch.Tensor, np.ndarray], torch.Tensor]] = {
    "mixup": _mixup,
    "jigsaw": _jigsaw,
}


def check_generators(names) -> tuple[str, ...]:
    """``names`` as a tuple, if they are distinct generator names (else ConfigError)."""
    names = tuple(names)
    bad = [n for n in names if n not in GENERATORS]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"calibration outliers must be distinct names among {list(GENERATORS)}, got {list(names)}")
    return names


def make_outliers(chunks, names, seed: int):
    """Outlier chunks (float m×C×H×W) of every generator in ``names`` for each
    (x, labels) chunk of ``chunks``, in order; deterministic in ``seed`` and the chunking."""
    names = check_generators(names)
    rng = np.random.default_rng([int(seed), 0x0C417B])
    for x, labels in chunks:
        for name in names:
            out = GENERATORS[name](rng, x, np.asarray(labels))
            if len(out):
                yield out
