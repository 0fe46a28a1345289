"""KL matching (KLM).

Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
Out-of-Distribution Detection for Real-World Settings", ICML 2022. Acts on the logits z
(K) through p = softmax(z), as in the paper.

**Fit.** For every class k that the classifier predicts for at least one known training
sample (ŷ_i = argmax_j z_ij, ties: the lowest index; the true labels are not used), the
template d_k = mean of softmax(z_i) over the training samples with ŷ_i = k. A class that
is never predicted has no template and takes no part in the minimum below (it is
listed in ``params["classes_without_template"]``; at least one class always has one).

**Score.**

    KL(p ‖ d_k) = Σ_j p_j (log p_j − log d_kj),       score(x) = −min_k KL(p ‖ d_k),

the minimum over the templates, higher = more likely known. No hyperparameters.

Computed in float64 in log space: log p is the stable log-softmax and log d_k the
logsumexp of the members' log-softmax minus log n_k (exact even where a mean
probability would underflow), so every term is finite and a probability that underflows
contributes 0; KL ≥ 0 up to rounding. Explicit differences log p − log d (no
cancellation between −H(p) and the cross-entropy), in chunks of queries.

Differences from the references: the paper and OpenOOD v1.5 fit the templates on a
held-out validation set; here, like every scorer, on the known training samples (the
held-out knowns set the thresholds). OpenOOD (and the ViM authors' code) average over
all 1000 classes, which gives NaN templates for a never-predicted class; here such a
class is left out. pytorch-ood's KLMatching scores only the predicted class's template,
KL(p ‖ d_ŷ), instead of the paper's minimum over all templates (and refuses a prediction
without a template).
"""

from __future__ import annotations

import numpy as np

from gradosr.detectors.base import Scorer, check_chunk_size, float_rows, log_softmax
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.registry import register
from gradosr.errors import DataError


def class_log_templates(log_p: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes with members T, log of the mean probability vector of each, T×K): a
    grouped logsumexp of the rows of ``log_p`` (N×K) by ``pred`` (N, 0..k-1), minus log n."""
    counts = np.bincount(pred, minlength=k)
    classes = np.flatnonzero(counts)
    peak = np.full((k, log_p.shape[1]), -np.inf)
    np.maximum.at(peak, pred, log_p)
    sums = np.zeros((k, log_p.shape[1]))
    np.add.at(sums, pred, np.exp(log_p - peak[pred]))
    log_mean = peak[classes] + np.log(sums[classes]) - np.log(counts[classes])[:, None]
    return classes, log_mean


@register
class KLMatching(Scorer):
    method_id = "klm"
    family = "logit"
    paper = "Hendrycks et al., ICML 2022"
    needs_fit = True
    _state_tensors = ("log_templates_", "template_classes_")

    def __init__(self, chunk_size: int | None = None) -> None:
        """``chunk_size``: queries per block (None: automatic); it does not change results."""
        self.chunk_size = check_chunk_size(chunk_size)
        self.params = {"layer": "logits (softmax)", "templates": "mean softmax per predicted class",
                       "fitted_on": "known training samples", "n_templates": None, "classes_without_template": None}

    def _fit(self, inputs: ScorerInputs, labels) -> None:
        """The log templates of the classes predicted on the training samples."""
        z = float_rows(inputs, "logits", "KL matching")
        log_p = log_softmax(z)
        classes, log_templates = class_log_templates(log_p, z.argmax(axis=1), z.shape[1])
        self.template_classes_ = classes.astype(np.int64)
        self.log_templates_ = log_templates
        self._restored()

    def _restored(self) -> None:
        self.log_templates_ = np.asarray(self.log_templates_, dtype=np.float64)
        self.template_classes_ = np.asarray(self.template_classes_, dtype=np.int64)
        k = self.log_templates_.shape[1]
        self.params = {**self.params, "n_templates": len(self.template_classes_),
                       "classes_without_template": sorted(set(range(k)) - set(self.template_classes_.tolist()))}

    @property
    def templates_(self) -> np.ndarray:
        """The templates d_k (T×K, rows of ``template_classes_``)."""
        return np.exp(self.log_templates_)

    def divergences(self, inputs: ScorerInputs) -> np.ndarray:
        """KL(softmax(z) ‖ d_k) -> N×T (float64), one column per template."""
        self.check_fitted()
        z = float_rows(inputs, "logits", "KL matching")
        t, k = self.log_templates_.shape
        if z.shape[1] != k:
            raise DataError(f"logit dimension {z.shape[1]} does not match the fitted {k}")
        log_p = log_softmax(z)
        p = np.exp(log_p)
        chunk = self.chunk_size or max(1, (1 << 21) // max(1, t * k))
        out = np.empty((len(z), t))
        for start in range(0, len(z), chunk):
            rows = slice(start, start + chunk)
            diff = log_p[rows, None, :] - self.log_templates_[None, :, :]
            out[rows] = np.einsum("nj,ntj->nt", p[rows], diff)
        return out

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        """−min_k KL(softmax(z) ‖ d_k) -> N (float64), higher = more likely known."""
        return -self.divergences(inputs).min(axis=1)
