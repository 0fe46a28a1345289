"""Open-set recognition metrics.

Conventions (shared with the rest of gradosr):

- ``scores``: shape ``(N,)``, one real number per sample, **higher = more likely known**;
- ``is_known``: shape ``(N,)``, boolean (or 0/1), ``True`` for samples of a known class;
- labels: integers, ``0..K-1`` for the known classes and ``-1`` for unknown.

Every function accepts numpy arrays, Python lists or torch tensors, returns Python
floats (or a numpy array for :func:`open_set_predictions`), and raises
:class:`gradosr.errors.DataError` on invalid input (empty or non-1-D arrays, length
mismatch, NaN/Inf scores, a metric that is undefined for the given samples).
Invalid options (a ``tpr`` outside ``(0, 1]``, a negative ``num_known``) raise
:class:`gradosr.errors.ConfigError`.

The ranking metrics (AUROC, AUPR, OSCR) treat tied scores as one threshold: samples
with equal scores are accepted or rejected together.
"""


from gradosr.metrics.open_set import closed_set_accuracy, macro_f1_open, open_set_predictions, oscr, oscr_curve
from gradosr.metrics.ranking import aupr_in, aupr_out, auroc, fpr_at_tpr, roc_curve, threshold_at_tpr

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "threshold_at_tpr",
    "fpr_at_tpr",
    "macro_f1_open",
    "oscr",
    "oscr_curve",
    "roc_curve",
    "closed_set_accuracy",
    "open_set_predictions",
]
