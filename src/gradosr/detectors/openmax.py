"""OpenMax.

Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016. The activation vectors
(AV) are the logits v (K).

**Fit** (known training samples with labels 0..K-1). For each class k:

- the mean activation vector μ_k of the training samples of class k that the
  classifier classifies correctly (argmax v = k; ties go to the lowest index);
- their distances to μ_k, with the Euclidean-cosine ("eucos") distance of the
  authors' reference code,

      d(v, μ) = ‖v − μ‖₂ / 200 + (1 − cos(v, μ)),

  where cos(v, μ) = v·μ / (‖v‖‖μ‖), taken as 0 when either vector is zero;
- a Weibull model on the tail, the ``tail_size`` = 20 largest of those distances (all
  of them when the class has fewer). The model is the two-parameter Weibull
  (location fixed at 0, the lower bound of any distance),
  W_k(d) = 1 − exp(−(d/λ_k)^{c_k}) for d ≥ 0, with shape c_k and scale λ_k the *exact*
  maximum-likelihood estimates on the tail: c solves the profile-likelihood equation

      Σ x_i^c ln x_i / Σ x_i^c − 1/c − (1/n) Σ ln x_i = 0

  (its left side increases strictly in c, so the root is unique; found with
  ``scipy.optimize.brentq`` to machine precision) and λ = ((1/n) Σ x_i^c)^{1/c}. This is
  the maximiser that ``scipy.stats.weibull_min.fit(tail, floc=0)`` approximates with a
  Nelder–Mead search (to about 1e-4); the result is deterministic. (libMR's FitHigh
  instead shifts the tail so that its smallest value sits at 10000 and fits a Weibull
  there, i.e. a location of min(tail) − 10000; the fixed-zero location used here needs
  no such constant.)

  A class with fewer than 2 correctly classified training samples, or whose tail is
  degenerate (a zero distance, or all tail distances equal), raises DataError: there is
  no distribution to fit. There is no fallback to misclassified samples.

**Score.** With α = K (every rank is revised), let s(1), …, s(K) be the classes sorted
by decreasing logit (a stable sort: ties keep the lower class first). For i = 1..α,

    ω_{s(i)} = 1 − ((α − i + 1) / α) · W_{s(i)}(d(v, μ_{s(i)})),

the revised logits are v̂_j = v_j ω_j (j = 1..K), the unknown logit is
v̂_0 = Σ_j v_j (1 − ω_j), and P = softmax([v̂_0, v̂_1, …, v̂_K]). The score is

    score(v) = 1 − P(unknown) = Σ_{j ≥ 1} P_j,

higher = more likely known. Computed in float64 with a stable softmax; the sum of the
known probabilities avoids the cancellation of 1 − P_0 when P_0 is close to 1.
"""

from __future__ import annotations

import math

import numpy as np

from gradosr.detectors.base import Scorer, check_chunk_size, check_labels, float_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import ConfigError, DataError

TAIL_SIZE = 20
EUCLID_SCALE = 200.0


def _logits64(outputs: ScorerInputs, what: str) -> np.ndarray:
    v = float_rows(outputs, "logits", f"OpenMax ({what})")
    if v.shape[1] < 1:
        raise DataError(f"OpenMax ({what}): logits must be N×K with K >= 1, got shape {tuple(v.shape)}")
    return v


