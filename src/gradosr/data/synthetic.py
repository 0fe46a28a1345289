"""Synthetic far-OOD outlier sets, generated from a seed with no download.

``--unknown-dataset synthetic-<name>`` (protocol ``cross``): as many images as the known
test set, of its H×W×C, drawn by ``numpy.random.default_rng(seed)`` where ``seed`` is the
split's seed (and the set's index in :data:`GENERATORS`, so two sets of one seed differ).
Pixel values are generated in [0, 1] and stored as uint8 (×255, rounded).

==============  ============================================================  =============================================
name            construction                                                   source
==============  ============================================================  =============================================
gaussian        i.i.d. N(0.5, 1) per pixel and channel, clipped to [0, 1]       Liang, Li & Srikant, ICLR 2018 (ODIN)
uniform         i.i.d. U[0, 1] per pixel and channel                             Liang, Li & Srikant, ICLR 2018 (ODIN)
blobs           Bernoulli(0.7) pixels, Gaussian blur (σ = 1.5 px) per channel,  Hendrycks, Mazeika & Dietterich, ICLR 2019
                values below 0.75 set to 0                                      (Outlier Exposure)
permuted        each known test image with its pixels' positions permuted      Hein, Andriushchenko & Bitterwolf, CVPR 2019
                (one random permutation per image, shared by its channels)
rademacher      i.i.d. ±1 per pixel and channel, mapped to {0, 1}                Hendrycks, Mazeika & Dietterich, ICLR 2019
smooth          uniform noise blurred (σ = 2.5 px) and its contrast stretched   Hein, Andriushchenko & Bitterwolf, CVPR 2019;
                to the full [0, 1] range per image (low-frequency noise)        Meinke & Hein, ICLR 2020
==============  ============================================================  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

PREFIX = "synthetic-"


def _gaussian(rng, shape, like):
    return np.clip(rng.normal(0.5, 1.0, shape), 0.0, 1.0)


def _uniform(rng, shape, like):
    return rng.uniform(0.0, 1.0, shape)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of N×H×W×C over H and W only (every image and channel on its own)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect")


def _blobs(rng, shape, like):
    x = _blur(rng.binomial(1, 0.7, shape).astype(np.float64), 1.5)
    x[x < 0.75] = 0.0
    return x


def _permuted(rng, shape, like):
    n, h, w, c = shape
    flat = like.reshape(n, h * w, c).astype(np.float64) / 255.0
    order = np.argsort(rng.random((n, h * w)), axis=1)
    return np.take_along_axis(flat, order[..., None], axis=1).reshape(shape)


def _rademacher(rng, shape, like):
    return rng.integers(0, 2, shape).astype(np.float64)


def _smooth(rng, shape, like):
    x = _blur(rng.uniform(0.0, 1.0, shape), 2.5)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


@dataclass(frozen=True)
class Generator:
    """One synthetic set: ``make(rng, (N, H, W, C), known_test_images)`` -> floats in [0, 1]."""

    name: str
    make: Callable[[np.random.Generator, tuple[int, int, int, int], np.ndarray], np.ndarray]
    description: str
    source: str


GENERATORS: dict[str, Generator] = {g.name: g for g in [
    Generator("gaussian", _gaussian, "i.i.d. N(0.5, 1) pixels clipped to [0, 1]", "Liang et al., ICLR 2018"),
    Generator("uniform", _uniform, "i.i.d. U[0, 1] pixels", "Liang et al., ICLR 2018"),
    Generator("blobs", _blobs, "blurred Bernoulli(0.7) pixels thresholded at 0.75", "Hendrycks et al., ICLR 2019"),
    Generator("permuted", _permuted, "known test images with permuted pixel positions", "Hein et al., CVPR 2019"),
    Generator("rademacher", _rademacher, "i.i.d. ±1 pixels mapped to {0, 1}", "Hendrycks et al., ICLR 2019"),
    Generator("smooth", _smooth, "blurred uniform noise, contrast stretched", "Hein et al., CVPR 2019"),
]}


def synthetic_names() -> list[str]:
    """The dataset ids of the synthetic sets, ``synthetic-<name>``."""
    return [PREFIX + name for name in GENERATORS]


def is_synthetic(dataset: str) -> bool:
    return isinstance(dataset, str) and dataset.startswith(PREFIX)


def generate(dataset: str, like: np.ndarray, seed: int) -> np.ndarray:
    """``len(like)`` images of ``like``'s H×W×C (uint8 N×H×W×C) of the synthetic set
    ``dataset`` (``synthetic-<name>``), deterministic in ``seed``."""
    from gradosr.errors import ConfigError

    name = dataset[len(PREFIX):] if is_synthetic(dataset) else dataset
    if name not in GENERATORS:
        raise ConfigError(f"unknown synthetic set {dataset!r}; known: {', '.join(synthetic_names())}")
    index = list(GENERATORS).index(name)
    rng = np.random.default_rng([int(seed), index])
    x = GENERATORS[name].make(rng, tuple(like.shape), like)
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
