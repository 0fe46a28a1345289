"""fDBD: fast decision-boundary-based detection.

Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024.
Acts on the penultimate features h (D) through the final linear head z = Wh + b
(W K×D, rows w_k), as in the paper. With ŷ = argmax_k z_k (ties: the lowest index),
the distance of h to the decision boundary between ŷ and c is |z_ŷ − z_c| / ‖w_ŷ − w_c‖₂,
and

    score(h) = [ (1/(K−1)) Σ_{c ≠ ŷ} |z_ŷ − z_c| / ‖w_ŷ − w_c‖₂ ] / ‖h − μ_train‖₂,

the average boundary distance regularised by the distance to μ_train, the mean of the
known training features (the one fitted quantity); higher = more likely known. No
hyperparameters.

A query at μ_train exactly has its denominator clamped at 1e-12 (finite, large). Two
identical head rows w_ŷ = w_c leave the boundary between them undefined: DataError.
Fewer than 2 classes: DataError.

Differences from the references: the authors' code (and OpenOOD v1.5's ``fdbd``) sums
over c ≠ ŷ instead of averaging; the constant factor K − 1 does not change the ranking.
OpenOOD also offers ‖h‖₂ instead of ‖h − μ_train‖₂ as the regulariser, chosen on its
(OOD) validation split; here always the paper's ‖h − μ_train‖₂, as pytorch-ood's fDBD by
default. The logits are read from the classifier's outputs (z = Wh + b).
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, float_rows, head_rows
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import DataError

#: lower bound of the distance to the training mean in the denominators of fDBD and NCI
DISTANCE_EPS = 1e-12


class TrainMeanScorer(Scorer):
    """A scorer whose fitted state is the mean μ_train (D) of the known training
    features, scored on logits, features and the head (fDBD, NCI)."""

    needs = ("logits", "features", "head_weight")
    needs_fit = True
    _state_tensors = ("train_mean_",)

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        self.train_mean_ = float_rows(inputs, "features", self.method_id).mean(axis=0)

    def _restored(self) -> None:
        self.train_mean_ = np.asarray(self.train_mean_, dtype=np.float64)

    def _scoring_rows(self, inputs: ScorerInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(logits N×K, features N×D, head weight K×D, ‖h − μ_train‖ clamped at
        DISTANCE_EPS, N) of ``inputs``, checked against the fit."""
        self.check_fitted()
        z = float_rows(inputs, "logits", self.method_id)
        h = float_rows(inputs, "features", self.method_id)
        if h.shape[1] != len(self.train_mean_):
            raise DataError(f"feature dimension {h.shape[1]} does not match the fitted {len(self.train_mean_)}")
        if len(z) != len(h):
            raise DataError(f"{self.method_id}: {len(z)} logit rows but {len(h)} feature rows")
        w, _ = head_rows(inputs, z.shape[1], h.shape[1], self.method_id)
        dist = np.maximum(np.linalg.norm(h - self.train_mean_, axis=1), DISTANCE_EPS)
        return z, h, w, dist


def pairwise_row_distances(w: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """‖w_i − w_j‖₂ for the rows of w (K×D) -> K×K, by explicit differences in blocks of
    rows (no cancellation for close rows)."""
    k, d = w.shape
    out = np.empty((k, k))
    rows = max(1, block // max(1, k * d))
    for start in range(0, k, rows):
        diff = w[start : start + rows, None, :] - w[None, :, :]
        out[start : start + rows] = np.sqrt(np.einsum("ikd,ikd->ik", diff, diff))
    return out


@register
class FDBD(TrainMeanScorer):
    method_id = "fdbd"
    family = "feature"
    paper = "Liu & Qin, ICML 2024"

    def __init__(self) -> None:
        self.params = {"layer": "penultimate features + linear head", "regulariser": "||h - mean of training features||",
                       "aggregation": "mean over the K-1 other classes"}

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """Mean boundary distance / ‖h − μ_train‖₂ -> N (float64), higher = more likely known."""
        z, _, w, dist = self._scoring_rows(inputs)
        k = z.shape[1]
        if k < 2:
            raise DataError("fDBD needs at least 2 classes (decision boundaries)")
        gaps = pairwise_row_distances(w)
        same = np.argwhere(np.triu(gaps == 0.0, 1))
        if len(same):
            raise DataError(f"fDBD: head rows {same[0].tolist()} are identical; the decision boundary between "
                            "them is undefined")
        np.fill_diagonal(gaps, 1.0)  # the term c = ŷ is |z_ŷ − z_ŷ| / 1 = 0
        pred = z.argmax(axis=1)
        top = np.take_along_axis(z, pred[:, None], axis=1)
        boundary = (np.abs(top - z) / gaps[pred]).sum(axis=1) / (k - 1)
        return boundary / dist
