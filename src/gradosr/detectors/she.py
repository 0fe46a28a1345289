"""SHE: simplified Hopfield energy with the class patterns of the known training data.

Zhang, Fu, Chen, Du, Li, Wang, Liu, Han & Zhang, "Out-of-Distribution Detection based
on In-Distribution Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023.
On the penultimate features h (D; ``features``, the input of the head) and the logits
z (K), the stored pattern of class c is the mean feature of the known training samples
of class c that the classifier classifies correctly,

    S_c = mean { h_n : y_n = c and argmax_k z_n,k = c },

and a sample is scored against the pattern of its predicted class ŷ = argmax_k z_k:

    score(x) = h · S_ŷ,

higher = more likely known. This is the paper's simplified Hopfield energy (SHE): its
modern Hopfield energy over the stored patterns reduced to one pattern per class, the
score being the negative energy −E = hᵀS_ŷ, i.e. an inner product; the log-sum-exp form
over all stored patterns is not computed. Both references score the same inner product.

- Layer: the penultimate features, as in the paper.
- Hyperparameters: none (the inner product; the prediction is the classifier's argmax,
  ties to the lower class index).
- A class none of whose training samples is classified correctly gets the mean of all
  its training samples instead (listed in ``params["fallback_classes"]``, empty
  normally); a class without training samples is a DataError.

Differences from the reference implementations, deliberate: for a class with no
correctly classified training sample, pytorch-ood 0.4 raises an error and OpenOOD v1.5
stores the mean of an empty set (NaN scores for every sample predicted as that
class); here that class falls back to the mean of its training samples, so that one
weak class of a classifier does not remove the method from a benchmark, and the
fallback is recorded. pytorch-ood returns the negated inner product (an outlier score);
the ranking is the same.
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.detectors.base import Scorer, check_labels, class_counts
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.detectors.shaping import penultimate
from gradosr.errors import DataError


def _logits64(inputs: ScorerInputs, n: int) -> np.ndarray:
    z = torch.as_tensor(inputs.get("logits", "she")).detach().cpu().to(torch.float64).numpy()
    if z.ndim != 2 or len(z) != n:
        raise DataError(f"she needs logits N×K for the {n} feature rows, got shape {z.shape}")
    return z


def _class_means(h: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(K×D sums / counts, K counts) of the rows of h by class y."""
    sums = np.zeros((k, h.shape[1]))
    np.add.at(sums, y, h)
    counts = np.bincount(y, minlength=k)
    return sums / np.maximum(counts, 1)[:, None], counts


@register
class SHE(Scorer):
    method_id = "she"
    family = "feature"
    paper = "Zhang et al., ICLR 2023"
    needs = ("logits", "features")
    needs_fit = True
    _state_tensors = ("patterns_",)
    _state_meta = ("fallback_classes_",)

    def __init__(self) -> None:
        self.params = {"layer": "penultimate", "patterns": "mean feature of the correctly classified training "
                       "samples per class", "score": "inner product with the predicted class's pattern"}

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """S_c from the correctly classified training samples of each class c."""
        h = penultimate(inputs, "she").numpy()
        z = _logits64(inputs, len(h))
        y, k = check_labels(labels, len(h), inputs)
        class_counts(y, k, "SHE")
        correct = z.argmax(axis=1) == y
        patterns, counts = _class_means(h[correct], y[correct], k)
        missing = counts == 0
        if missing.any():
            patterns[missing] = _class_means(h, y, k)[0][missing]
        self.patterns_ = patterns
        self.fallback_classes_ = np.flatnonzero(missing).tolist()
        self._restored()

    def _restored(self) -> None:
        self.patterns_ = np.asarray(self.patterns_, dtype=np.float64)
        self.fallback_classes_ = [int(c) for c in self.fallback_classes_]
        self.params = {**self.params, "fallback_classes": self.fallback_classes_}

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """h · S_ŷ with ŷ the argmax of the logits -> N (float64), higher = more likely known."""
        self.check_fitted()
        h = penultimate(inputs, "she").numpy()
        z = _logits64(inputs, len(h))
        if h.shape[1] != self.patterns_.shape[1] or z.shape[1] != self.patterns_.shape[0]:
            raise DataError(f"she: features N×{h.shape[1]} and logits N×{z.shape[1]} do not match the fitted "
                            f"patterns {self.patterns_.shape}")
        return np.einsum("nd,nd->n", h, self.patterns_[z.argmax(axis=1)])