def eucos_distances(v: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Eucos distances N×K of the rows of v (N×K') to the rows of means (K×K')."""
    diff = v[:, None, :] - means[None, :, :]
    euclid = np.sqrt(np.einsum("nkj,nkj->nk", diff, diff))
    norms = np.linalg.norm(v, axis=1)[:, None] * np.linalg.norm(means, axis=1)[None, :]
    dots = v @ means.T
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return euclid / EUCLID_SCALE + (1.0 - cos)


def fit_weibull(tail: np.ndarray) -> tuple[float, float]:
    """Exact MLE (shape c, scale λ) of the Weibull with location 0 on positive values."""
    x = np.asarray(tail, dtype=np.float64)
    if len(x) < 2 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise DataError("the Weibull tail needs at least 2 positive, finite distances")
    top = x.max()
    logy = np.log(x / top)  # <= 0, max 0: y^c never overflows and its sum is >= 1
    if logy.min() == 0.0:
        raise DataError("the Weibull tail is degenerate: all its distances are equal")
    mean_logy = logy.mean()

    def profile(c: float) -> float:
        w = np.exp(c * logy)
        return float((w * logy).sum() / w.sum() - 1.0 / c - mean_logy)

    lo, hi = 1.0, 1.0
    while profile(lo) > 0:
        lo /= 2.0
    while profile(hi) < 0:
        hi *= 2.0
    from scipy.optimize import brentq  # here: importing scipy.optimize costs every command 0.7 s

    c = brentq(profile, lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)
    scale = top * math.exp(math.log(np.exp(c * logy).mean()) / c)
    return float(c), float(scale)


def weibull_cdf(d: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W(d) = 1 − exp(−(d/λ)^c) for d ≥ 0 (0 below), elementwise with broadcasting."""
    d = np.maximum(d, 0.0)
    return -np.expm1(-((d / scale) ** shape))


@register
class OpenMax(Scorer):
    method_id = "openmax"
    family = "logit"
    paper = "Bendale & Boult, CVPR 2016"
    needs_fit = True
    _state_tensors = ("means_", "shapes_", "scales_", "n_correct_")

    def __init__(self, tail_size: int = TAIL_SIZE, chunk_size: int | None = None) -> None:
        """``tail_size``: distances per Weibull fit; ``chunk_size``: queries per block
        (None: automatic); it does not change results."""
        if isinstance(tail_size, bool) or int(tail_size) != tail_size or tail_size < 2:
            raise ConfigError(f"tail_size must be an integer >= 2, got {tail_size!r}")
        self.tail_size = int(tail_size)
        self.chunk_size = check_chunk_size(chunk_size)
        self.params = {
            "activations": "logits",
            "alpha": "K",
            "tail_size": self.tail_size,
            "distance": f"eucos (euclidean/{EUCLID_SCALE:g} + cosine distance)",
            "mav_samples": "correctly classified",
            "weibull": "2-parameter (loc=0), exact MLE",
        }

    def _fit(self, outputs: ScorerInputs, labels: np.ndarray) -> None:
        """Per-class MAV of the correct training samples and a Weibull on their tail."""
        v = _logits64(outputs, "fit")
        k = v.shape[1]
        y, _ = check_labels(labels, len(v), outputs)
        correct = v.argmax(axis=1) == y
        means = np.zeros((k, k))
        shapes = np.zeros(k)
        scales = np.zeros(k)
        n_correct = np.zeros(k, dtype=np.int64)
        for c in range(k):
            av = v[correct & (y == c)]
            n_correct[c] = len(av)
            if len(av) < 2:
                raise DataError(
                    f"OpenMax needs at least 2 correctly classified training samples per "
                    f"class; class {c} has {len(av)}"
                )
            means[c] = av.mean(axis=0)
            dist = eucos_distances(av, means[c : c + 1])[:, 0]
            tail = np.sort(dist)[-self.tail_size :]
            try:
                shapes[c], scales[c] = fit_weibull(tail)
            except DataError as exc:
                raise DataError(f"OpenMax, class {c}: {exc}") from None
        self.means_ = means
        self.shapes_ = shapes
        self.scales_ = scales
        self.n_correct_ = n_correct
        self.params = {**self.params, "alpha": k}

    def _restored(self) -> None:
        for name in ("means_", "shapes_", "scales_"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.n_correct_ = np.asarray(self.n_correct_, dtype=np.int64)
        self.params = {**self.params, "alpha": self.means_.shape[0]}

    def recalibrated_probabilities(self, outputs: ScorerInputs) -> np.ndarray:
        """OpenMax probabilities N×(K+1) (float64); column 0 is the unknown class."""
        self.check_fitted()
        v = _logits64(outputs, "score")
        k = self.means_.shape[0]
        if v.shape[1] != k:
            raise DataError(f"logit dimension {v.shape[1]} does not match the fitted {k}")
        alpha = k
        chunk = self.chunk_size or max(1, (1 << 21) // (k * k))
        out = np.empty((len(v), k + 1))
        rank_weight = (alpha - np.arange(k)) / alpha  # rank r (0-based) -> (α − r)/α
        rank_weight[alpha:] = 0.0
        for start in range(0, len(v), chunk):
            block = v[start : start + chunk]
            wscore = weibull_cdf(eucos_distances(block, self.means_), self.shapes_, self.scales_)
            order = np.argsort(-block, axis=1, kind="stable")
            weights = np.empty_like(block)
            np.put_along_axis(weights, order, np.broadcast_to(rank_weight, block.shape), axis=1)
            omega = 1.0 - weights * wscore
            revised = np.empty((len(block), k + 1))
            revised[:, 1:] = block * omega
            revised[:, 0] = (block * (1.0 - omega)).sum(axis=1)
            revised -= revised.max(axis=1, keepdims=True)
            e = np.exp(revised)
            out[start : start + chunk] = e / e.sum(axis=1, keepdims=True)
        return out

    def score_samples(self, outputs: ScorerInputs) -> np.ndarray:
        """1 − P(unknown) = Σ_j P_j of the OpenMax probabilities -> N (float64)."""
        return self.recalibrated_probabilities(outputs)[:, 1:].sum(axis=1)
