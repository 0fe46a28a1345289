"""Unknown detectors and post-hoc OSR scorers, one file per method.

Every scorer returns scores where higher = more likely known.
"""

from gradosr.detectors.base import OutputScorer
from gradosr.detectors.msp import MSP

SCORERS = {cls.method_id: cls for cls in (MSP,)}

__all__ = ["OutputScorer", "MSP", "SCORERS"]
