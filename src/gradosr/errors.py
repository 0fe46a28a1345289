"""The project's exception types.

Every expected failure (bad input, missing data, a corrupt or mismatched checkpoint,
an invalid option) raises a subclass of :class:`GradOSRError`. The CLI turns it into a
single line on stderr and a non-zero exit code; anything else is a bug.
"""

from __future__ import annotations


class GradOSRError(Exception):
    """Base class of every error that gradosr raises on purpose."""


class DataError(GradOSRError):
    """A dataset file is missing, corrupt or of the wrong shape, or an input is invalid."""


class ConfigError(GradOSRError, ValueError):
    """An option, class list, protocol or argument is invalid."""


class CheckpointError(GradOSRError):
    """A checkpoint or run directory is missing, corrupt, mismatched or of another version."""


class NotFittedError(GradOSRError, AttributeError):
    """A scorer or estimator was used before ``fit`` (or ``load``): scikit-learn's
    convention (``sklearn.exceptions.NotFittedError`` also derives from AttributeError)."""
