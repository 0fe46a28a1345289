"""gradosr: open-set recognition with gradient-based representations.

Implements Lee & AlRegib, "Open-Set Recognition with Gradient-Based Representations"
(ICIP 2021), together with the usual post-hoc baselines, on any PyTorch classifier.

Conventions used everywhere:
- scores: higher = more likely known;
- the unknown label in predictions is ``-1`` (the CLI prints ``unknown``).
"""

from gradosr.errors import CheckpointError, ConfigError, DataError, GradOSRError, NotFittedError

__version__ = "0.1.0"

from gradosr.osr import GradientOSR  # noqa: E402  (needs __version__ defined first)
from gradosr.train import TrainConfig  # noqa: E402

__all__ = ["GradientOSR", "TrainConfig", "NotFittedError", "GradOSRError", "DataError", "ConfigError", "CheckpointError", "__version__"]
