"""Calibrators: how the fused detector turns several signals' scores into one.

Each signal's raw score s (higher = known) is compared with its scores on held-out
known samples (the validation split, never unknowns):

- ``sum`` (:class:`ZScoreSum`): the sum of the z-scores (s − mean) / std, with the
  held-out mean and (population) standard deviation;
- ``fisher`` (:class:`FisherCombination`): every signal gives an empirical p-value
  p = (#{held-out scores ≤ s} + 1) / (n + 1) and the score is Fisher's combination
  Σ log p (Fisher, 1925; as in Haroush et al., "A Statistical Framework for Efficient
  Out of Distribution Detection in Deep Neural Networks", ICLR 2022): one signal far in
  its tail weighs more than in a sum of z-scores.

Both keep the held-out mean and std of every signal (``stats_``); ``fisher`` also keeps
the sorted held-out scores (``held_out_``).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.errors import CheckpointError, DataError, NotFittedError

_EPS = 1e-12


class ZScoreSum:
    """Σ_s (score_s − mean_s) / std_s over the signals s."""

    name = "sum"

    def fit(self, held_out: dict[str, np.ndarray]) -> "ZScoreSum":
        """``held_out``: every signal's scores (float64 M) on held-out knowns, M >= 2."""
        self.stats_: dict[str, tuple[float, float]] = {}
        for s, v in held_out.items():
            v = torch.as_tensor(np.asarray(v, dtype=np.float64))
            if len(v) < 2:
                raise DataError("the fused detector needs at least 2 held-out known samples")
            if not torch.isfinite(v).all():
                raise DataError(f"the {s} signal of the held-out knowns is not finite")
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


#: ``combine`` name -> calibrator class
CALIBRATORS = {c.name: c for c in (ZScoreSum, FisherCombination)}
