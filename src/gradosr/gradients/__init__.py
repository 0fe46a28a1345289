"""Per-sample gradient engine: gradient-based representations (Lee & AlRegib, ICIP 2021).

- :func:`squared_norms`: per-sample, per-parameter squared gradient norms (paper Eq. 1);
- :func:`per_sample_loss`: the losses back-propagated (confounding, predicted, uniform);
- :func:`select_parameters`: which parameter tensors enter the representation.
"""

from gradosr.gradients.engine import select_parameters, squared_norms
from gradosr.gradients.targets import (
    confounding_loss,
    per_sample_loss,
    predicted_loss,
    uniform_loss,
)

__all__ = [
    "squared_norms",
    "per_sample_loss",
    "select_parameters",
    "confounding_loss",
    "predicted_loss",
    "uniform_loss",
]
