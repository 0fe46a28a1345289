"""The ``plus`` preset's strategy (``OSRConfig.method == "fusion"``): no proxy
classifier; the final classifier's known training samples are modelled directly by the
fused detector (:class:`gradosr.detectors.fusion.FusedScorer`: a gradient signal, the
activation signal, kNN on features, max logit, …), calibrated on the held-out knowns.

The gradient representations it computes (:meth:`FusedMethod.inputs`): the logit
gradient g (N×K) of the configured loss, whose outer product with the features is the
head's weight gradient g hᵀ; the paper's log gradient norms (N×P), standardised with the
held-out knowns' statistics; a random projection of the full per-sample gradient of
every Linear/Conv weight (N×P', :mod:`gradosr.gradients.projection`); the per-layer
log Fisher-whitened (K-FAC) gradient norms of the layers below the head, with the
factors fitted on the known training inputs (:mod:`gradosr.gradients.kfac`), whose
activation factors also feed the ``activation`` signal. With ``fusion.combine="learned"``
the calibration also scores outliers generated from the held-out knowns
(:mod:`gradosr.data.calibration_outliers`).
"""

from __future__ import annotations

import numpy as np
import torch

from gradosr.checkpoint import under_prefix, with_prefix
from gradosr.classifier import Classifier
from gradosr.data.calibration_outliers import make_outliers
from gradosr.detectors.calibration import CALIBRATORS
from gradosr.detectors.fusion import FusedScorer, signal_scorers
from gradosr.detectors.inputs import ScorerInputs
from gradosr.errors import CheckpointError
from gradosr.gradients import select_parameters
from gradosr.gradients.logit import logit_gradient
from gradosr.gradients.targets import check_n_ones
from gradosr.methods.base import FitContext, FitData, register_strategy
from gradosr.methods.detector_inputs import gradient_features
from gradosr.representation import Standardizer, check_params_exist
from gradosr.streams import chunk_rows, zip_labels


