"""Calibrators: how the fused detector turns several signals' scores into one.

Each signal's raw score s (higher = known) is compared with its scores on held-out
known samples (the validation split, never unknowns):

- ``sum`` (:class:`ZScoreSum`): the sum of the z-scores (s − mean) / std, with the
  held-out mean and (population) standard deviation;
- ``fisher`` (:class:`FisherCombination`): every signal gives an empirical p-value
  p = (#{held-out scores ≤ s} + 1) / (n + 1) and the score is Fisher's combination
  Σ log p (Fisher, 1925; as in Haroush et al., "A Statistical Framework for Efficient
  Out of Distribution Detection in Deep Neural Networks", ICLR 2022): one signal far in
  its tail weighs more than in a sum of z-scores;
- ``learned`` (:class:`LearnedFisher`): a weighted Fisher's combination Σ w_s log p_s,
  the weights w_s >= 0 fitted by a logistic regression (balanced classes, L2 penalty
  α = 1e-3, fixed) of the held-out knowns against outliers that the fit generates from
  them (:mod:`gradosr.data.calibration_outliers`; no unknown class): the per-classifier
  calibration of issue 21 (docs/ablation.md, round 4). A signal that does not separate
  knowns from the generated outliers gets weight 0; if every weight is 0, the weights
  are all 1 (Fisher's combination) and ``fallback_`` is True.

Both keep the held-out mean and std of every signal (``stats_``); ``fisher`` also keeps
the sorted held-out scores (``held_out_``).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.errors import CheckpointError, DataError, NotFittedError

_EPS = 1e-12


def _finite(scores: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Every signal's scores as float64 arrays; a non-finite score is a DataError naming
    the signal and ``what`` ("held-out knowns", "generated outliers")."""
    out = {s: np.asarray(v, dtype=np.float64) for s, v in scores.items()}
    for s, v in out.items():
        if not np.isfinite(v).all():
            raise DataError(f"the {s} signal of the {what} is not finite")
    return out


class ZScoreSum:
    """Σ_s (score_s − mean_s) / std_s over the signals s."""

    name = "sum"
    #: whether ``fit`` needs the scores of generated outliers
    needs_outliers = False

    def fit(self, held_out: dict[str, np.ndarray], outliers: dict[str, np.ndarray] | None = None) -> "ZScoreSum":
        """``held_out``: every signal's scores (float64 M) on held-out knowns, M >= 2;
        ``outliers``: the same on generated outliers (used by ``learned`` only)."""
        self.stats_: dict[str, tuple[float, float]] = {}
        if any(len(v) < 2 for v in held_out.values()):
            raise DataError("the fused detector needs at least 2 held-out known samples")
        for s, v in _finite(held_out, "held-out knowns").items():
            v = torch.as_tensor(v)
            self.stats_[s] = (float(v.mean()), max(float(v.std(unbiased=False)), _EPS))
        self._fit_extra(held_out)
        return self

    def _fit_extra(self, held_out: dict[str, np.ndarray]) -> None:
        pass

    def _check(self) -> None:
        if not hasattr(self, "stats_"):
            raise NotFittedError("the fused detector is not calibrated: fit it on held-out knowns")

    def combine(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The combined score (float64 N) of every signal's scores."""
        self._check()
        total = np.zeros(len(next(iter(scores.values()))))
        for s, r in scores.items():
            total += self._term(s, np.asarray(r, dtype=np.float64))
        return total

    def _term(self, signal: str, r: np.ndarray) -> np.ndarray:
        mean, std = self.stats_[signal]
        return (r - mean) / std

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        self._check()
        return {}, {"combine": self.name, "stats": {s: list(v) for s, v in self.stats_.items()}}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ZScoreSum":
        self = cls()
        try:
            self.stats_ = {s: (float(v[0]), float(v[1])) for s, v in meta["stats"].items()}
            self._restore_extra(tensors)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"the fused detector's calibration is incomplete: {exc}") from None
        return self

    def _restore_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class FisherCombination(ZScoreSum):
    """Σ_s log p_s, p_s the empirical p-value of score_s among the held-out knowns."""

    name = "fisher"

    def _fit_extra(self, held_out: dict[str, np.ndarray]) -> None:
        self.held_out_ = {s: torch.sort(torch.as_tensor(np.asarray(v, dtype=np.float64))).values.contiguous()
                          for s, v in held_out.items()}

    def _term(self, signal: str, r: np.ndarray) -> np.ndarray:
        calib = self.held_out_[signal].numpy()
        return np.log((np.searchsorted(calib, r, side="right") + 1) / (len(calib) + 1))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        _, meta = super().state()
        return {f"held_out.{s}": t for s, t in self.held_out_.items()}, meta

    def _restore_extra(self, tensors: dict[str, torch.Tensor]) -> None:
        self.held_out_ = {s: tensors[f"held_out.{s}"].to(torch.float64) for s in self.stats_}


