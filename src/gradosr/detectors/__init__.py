"""Scoring methods, one file per method, behind one interface and one registry.

- :class:`Scorer` (:mod:`gradosr.detectors.base`): fit on known training samples (one
  :class:`ScorerInputs` or chunks of them), ``score_samples`` (higher = more likely
  known), ``get_params``/``set_params``, ``state``/``from_state``;
- :class:`ScorerInputs` (:mod:`gradosr.detectors.inputs`): what a classifier computed;
- :data:`METHODS` (:mod:`gradosr.detectors.registry`): every method by id, with its kind
  (baseline, component, preset), family and paper; ``@register`` adds one.
"""

# registration order = the order of the benchmark's baseline rows
from gradosr.detectors.base import Scorer  # isort: skip
from gradosr.detectors.msp import MSP  # isort: skip
from gradosr.detectors.mls import MLS  # isort: skip
from gradosr.detectors.energy import Energy  # isort: skip
from gradosr.detectors.odin import ODIN  # isort: skip
from gradosr.detectors.openmax import OpenMax  # isort: skip
from gradosr.detectors.mahalanobis import Mahalanobis  # isort: skip
from gradosr.detectors.knn import KNN  # isort: skip
from gradosr.detectors.gradnorm import GradNorm  # isort: skip
from gradosr.detectors.gradunc import GradUnc  # isort: skip
from gradosr.detectors.vim import ViM  # isort: skip
from gradosr.detectors.rmds import RMDS  # isort: skip
from gradosr.detectors.fdbd import FDBD  # isort: skip
from gradosr.detectors.nnguide import NNGuide  # isort: skip
from gradosr.detectors.gen import GEN  # isort: skip
from gradosr.detectors.entropy import Entropy  # isort: skip
from gradosr.detectors.klm import KLMatching  # isort: skip
from gradosr.detectors.nci import NCI  # isort: skip
from gradosr.detectors.gmm import GMM  # isort: skip
from gradosr.detectors.react import ReAct  # isort: skip
from gradosr.detectors.ash import AshS, AshB, AshP  # isort: skip
from gradosr.detectors.scale import Scale  # isort: skip
from gradosr.detectors.dice import Dice  # isort: skip
from gradosr.detectors.she import SHE  # isort: skip
from gradosr.detectors.nac import NAC  # isort: skip
from gradosr.detectors.grood import GROOD  # isort: skip
from gradosr.detectors.gaia import GAIAZ, GAIAA  # isort: skip
from gradosr.detectors.mahalanobis_ml import MahalanobisML, MahalanobisMLPP  # isort: skip
from gradosr.detectors.gradorth import GradOrth  # isort: skip  (components after the baselines)
from gradosr.detectors.leverage import Leverage  # isort: skip
from gradosr.detectors.mlp import MLPDetector  # isort: skip
from gradosr.detectors.fusion import FusedScorer  # isort: skip
from gradosr.detectors.inputs import ScorerInputs  # isort: skip
from gradosr.detectors.registry import METHODS, make_scorer, method_ids, register, unregister  # isort: skip

__all__ = [
    "Scorer", "ScorerInputs", "MSP", "MLS", "Energy", "ODIN", "OpenMax", "Mahalanobis", "KNN", "GradNorm",
    "GradUnc", "GradOrth", "MLPDetector", "FusedScorer", "METHODS", "register", "unregister", "method_ids",
    "make_scorer",
    "ViM", "RMDS", "FDBD", "NNGuide", "GEN", "Entropy", "KLMatching", "NCI", "GMM",
    "ReAct", "AshS", "AshB", "AshP", "Scale", "Dice", "SHE",
    "NAC", "GROOD", "GAIAZ", "GAIAA", "MahalanobisML", "MahalanobisMLPP", "Leverage",
]
