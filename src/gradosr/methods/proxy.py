"""The paper's method (Lee & AlRegib, "Open-Set Recognition with Gradient-Based
Representations", ICIP 2021, §3.2): an MLP detector trained on a *proxy* classifier's
gradient representations and applied to the final classifier's.

The known classes are split into proxy knowns and proxy unknowns
(:mod:`gradosr.methods.splits`); a proxy classifier is trained on the proxy knowns
(:class:`gradosr.methods.proxy_store.ProxyStore`); its gradient features
(:func:`gradosr.methods.detector_inputs.gradient_features`, N×P) of proxy-known images
(label known) and proxy-unknown images (label unknown), standardised, train the MLP
(:class:`gradosr.detectors.mlp.MLPDetector`). With ``proxy_ensemble`` > 1 there is one
proxy split, proxy classifier and detector per member, and the score is the mean
P(known) of the members.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from gradosr.checkpoint import under_prefix, with_prefix
from gradosr.classifier import Classifier
from gradosr.detectors.inputs import ScorerInputs
from gradosr.detectors.mlp import MLPDetector
from gradosr.errors import CheckpointError, ConfigError
from gradosr.gradients import select_parameters
from gradosr.gradients.targets import check_n_ones
from gradosr.methods.base import FitContext, FitData, register_strategy
from gradosr.methods.detector_inputs import gradient_features, projection_columns
from gradosr.methods.splits import proxy_splits
from gradosr.representation import Standardizer, check_params_exist

SCALERS = ("proxy", "final")


@dataclass
class ProxyMember:
    """One proxy split: its proxy-unknown labels, its MLP detector, the standardisers of
    its detector inputs (``proxy``/``final`` classifier) and, after a fit, its proxy
    classifier (a loaded run does not carry it)."""

    proxy_unknown: list[int]
    detector: MLPDetector
    scalers: dict[str, Standardizer]
    proxy: Classifier | None = None


@register_strategy("proxy")
class ProxyMethod:
    """The ``proxy`` strategy; fitted attributes ``members_`` and ``param_names_``."""

    def __init__(self, config, seed: int = 0, progress: bool = False):
        self.config, self.seed, self.progress = config, seed, progress

    def check(self, k: int) -> None:
        cfg = self.config
        n_proxy = k - len(proxy_splits(k, 0, cfg.proxy_unknown, cfg.proxy_ensemble)[0])
        try:
            check_n_ones(cfg.representation.n_ones, n_proxy)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the proxy classifier has {n_proxy} of the {k} known classes)") from None

    def fit(self, ctx: FitContext, data: FitData) -> "ProxyMethod":
        """Not streamed: the proxy classifiers train on, and the detector reads, subsets
        of the known training and held-out inputs, which are materialised here
        (docs/design.md, "Streaming")."""
        cfg = self.config
        data = replace(data, xt=data.xt.tensor(), xv=data.xv.tensor())
        splits = proxy_splits(ctx.classifier.num_classes, data.split_seed, cfg.proxy_unknown, cfg.proxy_ensemble)
        self.members_: list[ProxyMember] = []
        for i, labels in enumerate(splits):  # member i > 0 reuses member 0's final-classifier statistics
            self.members_.append(self._fit_member(ctx, data, labels, i))
        return self

    def _fit_member(self, ctx: FitContext, data: FitData, proxy_unknown: list[int], index: int) -> ProxyMember:
        cfg, xt, yt, xv, yv = self.config, data.xt, data.yt, data.xv, data.yv
        u_train, u_val = np.isin(yt, proxy_unknown), np.isin(yv, proxy_unknown)
        proxy = ctx.store.get(ctx.classifier, ctx.train_config, ctx.proxy_factory, xt, yt, xv, yv, proxy_unknown,
                              index, data.identity, ctx.run_dir, ctx.device, ctx.progress)
        rep = cfg.representation
        self.param_names_ = select_parameters(proxy.model, list(rep.params) if rep.params is not None else None)
        check_params_exist(self.param_names_, ctx.classifier.model)

        known_x = xt[~u_train] if cfg.detector_data == "train" else xv[~u_val]
        unknown_x = torch.cat([xt[u_train], xv[u_val]])
        r_known = self._features(proxy.model, known_x, "proxy knowns")
        r_unknown = self._features(proxy.model, unknown_x, "proxy unknowns")
        r_det = torch.cat([r_known, r_unknown])
        is_known = np.concatenate([np.ones(len(r_known), bool), np.zeros(len(r_unknown), bool)])
        if cfg.standardize == "train":
            scaler = Standardizer.fit(r_det)
            scalers = {"proxy": scaler, "final": scaler}
        elif cfg.standardize == "own":
            held = r_known if cfg.detector_data == "heldout" else self._features(proxy.model, xv[~u_val],
                                                                                  "proxy held-out")
            final = self.members_[0].scalers["final"] if index > 0 else Standardizer.fit(
                self._features(ctx.classifier.model, xv, "held-out knowns"))
            scalers = {"proxy": Standardizer.fit(held), "final": final}
        else:
            scalers = {w: Standardizer.identity(r_det.shape[1]) for w in SCALERS}
        inputs = ScorerInputs(gradients={"representation": scalers["proxy"](r_det).float()})
        detector = MLPDetector(cfg.detector).fit(inputs, is_known)
        return ProxyMember(list(proxy_unknown), detector, scalers, proxy)

    def _features(self, model, x: torch.Tensor, desc: str) -> torch.Tensor:
        return gradient_features(model, x, self.config, self.param_names_, self.seed, self.progress, desc)

    def raw_representations(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        """The final classifier's detector inputs of model inputs x, unstandardised (float64 N×P)."""
        return self._features(classifier.model, x, "gradients")

    def representations(self, classifier: Classifier, x: torch.Tensor) -> torch.Tensor:
        """Detector inputs of x standardised for the first proxy split (float64 N×P)."""
        return self.members_[0].scalers["final"](self.raw_representations(classifier, x))

    def score_samples(self, classifier: Classifier, x: torch.Tensor) -> np.ndarray:
        """P(known) (float64 N), the mean over the members of an ensemble."""
        r = self.raw_representations(classifier, x)
        return np.mean([m.detector.predict_proba(m.scalers["final"](r).float()) for m in self.members_], axis=0)

    def proxies(self) -> list[tuple[int, Classifier]]:
        """(member index, proxy classifier) of the members that carry one."""
        return [(i, m.proxy) for i, m in enumerate(self.members_) if m.proxy is not None]

    # ------------------------------------------------------------ persistence
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, members = {}, []
        for i, m in enumerate(self.members_):
            net, meta = m.detector.state()
            tensors.update(with_prefix(net, f"members.{i}.detector."))
            for w, sc in m.scalers.items():
                tensors[f"members.{i}.scaler.{w}.mean"], tensors[f"members.{i}.scaler.{w}.std"] = sc.mean, sc.std
            members.append({"proxy_unknown": m.proxy_unknown, "detector": meta})
        return tensors, {"param_names": self.param_names_, "members": members}

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, config, classifier: Classifier, seed: int) -> "ProxyMethod":
        self = cls(config, seed)
        try:
            self.param_names_ = list(meta["param_names"])
            check_params_exist(self.param_names_, classifier.model)
            self.members_ = []
            for i, m in enumerate(meta["members"]):
                part = under_prefix(tensors, f"members.{i}.detector.")
                scalers = {w: Standardizer(tensors[f"members.{i}.scaler.{w}.mean"],
                                           tensors[f"members.{i}.scaler.{w}.std"]) for w in SCALERS}
                self.members_.append(ProxyMember(m["proxy_unknown"], MLPDetector.from_state(part, m["detector"]),
                                                 scalers))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"the stored proxy method is incomplete: missing {exc}") from None
        if len(self.members_) != config.proxy_ensemble:
            raise CheckpointError(f"the run should hold {config.proxy_ensemble} proxy detectors, "
                                  f"it holds {len(self.members_)}")
        n_proj = len(projection_columns(classifier.model, config.projection_inputs)) if config.projection_inputs else 0
        width = len(self.param_names_) + n_proj + len(config.logit_inputs)
        for m in self.members_:
            if m.detector.net_[0].in_features != width:
                raise CheckpointError(f"the detector expects {m.detector.net_[0].in_features} features, "
                                      f"but lists {len(self.param_names_)} parameters, {n_proj} projected "
                                      f"gradients and {len(config.logit_inputs)} logit inputs")
        return self