def nonnegative_logistic(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """(w >= 0, float D; intercept b) minimising the balanced, L2-penalised logistic loss
    Σ_i c_i log(1 + exp(−t_i (x_i·w + b))) + α/2 ‖w‖², t_i = 2 y_i − 1, c_i = 1 / (2 n_{y_i})
    (each class weighs 1/2), for x float N×D and y in {0, 1} (N), by L-BFGS-B with the
    bounds w >= 0. Without active bounds it is scikit-learn's LogisticRegression with
    C = 1/α and sample weights c."""
    from scipy.optimize import minimize
    from scipy.special import expit

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    n1, n0 = int((y == 1).sum()), int((y == 0).sum())
    if n1 == 0 or n0 == 0:
        raise DataError("the learned combination needs both held-out knowns and generated outliers")
    t = np.where(y == 1, 1.0, -1.0)
    c = np.where(y == 1, 0.5 / n1, 0.5 / n0)
    d = x.shape[1]

    def loss(theta):
        w, b = theta[:d], theta[d]
        m = t * (x @ w + b)
        dz = -t * c * expit(-m)
        return float(c @ np.logaddexp(0.0, -m) + 0.5 * alpha * w @ w), np.r_[x.T @ dz + alpha * w, dz.sum()]

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                   bounds=[(0.0, None)] * d + [(None, None)], options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x[:d].copy(), float(res.x[d])


class LearnedFisher(FisherCombination):
    """Σ_s w_s log p_s, the weights w_s >= 0 fitted on held-out knowns against generated
    outliers (see the module docstring); fitted ``weights_`` (signal -> float)."""

    name = "learned"
    needs_outliers = True
    #: the L2 penalty of the weights' logistic regression (fixed, not tuned)
    alpha = 1e-3

    def fit(self, held_out: dict[str, np.ndarray], outliers: dict[str, np.ndarray] | None = None) -> "LearnedFisher":
        if not outliers or not len(next(iter(outliers.values()))):
            raise DataError("the learned combination needs the scores of generated outliers")
        if set(outliers) != set(held_out):
            raise DataError(f"the outliers' signals {sorted(outliers)} differ from the held-out knowns' "
                            f"{sorted(held_out)}")
        super().fit(held_out)  # checks the held-out knowns' scores
        signals = list(held_out)
        outliers = _finite(outliers, "generated outliers")
        x = np.column_stack([FisherCombination._term(self, s, np.concatenate(
            [np.asarray(held_out[s], dtype=np.float64), outliers[s]])) for s in signals])
        n_in = len(held_out[signals[0]])
        y = np.r_[np.ones(n_in), np.zeros(len(x) - n_in)]
        w, _ = nonnegative_logistic(x, y, self.alpha)
        self.fallback_ = bool(w.sum() <= 0)
        self.weights_ = {s: (1.0 if self.fallback_ else float(v)) for s, v in zip(signals, w)}
        return self

    def _check(self) -> None:
        super()._check()
        if not hasattr(self, "weights_"):
            raise NotFittedError("the learned combination is not fitted")

    def _term(self, signal: str, r: np.ndarray) -> np.ndarray:
        return self.weights_[signal] * super()._term(signal, r)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        return tensors, {**meta, "weights": dict(self.weights_), "fallback": self.fallback_}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "LearnedFisher":
        self = super().from_state(tensors, meta)
        try:
            self.weights_ = {s: float(meta["weights"][s]) for s in self.stats_}
            self.fallback_ = bool(meta["fallback"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the fused detector's learned weights are incomplete: {exc}") from None
        return self


#: ``combine`` name -> calibrator class
CALIBRATORS = {c.name: c for c in (ZScoreSum, FisherCombination, LearnedFisher)}
