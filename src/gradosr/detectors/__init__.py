"""Unknown detectors and post-hoc OSR scorers, one file per method.

Every scorer returns scores where higher = more likely known.
"""

from gradosr.detectors.base import ClassifierOutputs, OutputScorer
from gradosr.detectors.energy import Energy
from gradosr.detectors.gradnorm import GradNorm
from gradosr.detectors.gradunc import GradUnc
from gradosr.detectors.knn import KNN
from gradosr.detectors.mahalanobis import Mahalanobis
from gradosr.detectors.mls import MLS
from gradosr.detectors.msp import MSP
from gradosr.detectors.odin import ODIN
from gradosr.detectors.openmax import OpenMax

#: method id -> scorer class, in the order of DESIGN.md §8
SCORERS = {
    cls.method_id: cls
    for cls in (MSP, MLS, Energy, ODIN, OpenMax, Mahalanobis, KNN, GradNorm, GradUnc)
}

__all__ = [
    "ClassifierOutputs", "OutputScorer", "MSP", "MLS", "Energy", "ODIN", "OpenMax", "Mahalanobis", "KNN",
    "GradNorm", "GradUnc", "SCORERS",
]