@register_strategy("fusion")
class FusedMethod:
    """The ``fusion`` strategy; fitted attributes ``detector_``, ``scaler_`` (of the
    gradient norms) and ``param_names_``."""

    def __init__(self, config, seed: int = 0, progress: bool = False):
        self.config, self.seed, self.progress = config, seed, progress

    def check(self, k: int) -> None:
        check_n_ones(self.config.representation.n_ones, k)

    def _uses(self, rep: str) -> bool:
        fus = self.config.fusion
        return "gradient" in fus.signals and fus.gradient_rep == rep

    def _needs_kfac(self) -> bool:
        """Whether the K-FAC factors are fitted: the kfac gradient representation or the
        ``activation`` signal (its activation factors)."""
        return self._uses("kfac") or "activation" in self.config.fusion.signals

    def _runs_model(self) -> bool:
        """Whether a signal runs the classifier itself (it reads ``model`` and ``inputs``)."""
        return any(sc.needs_model for sc in signal_scorers(self.config.fusion).values())

    def fit(self, ctx: FitContext, data: FitData) -> "FusedMethod":
        """Streamed: the known training and held-out inputs are read chunk by chunk
        (:mod:`gradosr.streams`); what the detector keeps is what its signals keep by
        definition (the features' kNN bank, N×D float64, and a gradient kNN signal's bank;
        the Gaussian signals' class moments; the K-FAC factors) and the held-out knowns'
        signal scores."""
        clf, rep = ctx.classifier, self.config.representation
        rows = chunk_rows(self.config.extraction.batch_size)
        self.param_names_ = []
        self.scaler_ = Standardizer.identity(0)
        self.kfac_ = None
        if self._uses("norms"):
            self.param_names_ = select_parameters(clf.model, list(rep.params) if rep.params is not None else None)
            self.scaler_ = Standardizer.fit(torch.cat([self._norms(clf, x, "held-out knowns")
                                                       for x in data.xv.chunks(rows)]))
        if self._needs_kfac():
            from gradosr.gradients.kfac import fit_factors

            self.kfac_ = fit_factors(clf.model, lambda: data.xt.chunks(rows), rep.target, rep.n_ones, rep.output,
                                     self.config.fusion.kfac_damping, self.config.extraction.batch_size)
            if self._uses("kfac") and self.config.fusion.gradient_metric == "knn":
                self.scaler_ = Standardizer.fit(torch.cat([self._kfac(clf, x)[0] for x in data.xv.chunks(rows)]))
        self.detector_ = FusedScorer(self.config.fusion)
        self.detector_.fit((self.inputs(clf, x, "known training"), y) for x, y in zip_labels(data.xt, data.yt, rows))
        outliers = None
        if CALIBRATORS[self.config.fusion.combine].needs_outliers:
            # made from the held-out knowns only (docs/ablation.md, round 4): never an unknown class
            outliers = (self.inputs(clf, x, "calibration outliers") for x in make_outliers(
                zip_labels(data.xv, data.yv, rows), self.config.fusion.calibration_outliers, self.seed))
        self.detector_.calibrate((self.inputs(clf, x, "held-out knowns") for x in data.xv.chunks(rows)), outliers)
        return self

    def _norms(self, clf: Classifier, x: torch.Tensor, desc: str) -> torch.Tensor:
        return gradient_features(clf.model, x, self.config, self.param_names_, self.seed, self.progress, desc)

    def _kfac(self, clf: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the K-FAC representation ``fusion.kfac_features`` of model inputs x, float64
        N×L, N×2L or N×1; the per-layer log activation factors, N×L), from one pass."""
        from gradosr.gradients.kfac import kfac_features

        rep, which = self.config.representation, self.config.fusion.kfac_features
        f = kfac_features(clf.model, x, self.kfac_, rep.target, rep.n_ones, rep.output,
                          self.config.extraction.batch_size)
        if which == "both":
            return torch.cat([f["activation"], f["gradient"]], 1), f["activation"]
        base = f["activation"] if which.startswith("activation") else f["whitened"]
        return (torch.logsumexp(base, 1, keepdim=True) if which.endswith("-sum") else base), f["activation"]

    def inputs(self, clf: Classifier, x: torch.Tensor, desc: str = "gradients") -> ScorerInputs:
        """What the fused detector reads of model inputs x: logits N×K and features N×D
        (float64) and the configured gradient representations."""
        rep, fus = self.config.representation, self.config.fusion
        logits, feats = clf.logits_and_features(x)
        out = ScorerInputs(logits.to(torch.float64), feats.to(torch.float64))
        if self._runs_model():  # nac, coverage, gaia: they run the classifier on the inputs themselves
            out.model, out.inputs = clf.model, x
        if self._uses("head"):
            out.gradients["logit_grad"] = logit_gradient(logits, rep.target, rep.n_ones, rep.output)
        if self._uses("norms"):
            out.gradients["norms"] = self.scaler_(self._norms(clf, x, desc))
        if self._needs_kfac():
            kf, act = self._kfac(clf, x)
            if self._uses("kfac"):
                out.gradients["kfac"] = self.scaler_(kf) if self.config.fusion.gradient_metric == "knn" else kf
            if "activation" in fus.signals:
                out.gradients["kfac_activation"] = act
        if self._uses("projection"):
            from gradosr.gradients.projection import projected_gradients

            # the projection matrices are drawn from the method's seed (stored in osr.json)
            out.gradients["projection"] = projected_gradients(clf.model, x, fus.projection_dim, rep.target,
                                                              rep.n_ones, rep.output, seed=self.seed)
        return out

    def score_samples(self, classifier: Classifier, x: torch.Tensor) -> np.ndarray:
        """The combined signals (float64 N), higher = more likely known."""
        return self.detector_.score_samples(self.inputs(classifier, x))

    def proxies(self) -> list:
        return []

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.detector_.state()
        tensors = with_prefix(tensors, "detector.")
        tensors["scaler.final.mean"], tensors["scaler.final.std"] = self.scaler_.mean, self.scaler_.std
        kfac = getattr(self, "kfac_", None)
        if kfac is not None:
            tensors.update(with_prefix(kfac.state(), "kfac."))
        return tensors, {"param_names": self.param_names_, "detector": meta,
                         "kfac_layers": kfac.names if kfac is not None else None}

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, config, classifier: Classifier, seed: int) -> "FusedMethod":
        self = cls(config, seed)
        try:
            self.param_names_ = list(meta["param_names"])
            self.scaler_ = Standardizer(tensors["scaler.final.mean"], tensors["scaler.final.std"])
            self.detector_ = FusedScorer.from_state(under_prefix(tensors, "detector."), meta["detector"])
            self.kfac_ = None
            if meta.get("kfac_layers") is not None:
                from gradosr.gradients.kfac import KFACFactors

                self.kfac_ = KFACFactors.from_state(meta["kfac_layers"], under_prefix(tensors, "kfac."))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the stored fused method is incomplete: missing {exc}") from None
        check_params_exist(self.param_names_, classifier.model)
        return self
