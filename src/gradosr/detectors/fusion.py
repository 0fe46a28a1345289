"""Score fusion: the unknown detector of the ``plus`` preset.

The ``paper`` preset (Lee & AlRegib, ICIP 2021) learns an MLP on the gradient
representations of a *proxy* classifier and applies it to the final classifier's. The
``plus`` preset instead models the *final* classifier's known training samples directly
(one-class, as kNN does: Sun et al., "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML 2022) and adds up several standardised signals. The preset as
shipped (docs/ablation.md, round 3) combines ``activation``, ``gradient`` with
``gradient_rep="kfac"`` and ``gradient_metric="mahalanobis"``, ``features`` and
``max_logit``; the defaults of :class:`FusionConfig` are the preset of rounds 1-2
(``plus-r1``: kNN on the head gradient, features, max logit). The signals:

- ``gradient``: kNN in gradient space. With ``gradient_rep="head"`` the representation is
  the full per-sample gradient of the confounding-label loss with respect to the head's
  weight, dJ/dW = g hᵀ (g = dJ/dz, K; h the head input, D), L2-normalised. Its cosine
  similarity factorises, cos(g₁h₁ᵀ, g₂h₂ᵀ) = cos(g₁, g₂)·cos(h₁, h₂), so the K×D gradient
  is never materialised. ``gradient_rep="norms"`` uses the log per-parameter squared
  gradient norms of the paper's Eq. 1 instead, standardised with held-out known
  statistics, with Euclidean kNN. ``gradient_rep="projection"`` uses a random projection
  of the full per-sample gradient of every Linear/Conv weight of the classifier
  (LoGra's Kronecker-factored projection, Choe et al. 2024; after TRAK, Park et al.,
  ICML 2023; see :mod:`gradosr.gradients.projection`), ``projection_dim`` per side of
  each layer, with cosine kNN: it reaches the layers below the head. With
  ``gradient_metric="mahalanobis"`` (``norms`` or ``projection``) the gradient signal is
  instead minus the Mahalanobis distance to the nearest class mean of the known
  training gradients under their tied covariance (Lee et al., NeurIPS 2018, applied in
  gradient space: the class-centred second moment of per-sample gradients is a centred
  empirical Fisher information), :class:`gradosr.detectors.mahalanobis.Mahalanobis`.
  ``gradient_rep="kfac"`` reads the per-layer log Fisher-whitened (K-FAC) gradient
  norms of the layers below the head (:mod:`gradosr.gradients.kfac`), or with
  ``kfac_features`` their activation factors (the non-gradient control), both factors,
  or the log of their sum; Mahalanobis, or Euclidean kNN on them standardised.
- ``features``: kNN on L2-normalised penultimate features (Sun et al., 2022);
- ``max_logit``: the maximum logit (Vaze et al., ICLR 2022);
- ``gradnorm``: log ‖dJ/dW‖₁ of the head under the uniform target (Huang et al.,
  NeurIPS 2021; higher = known), for ablations;
- ``gradorth``: GradOrth (Behpour et al., NeurIPS 2023), :mod:`gradosr.detectors.gradorth`;
- ``activation``: the Mahalanobis distance of the per-layer log activation factors
  a_l = mean_t ‖(A_l+γI)^-½ u_t‖² of the layers below the head
  (:mod:`gradosr.gradients.kfac`; no gradient), so that a gradient signal can sit
  beside it (docs/ablation.md, round 3).

``gradient_metric="leverage"`` scores the gradient representation by its self-influence
+gᵀ(GᵀG/N + γI)⁻¹g against the known training gradients (the confounding gradient grows
with confidence, so larger = known) (TRAK, Park et al., ICML 2023;
:class:`gradosr.detectors.leverage.Leverage`). ``gradient_metric="gradpca"`` scores it by
minus the share of ‖g‖² off the span of the known training gradients' class means
(GradPCA, Seleznova et al., ICLR 2026; :class:`gradosr.detectors.gradpca.GradPCA`), and
``"mahalanobis_predicted"`` by the Mahalanobis distance to the mean of the class the
classifier predicts instead of the nearest one, ``"relative_mahalanobis"`` by RMDS's
relative distance, the class-conditional minus the background Gaussian's (Ren et al.,
2021, applied in gradient space; :class:`gradosr.detectors.rmds.RMDS`) (docs/ablation.md,
round 5).

Activation-gradient statistics per block, as signals (issue 21, item 3; round 5):

- ``nac``: NAC-UE's coverage of the neuron states sigmoid(z̄ ⊙ ∂KL(u‖p)/∂z̄) of the
  blocks (Liu et al., ICLR 2024; :class:`gradosr.detectors.nac.NAC`);
- ``coverage``: its non-gradient control, the coverage of sigmoid(z̄) alone;
- ``gaia``: GAIA-A's channel-wise average attribution abnormality (Chen et al.,
  NeurIPS 2023; :class:`gradosr.detectors.gaia.GAIAA`); no fit, all gradient.

These three run the classifier themselves, so the inputs then also carry the model and
its inputs (:meth:`gradosr.methods.fused.FusedMethod.inputs`).

Every signal is a registered scorer (:func:`signal_scorers`): the gradient kNN is
:class:`gradosr.detectors.knn.KNN` with ``factors=("logit_grad", "features")`` (or one
gradient factor), the feature kNN the ``knn`` baseline, the max logit ``mls``, GradNorm
with ``log=True``, the gradient-space Mahalanobis the ``mahalanobis`` scorer on a
gradient ``source``. A calibrator (:mod:`gradosr.detectors.calibration`) combines them.

The signals' scores are combined by a calibrator fitted on held-out knowns
(``combine="sum"``: the sum of z-scores; ``combine="fisher"``: Fisher's combination of
empirical p-values; ``combine="learned"``: Fisher's combination weighted by a
non-negative logistic regression of the held-out knowns against outliers generated from
them, ``calibration_outliers`` (:mod:`gradosr.data.calibration_outliers`);
:mod:`gradosr.detectors.calibration`). kNN uses the k-th nearest
training sample, k = min(``k``, the smallest class's training count). The kNN signals
keep float64 banks (searched by the torch backend, :mod:`gradosr.detectors.search`):
the z-scores divide by the held-out knowns' spread, which turns a float32 bank's
rounding into changes of ~1e-5 of the fused score.

Inputs (:class:`gradosr.detectors.inputs.ScorerInputs`): ``logits`` N×K, ``features``
N×D and the gradient representations the configuration reads: ``logit_grad`` N×K (the
logit gradient g of the configured target, :func:`gradosr.gradients.logit.logit_gradient`),
``norms`` N×P (standardised log gradient norms), ``projection`` N×P', ``kfac`` N×L (or
N×2L, N×1) and ``kfac_activation`` N×L (the ``activation`` signal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from gradosr.checkpoint import under_prefix, with_prefix
from gradosr.data.calibration_outliers import GENERATORS as OUTLIER_GENERATORS
from gradosr.data.calibration_outliers import check_generators
from gradosr.detectors.base import Scorer, _jsonable
from gradosr.detectors.calibration import CALIBRATORS
from gradosr.detectors.gaia import GAIAA
from gradosr.detectors.gradnorm import GradNorm
from gradosr.detectors.gradorth import GradOrth
from gradosr.detectors.gradpca import GradPCA
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.knn import KNN
from gradosr.detectors.leverage import Leverage
from gradosr.detectors.mahalanobis import Mahalanobis
from gradosr.detectors.mls import MLS
from gradosr.detectors.nac import NAC
from gradosr.detectors.registry import METHODS, register
from gradosr.detectors.rmds import RMDS
from gradosr.errors import CheckpointError, ConfigError, DataError, NotFittedError
from gradosr.options import option

SIGNALS = ("gradient", "features", "max_logit", "gradnorm", "gradorth", "activation", "nac", "coverage", "gaia")
GRADIENT_REPS = ("head", "norms", "projection", "kfac")
#: what the kfac representation gives the gradient signal (:mod:`gradosr.gradients.kfac`)
KFAC_FEATURES = ("whitened", "activation", "both", "whitened-sum", "activation-sum")
COMBINES = ("sum", "fisher", "learned")
GRADIENT_METRICS = ("knn", "mahalanobis", "mahalanobis_predicted", "relative_mahalanobis", "leverage", "gradpca")


@dataclass(frozen=True)
class FusionConfig:
    """Which signals are combined and how (sum of z-scores or Fisher's combination of
    p-values, see the module docstring), the gradient representation, the largest k of
    the kNN signals and the per-side dimension of the projected gradients
    (``gradient_rep="projection"``)."""

    signals: tuple[str, ...] = option(("gradient", "features", "max_logit"), choices=SIGNALS,
                                      help="plus: comma-separated signals of the fused detector")
    gradient_rep: str = option("head", choices=GRADIENT_REPS,
                               help="plus: gradient representation of the gradient signal: the full head-weight "
                                    "gradient, the log per-parameter squared norms, a random projection of the "
                                    "full gradient of every Linear/Conv weight, or the per-layer log K-FAC "
                                    "(Fisher-whitened) gradient norms below the head (the plus preset's)")
    k: int = option(50, help="plus: the largest k of the kNN signals")
    projection_dim: int = option(16, help="plus, gradient_rep projection: projected size per side of each layer")
    combine: str = option("sum", choices=COMBINES,
                          help="plus: the sum of the signals' z-scores on held-out knowns, Fisher's combination "
                               "of their empirical p-values, or Fisher's combination weighted by a logistic "
                               "regression of held-out knowns against outliers generated from them")
    calibration_outliers: tuple[str, ...] = option(("mixup",), choices=tuple(OUTLIER_GENERATORS),
                                                   help="plus, combine learned: comma-separated generators of "
                                                        "the outliers made from held-out knowns")
    gradient_metric: str = option("knn", choices=GRADIENT_METRICS,
                                  help="plus, gradient_rep norms|projection|kfac: kNN, the Mahalanobis distance to "
                                       "the nearest (or the predicted) class mean of the known training gradients, its "
                                       "relative (RMDS) form, "
                                       "the leverage (self-influence) against them, or GradPCA's residual off the "
                                       "span of their class means")
    kfac_features: str = option("whitened", choices=KFAC_FEATURES,
                                help="plus, gradient_rep kfac: the per-layer log Fisher-whitened gradient norms, the "
                                     "activation factors (the non-gradient control), both factors, or the log of "
                                     "their sum over layers")
    kfac_damping: float = option(0.1, help="plus, gradient_rep kfac: damping of the K-FAC factors, times their mean "
                                           "eigenvalue")

    def to_dict(self) -> dict:
        """The fields as JSON values (tuples become lists, so a saved config reads back equal)."""
        return _jsonable(asdict(self))

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", tuple(self.signals))
        object.__setattr__(self, "calibration_outliers", check_generators(self.calibration_outliers))
        bad = [s for s in self.signals if s not in SIGNALS]
        if bad or not self.signals or len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"signals must be distinct names among {SIGNALS}, got {list(self.signals)}")
        if self.gradient_rep not in GRADIENT_REPS:
            raise ConfigError(f"gradient_rep must be one of {GRADIENT_REPS}, got {self.gradient_rep!r}")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ConfigError(f"k must be a positive integer, got {self.k!r}")
        if self.gradient_metric not in GRADIENT_METRICS:
            raise ConfigError(f"gradient_metric must be one of {GRADIENT_METRICS}, got {self.gradient_metric!r}")
        if self.gradient_metric != "knn" and self.gradient_rep == "head":
            raise ConfigError(f"gradient_metric {self.gradient_metric} needs gradient_rep norms, projection or kfac")
        if self.kfac_features not in KFAC_FEATURES:
            raise ConfigError(f"kfac_features must be one of {KFAC_FEATURES}, got {self.kfac_features!r}")
        if not (isinstance(self.kfac_damping, (int, float)) and self.kfac_damping > 0):
            raise ConfigError(f"kfac_damping must be > 0, got {self.kfac_damping!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if isinstance(self.projection_dim, bool) or int(self.projection_dim) != self.projection_dim \
                or self.projection_dim < 1:
            raise ConfigError(f"projection_dim must be a positive integer, got {self.projection_dim!r}")


#: the gradient signal's scorer by ``gradient_metric``: (config, the representation's fields) -> Scorer
GRADIENT_SCORERS = {
    "knn": lambda c, rep: KNN(c.k, factors=rep, normalize=c.gradient_rep not in ("norms", "kfac"),
                              bank_dtype="float64"),
    "mahalanobis": lambda c, rep: Mahalanobis(source=rep[0]),
    "mahalanobis_predicted": lambda c, rep: Mahalanobis(source=rep[0], assign="predicted"),
    "relative_mahalanobis": lambda c, rep: RMDS(source=rep[0]),
    "leverage": lambda c, rep: Leverage(source=rep[0]),
    "gradpca": lambda c, rep: GradPCA(source=rep[0]),
}
#: every other signal's scorer: config -> Scorer
SIGNAL_SCORERS = {
    "features": lambda c: KNN(c.k, bank_dtype="float64"),
    "max_logit": lambda c: MLS(),
    "gradnorm": lambda c: GradNorm(log=True),
    "gradorth": lambda c: GradOrth(),
    "activation": lambda c: Mahalanobis(source="kfac_activation"),
    "nac": lambda c: NAC(),
    "coverage": lambda c: NAC(statistic="activation"),
    "gaia": lambda c: GAIAA(),
}
#: the fields of ScorerInputs that each gradient representation fills
REP_FIELDS = {"head": ("logit_grad", "features"), "norms": ("norms",), "projection": ("projection",),
              "kfac": ("kfac",)}


def signal_scorers(config: FusionConfig) -> dict[str, Scorer]:
    """The unfitted scorer of every signal of ``config``, by signal name."""
    rep = REP_FIELDS[config.gradient_rep]
    return {s: GRADIENT_SCORERS[config.gradient_metric](config, rep) if s == "gradient" else SIGNAL_SCORERS[s](config)
            for s in config.signals}


@register(kind="component")
class FusedScorer(Scorer):
    """Combined one-class signals of the final classifier (the ``plus`` preset).

    ``fit(train, labels)``: known training samples (labels 0..K-1) fit every signal;
    ``calibrate(held_out)``: held-out knowns fit the calibrator (``needs_calibration``);
    ``score_samples(inputs)``: float64 N, higher = more likely known;
    ``signal_scores(inputs)``: the raw score of every signal (dict of float64 N).
    """

    method_id = "fused"
    family = "gradient"
    paper = "gradosr plus preset: Sun et al., ICML 2022; Vaze et al., ICLR 2022; Fisher 1925"
    needs = ("logits", "features", "logit_grad")
    needs_fit = True
    needs_calibration = True

    def __init__(self, config: FusionConfig | None = None):
        self.config = config
        self.fusion = config or FusionConfig()
        self.signals = signal_scorers(self.fusion)
        self.needs = tuple(dict.fromkeys(n for sc in self.signals.values() for n in sc.needs))

    def _accumulate(self, chunk: ScorerInputs, labels) -> None:
        for sc in self.signals.values():
            sc.partial_fit(chunk, labels)

    def _finalize(self) -> None:
        for sc in self.signals.values():
            sc.check_fitted()
        self.fitted_ = True

    def fit(self, data, labels=None) -> "FusedScorer":
        self.signals = signal_scorers(self.fusion)
        self.calibrator_ = None
        return super().fit(data, labels)

    def calibrate(self, held_out, outliers=None) -> "FusedScorer":
        """Fit the calibrator on the signals' scores of held-out knowns and, for
        ``combine="learned"``, of the outliers generated from them: each one ScorerInputs
        or an iterable of ScorerInputs chunks (only their scores are kept)."""
        calibrator = CALIBRATORS[self.fusion.combine]()
        scores = self._scores_of(held_out)
        if scores is None:
            raise DataError("calibrate needs held-out known samples")
        generated = None
        if calibrator.needs_outliers:
            generated = self._scores_of(outliers) if outliers is not None else None
            if generated is None:
                raise DataError(f"combine={self.fusion.combine} needs outliers generated from the held-out knowns")
        self.calibrator_ = calibrator.fit(scores, generated)
        return self

    def _scores_of(self, inputs) -> dict[str, np.ndarray] | None:
        """Every signal's scores of one ScorerInputs or of an iterable of chunks (None if empty)."""
        parts = [self.signal_scores(p) for p in ([inputs] if isinstance(inputs, ScorerInputs) else inputs)]
        return {s: np.concatenate([p[s] for p in parts]) for s in parts[0]} if parts else None

    @property
    def k_(self) -> int | None:
        """The k of the kNN signals (None without one)."""
        return next((sc.k_ for sc in self.signals.values() if isinstance(sc, KNN)), None)

    def signal_scores(self, inputs: ScorerInputs) -> dict[str, np.ndarray]:
        self.check_fitted()
        return {s: np.asarray(sc.score_samples(inputs), dtype=np.float64) for s, sc in self.signals.items()}

    def score_samples(self, inputs: ScorerInputs) -> np.ndarray:
        if getattr(self, "calibrator_", None) is None:
            raise NotFittedError("the fused detector is not calibrated: call calibrate(held_out) after fit")
        return self.calibrator_.combine(self.signal_scores(inputs))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if getattr(self, "calibrator_", None) is None:
            raise NotFittedError("the fused detector is not fitted")
        tensors, metas = {}, {}
        for s, sc in self.signals.items():
            t, metas[s] = sc.state()
            tensors.update(with_prefix(t, f"signals.{s}."))
        t, cal = self.calibrator_.state()
        tensors.update(with_prefix(t, "calibrator."))
        config = self.fusion.to_dict()
        return tensors, {"method_id": self.method_id, "config": config, "signals": metas, "calibrator": cal}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "FusedScorer":
        try:
            self = cls(FusionConfig(**meta["config"]))
            for s in self.fusion.signals:
                m = meta["signals"][s]
                self.signals[s] = METHODS[m["method_id"]].factory.from_state(under_prefix(tensors, f"signals.{s}."), m)
            self.calibrator_ = CALIBRATORS[meta["calibrator"]["combine"]].from_state(
                under_prefix(tensors, "calibrator."), meta["calibrator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"the fused detector's files are incomplete: {exc}") from None
        self.fitted_ = True
        return self
