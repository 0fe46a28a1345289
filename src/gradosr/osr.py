"""``GradientOSR``: the open-set recognizer of Lee & AlRegib, "Open-Set Recognition with
Gradient-Based Representations", ICIP 2021.

1. A closed-set classifier is trained on the K known classes (or brought by the user).
2. Training with known classes only (paper §3.2): the known classes are split into
   proxy knowns K_K and proxy unknowns K_U (max(1, round(K/3)) of them, drawn with the
   split's seed); a proxy classifier is trained on K_K.
3. The proxy classifier's gradient representations r(x) (Eq. 1: per-parameter squared
   gradient norms of the loss against a confounding label) of K_K images (label known)
   and K_U images (label unknown) train an unknown detector (2 FC layers).
4. At test time r(x) comes from the final classifier; the detector gives P(known), and
   an input is accepted as known when P(known) >= threshold (the paper: 0.95), else it
   is labelled -1 (unknown). Accepted inputs get the classifier's argmax.

Every choice the paper leaves open is an option of :class:`OSRConfig`, recorded in
``osr.json``. Presets: ``paper`` (the paper as stated, DESIGN.md §2) and ``plus``
(``method="fusion"``: no proxy classifier; the final classifier's known training
samples are modelled directly, combining kNN-in-gradient-space, kNN-on-feature and
max-logit signals by Fisher's method on their p-values against held-out knowns, see
:mod:`gradosr.detectors.fusion` and docs/ablation.md).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradosr.checkpoint import (
    FORMAT_VERSION,
    atomic_write_json,
    check_folder,
    load_tensors,
    read_json,
    save_tensors,
)
from gradosr.classifier import Classifier, batched_outputs
from gradosr.data.protocols import OSRData
from gradosr.detectors.fusion import FusionConfig, FusionDetector, logit_gradient
from gradosr.detectors.mlp import DetectorConfig, MLPDetector
from gradosr.errors import CheckpointError, ConfigError, DataError
from gradosr.gradients.targets import check_n_ones
from gradosr.metrics import open_set_predictions, threshold_at_tpr
from gradosr.models import find_head, reset_parameters, resize_head
from gradosr.representation import (
    RepresentationConfig,
    Standardizer,
    check_params_exist,
    extract,
    transform,
)
from gradosr.train import TrainConfig, identity_mismatch, train_classifier

OSR_FORMAT = "gradosr.osr"
DETECTOR_FORMAT = "gradosr.detector"
STANDARDIZE = ("train", "own", "none")
DETECTOR_DATA = ("train", "heldout")
THRESHOLD_RULES = ("fixed", "tpr")
METHODS = ("proxy", "fusion")
LOGIT_INPUTS = ("max_logit", "logsumexp", "max_softmax")


@dataclass(frozen=True)
class OSRConfig:
    """Every option of the method (DESIGN.md §2, §8).

    Attributes:
        method: ``proxy`` (the paper: an MLP trained on a proxy classifier's gradient
            representations) or ``fusion`` (the ``plus`` preset: one-class signals of
            the final classifier, :class:`gradosr.detectors.fusion.FusionDetector`).
        representation: target, n_ones, softmax/sigmoid, parameter selection, log.
        standardize: ``train`` = mean/std of the detector's training features, applied
            to every input; ``own`` = each classifier's features standardised by its own
            held-out known statistics (proxy: held-out proxy knowns; final: the
            validation split); ``none``.
        detector_data: proxy-known images that train the detector: ``train`` = the
            proxy classifier's own training images (the paper), ``heldout`` = held-out
            (validation) images of the proxy knowns. Proxy unknowns are all their
            training and validation images either way.
        proxy_unknown: number of proxy-unknown classes (None = max(1, round(K/3))).
        proxy_ensemble: number of proxy splits (distinct proxy-unknown sets, the first
            the paper's single split); one proxy classifier and one detector per split,
            the score is the mean of their P(known) (an ablation of the paper's choice).
        projection_inputs: per-side dimension of the random projections of the full
            per-sample gradients of every Linear/Conv weight below the head
            (:mod:`gradosr.gradients.projection`, LoGra's projection) appended to the
            detector inputs (``proxy``; 0 = none). The head is left out: the proxy's has
            fewer outputs than the final classifier's. The matrices are drawn from the
            method's seed, the same for the proxy and the final classifier.
        logit_inputs: logit statistics appended to the gradient features of the detector
            (``proxy``), each computed by the same classifier as the gradients:
            ``max_logit`` (Vaze et al., ICLR 2022), ``logsumexp`` (the negative free
            energy, Liu et al., NeurIPS 2020), ``max_softmax`` (Hendrycks & Gimpel,
            ICLR 2017).
        threshold_rule: ``fixed`` (accept when P(known) >= ``threshold``) or ``tpr``
            (the threshold accepting ``target_tpr`` of the validation knowns).
        threshold, target_tpr: see ``threshold_rule``.
        detector: the MLP detector's hyperparameters (``proxy``).
        fusion: the fused detector's signals, gradient representation and k (``fusion``).
        batch_size: gradient-extraction batch size (no effect on results).
    """

    preset: str = "paper"
    method: str = "proxy"
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    standardize: str = "train"
    detector_data: str = "train"
    proxy_unknown: int | None = None
    proxy_ensemble: int = 1
    projection_inputs: int = 0
    logit_inputs: tuple[str, ...] = ()
    threshold_rule: str = "fixed"
    threshold: float = 0.95
    target_tpr: float = 0.95
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "fusion" and self.threshold_rule != "tpr":
            raise ConfigError("the fusion method's score is not a probability: use threshold_rule tpr")
        if self.standardize not in STANDARDIZE:
            raise ConfigError(f"standardize must be one of {STANDARDIZE}, got {self.standardize!r}")
        if self.detector_data not in DETECTOR_DATA:
            raise ConfigError(f"detector_data must be one of {DETECTOR_DATA}, got {self.detector_data!r}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if not 0.0 < self.target_tpr <= 1.0:
            raise ConfigError(f"target_tpr must lie in (0, 1], got {self.target_tpr}")
        if self.proxy_unknown is not None and self.proxy_unknown < 1:
            raise ConfigError(f"proxy_unknown must be >= 1, got {self.proxy_unknown}")
        if isinstance(self.proxy_ensemble, bool) or int(self.proxy_ensemble) != self.proxy_ensemble \
                or self.proxy_ensemble < 1:
            raise ConfigError(f"proxy_ensemble must be a positive integer, got {self.proxy_ensemble!r}")
        if isinstance(self.projection_inputs, bool) or int(self.projection_inputs) != self.projection_inputs \
                or self.projection_inputs < 0:
            raise ConfigError(f"projection_inputs must be a non-negative integer, got {self.projection_inputs!r}")
        object.__setattr__(self, "logit_inputs", tuple(self.logit_inputs))
        bad = [s for s in self.logit_inputs if s not in LOGIT_INPUTS]
        if bad or len(set(self.logit_inputs)) != len(self.logit_inputs):
            raise ConfigError(f"logit_inputs must be distinct names among {LOGIT_INPUTS}, got {list(self.logit_inputs)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["representation"] = self.representation.to_dict()
        d["fusion"]["signals"] = list(self.fusion.signals)
        d["logit_inputs"] = list(self.logit_inputs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OSRConfig":
        try:
            rep = RepresentationConfig(**d["representation"])
            det = DetectorConfig(**d["detector"])
            fus = FusionConfig(**d.get("fusion", {}))  # absent in files of gradosr <= 0.1
            rest = {k: v for k, v in d.items() if k not in ("representation", "detector", "fusion")}
            return cls(representation=rep, detector=det, fusion=fus, **rest)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"invalid method config {d!r}: {exc}") from None


PRESETS: dict[str, OSRConfig] = {
    "paper": OSRConfig(),
    # chosen on the mnist-sample splits only (docs/ablation.md)
    "plus": OSRConfig(preset="plus", method="fusion", threshold_rule="tpr", fusion=FusionConfig(combine="fisher")),
}
#: the preset of ``gradosr fit``/``evaluate``/``benchmark`` and of the demo
DEFAULT_PRESET = "plus"

#: keyword options accepted by GradientOSR / the CLI, and where they live in OSRConfig
_REP_KEYS = {f for f in RepresentationConfig.__dataclass_fields__}
_DET_KEYS = {f for f in DetectorConfig.__dataclass_fields__}
_FUS_KEYS = {f for f in FusionConfig.__dataclass_fields__}


def make_config(preset: str = "paper", seed: int | None = None, **options) -> OSRConfig:
    """The preset's config with ``options`` (None = keep) applied.

    Options are fields of :class:`OSRConfig`, :class:`RepresentationConfig` (target,
    n_ones, output, params, log), :class:`DetectorConfig` (hidden, lr, ...) or
    :class:`FusionConfig` (signals, gradient_rep, k).
    ``seed`` sets the detector seed.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    options = {k: v for k, v in options.items() if v is not None}
    rep = {k: options.pop(k) for k in list(options) if k in _REP_KEYS}
    det = {k: options.pop(k) for k in list(options) if k in _DET_KEYS}
    fus = {k: options.pop(k) for k in list(options) if k in _FUS_KEYS}
    if seed is not None:
        det["seed"] = seed
    unknown = set(options) - set(OSRConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}")
    return replace(cfg, representation=replace(cfg.representation, **rep), detector=replace(cfg.detector, **det),
                   fusion=replace(cfg.fusion, **fus), **options)


def logit_statistics(logits: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """The statistics ``names`` (see ``OSRConfig.logit_inputs``) of logits N×K: float64 N×len(names)."""
    z = torch.as_tensor(logits).to(torch.float64)
    stats = {"max_logit": lambda: z.max(dim=1).values, "logsumexp": lambda: torch.logsumexp(z, dim=1),
             "max_softmax": lambda: torch.softmax(z, dim=1).max(dim=1).values}
    return torch.stack([stats[n]() for n in names], dim=1) if names else z.new_zeros((len(z), 0))


def proxy_split(num_known: int, seed: int, num_unknown: int | None = None) -> list[int]:
    """The proxy-unknown labels (sorted, among 0..K-1): ``num_unknown`` (default
    max(1, round(K/3))) drawn with ``seed``. Needs K >= 3 (2 proxy knowns remain)."""
    n_u = max(1, round(num_known / 3)) if num_unknown is None else int(num_unknown)
    if num_known - n_u < 2:
        raise ConfigError(f"{num_known} known classes leave fewer than 2 proxy knowns with {n_u} proxy unknowns; "
                          "the method needs at least 3 known classes")
    rng = np.random.default_rng(seed)
    return sorted(int(c) for c in rng.choice(num_known, n_u, replace=False))


def proxy_splits(num_known: int, seed: int, num_unknown: int | None = None, count: int = 1) -> list[list[int]]:
    """``count`` distinct proxy splits: :func:`proxy_split` with seeds seed, seed + 1, ...,
    skipping repeats; the first is always ``proxy_split(num_known, seed, num_unknown)``."""
    n_u = len(proxy_split(num_known, seed, num_unknown))
    possible = math.comb(num_known, n_u)
    if count > possible:
        raise ConfigError(f"proxy_ensemble {count} exceeds the {possible} distinct sets of {n_u} proxy unknowns "
                          f"among {num_known} known classes")
    splits: list[list[int]] = []
    offset = 0
    while len(splits) < count:
        split = proxy_split(num_known, seed + offset, num_unknown)
        if split not in splits:
            splits.append(split)
        offset += 1
    return splits


@dataclass
class ProxyMember:
    """One proxy split of the ``proxy`` method: its proxy-unknown labels, its MLP
    detector, the standardisers of its detector inputs (``proxy``/``final``) and, while
    fitting, its proxy classifier (a loaded GradientOSR does not carry it)."""

    proxy_unknown: list[int]
    detector: MLPDetector
    scalers: dict[str, Standardizer]
    proxy: Classifier | None = None


class GradientOSR:
    """Open-set recognizer with gradient-based representations (scikit-learn-like).

    Build it with ``GradientOSR(preset="paper", **options)`` and fit it on a protocol
    (:class:`gradosr.data.OSRData`), or wrap your own trained classifier with
    :meth:`from_classifier` and fit it on arrays of known-class data.

    After fitting:
        ``score_samples(x)``: float64 N, P(known) (higher = known);
        ``predict(x)``: int64 N, the class index 0..K-1 or -1 for unknown;
        ``save(dir)`` / ``GradientOSR.load(dir)``: safetensors + JSON, no pickle.

    ``x`` is uint8 images N×H×W×C (preprocessed with the classifier's stored
    preprocessing) or float model inputs N×C×H×W.
    """

    def __init__(self, preset: str = "paper", classifier: Classifier | None = None,
                 train_config: TrainConfig | None = None, proxy_factory: Callable[[int], nn.Module] | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, seed: int = 0, **options):
        self.config = make_config(preset, **options)
        self.classifier = classifier
        self.train_config = train_config
        self.proxy_factory = proxy_factory
        self.device = torch.device(device)
        self.progress = progress
        self.seed = seed
        self.proxy: Classifier | None = None
        self.proxy_unknown: list[int] | None = None
        self.detector: MLPDetector | None = None
        self.scalers: dict[str, Standardizer] = {}
        #: the proxy method's splits (the first is proxy_unknown/proxy/detector/scalers)
        self.members: list[ProxyMember] = []
        self.param_names: list[str] | None = None
        self.threshold_: float | None = None
        #: trained proxy classifiers by proxy-unknown labels; share one dict between
        #: GradientOSR objects on the same classifier to train each proxy once (ablations)
        self.proxy_cache: dict[tuple[int, ...], Classifier] = {}
        #: without a run folder, proxies are stored (and reused) in <proxy_root>/proxy-<labels>/
        self.proxy_root: str | os.PathLike | None = None

    # ----------------------------------------------------------------- building
    @classmethod
    def from_classifier(cls, model: nn.Module, preprocessing=None, class_ids: list[int] | None = None,
                        class_names: list[str] | None = None, train_config: TrainConfig | None = None,
                        proxy_factory: Callable[[int], nn.Module] | None = None, preset: str = "paper",
                        **kwargs) -> "GradientOSR":
        """Wrap a user's trained ``nn.Module`` (N×C×H×W inputs -> N×K logits).

        The proxy classifier comes from ``proxy_factory(num_proxy_classes)`` when given;
        otherwise the model is deep-copied, every parameter re-initialised, its head
        (last ``nn.Linear``) resized to the proxy class count, and trained on the
        proxy-known data with ``train_config`` (default: Adam lr 1e-3, batch 128, 15 epochs).
        """
        head = find_head(model)
        k = head.out_features
        ids = list(range(k)) if class_ids is None else [int(c) for c in class_ids]
        if len(ids) != k:
            raise ConfigError(f"class_ids has {len(ids)} entries but the model's head has {k} outputs")
        clf = Classifier(model, "custom", preprocessing, ids, class_names, {"complete": True})
        return cls(preset=preset, classifier=clf, train_config=train_config or TrainConfig(model="custom"),
                   proxy_factory=proxy_factory, **kwargs)

    @property
    def num_known(self) -> int:
        return self.classifier.num_classes

    # ------------------------------------------------------------------ fitting
    def fit(self, x, y=None, x_val=None, y_val=None, run_dir: str | os.PathLike | None = None) -> "GradientOSR":
        """Fit on a protocol (``x`` an :class:`OSRData`) or on arrays of known data.

        Protocol: the final classifier is trained (or reused from
        ``<run_dir>/classifier``) unless one was given; the proxy classifier likewise
        in ``<run_dir>/proxy``. Arrays: ``x`` uint8 images or float inputs, ``y`` labels
        0..K-1 of the classifier given to :meth:`from_classifier`; ``x_val``/``y_val``
        are held-out knowns (default: a stratified 20% of x).
        """
        run_dir = Path(run_dir) if run_dir is not None else None
        if isinstance(x, OSRData):
            self._check_options(x.num_known)
            data = x
            if self.classifier is None:
                from gradosr.runs import ensure_classifier
                from gradosr.train import default_train_config

                cfg = self.train_config or default_train_config(data.spec.dataset, seed=self.seed)
                self.train_config = cfg
                self.classifier, _ = ensure_classifier(data, cfg, run_dir / "classifier" if run_dir else None,
                                                       device=self.device, progress=self.progress)
            if self.classifier.num_classes != data.num_known:
                raise ConfigError(f"the classifier has {self.classifier.num_classes} classes, the protocol "
                                  f"{data.num_known} known classes")
            if self.train_config is None:
                self.train_config = TrainConfig.from_dict(self.classifier.meta.get("train", {}))
            xt, yt = self.classifier.inputs(data.known_train.images), data.known_train.labels
            xv, yv = self.classifier.inputs(data.val.images), data.val.labels
            seed, identity = data.spec.seed, {"protocol": data.spec.to_dict()}
        else:
            if self.classifier is None:
                raise ConfigError("fitting on arrays needs a trained classifier: use GradientOSR.from_classifier, "
                                  "or pass a protocol (OSRData)")
            self._check_options(self.num_known)
            xt, yt, xv, yv = self._split_arrays(x, y, x_val, y_val)
            seed, identity = self.seed, {}
        self._fit_arrays(xt, np.asarray(yt), xv, np.asarray(yv), seed, identity, run_dir)
        if run_dir is not None:
            self.save(run_dir)
        return self

    def _check_options(self, k: int) -> None:
        """ConfigError, before anything is trained or written, when the options do not fit
        K = ``k`` known classes: too few for a proxy split, or more confounding ones than
        the proxy classifier (the one with the fewest outputs) has."""
        if self.config.method == "fusion":
            check_n_ones(self.config.representation.n_ones, k)
            return
        n_proxy = k - len(proxy_splits(k, 0, self.config.proxy_unknown, self.config.proxy_ensemble)[0])
        try:
            check_n_ones(self.config.representation.n_ones, n_proxy)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (the proxy classifier has {n_proxy} of the {k} known classes)") from None

    def _split_arrays(self, x, y, x_val, y_val):
        from sklearn.model_selection import train_test_split

        if y is None:
            raise ConfigError("fit(x, y) needs the labels y (0..K-1) of x")
        xt = self.classifier.inputs(x)
        if self.classifier.input_shape is None:  # recorded, so that later inputs of another shape are refused
            self.classifier.meta["input_shape"] = list(xt.shape[1:])
        yt = np.asarray(torch.as_tensor(np.asarray(y)).numpy(), dtype=np.int64)
        if yt.ndim != 1 or len(yt) != len(xt):
            raise DataError(f"y must hold one label per sample ({len(xt)}), got shape {yt.shape}")
        k = self.num_known
        if len(yt) and (yt.min() < 0 or yt.max() >= k):
            raise DataError(f"labels must lie in 0..{k - 1}")
        if x_val is None:
            idx_t, idx_v = train_test_split(np.arange(len(yt)), test_size=0.2, stratify=yt, random_state=self.seed)
            return xt[idx_t], yt[idx_t], xt[idx_v], yt[idx_v]
        return xt, yt, self.classifier.inputs(x_val), np.asarray(y_val, dtype=np.int64)

    def _fit_arrays(self, xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor, yv: np.ndarray, seed: int,
                    identity: dict, run_dir: Path | None) -> None:
        cfg, k = self.config, self.num_known
        missing = sorted(set(range(k)) - set(np.unique(yt).tolist()))
        if missing:
            raise DataError(f"known classes {missing} have no training samples")
        if cfg.method == "fusion":
            self._fit_fusion(xt, yt, xv)
            return
        splits = proxy_splits(k, seed, cfg.proxy_unknown, cfg.proxy_ensemble)
        self.members = []
        for i, labels in enumerate(splits):  # member i > 0 reuses member 0's final-classifier statistics
            self.members.append(self._fit_member(xt, yt, xv, yv, labels, i, identity, run_dir))
        first = self.members[0]
        self.proxy_unknown, self.proxy, self.detector, self.scalers = (first.proxy_unknown, first.proxy,
                                                                       first.detector, first.scalers)
        if cfg.threshold_rule == "fixed":
            self.threshold_ = float(cfg.threshold)
        else:
            self.threshold_ = threshold_at_tpr(self.score_samples(xv), cfg.target_tpr)

    def _fit_member(self, xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor, yv: np.ndarray,
                    proxy_unknown: list[int], index: int, identity: dict, run_dir: Path | None) -> ProxyMember:
        """Train (or reuse) the proxy classifier of one proxy split and fit its detector
        (paper §3.2)."""
        cfg = self.config
        u_train, u_val = np.isin(yt, proxy_unknown), np.isin(yv, proxy_unknown)
        proxy = self._ensure_proxy(xt[~u_train], yt[~u_train], xv[~u_val], yv[~u_val], proxy_unknown, index,
                                   identity, run_dir)
        check_params_exist(self._param_names(proxy.model), self.classifier.model)

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
            held = r_known if cfg.detector_data == "heldout" else self._features(proxy.model, xv[~u_val], "proxy held-out")
            final = self.members[0].scalers["final"] if index > 0 else Standardizer.fit(
                self._features(self.classifier.model, xv, "held-out knowns"))
            scalers = {"proxy": Standardizer.fit(held), "final": final}
        else:
            scalers = {"proxy": Standardizer.identity(r_det.shape[1]), "final": Standardizer.identity(r_det.shape[1])}
        detector = MLPDetector(cfg.detector).fit(scalers["proxy"](r_det).float(), is_known)
        return ProxyMember(list(proxy_unknown), detector, scalers, proxy)

    def _fit_fusion(self, xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor) -> None:
        """The ``fusion`` method: no proxy; the detector models the final classifier's
        known training samples, standardised with the held-out knowns ``xv``."""
        cfg = self.config
        self.proxy, self.proxy_unknown, self.members = None, None, []
        self.param_names = []
        if "gradient" in cfg.fusion.signals and cfg.fusion.gradient_rep == "norms":
            self._param_names(self.classifier.model)
            scaler = Standardizer.fit(self._features(self.classifier.model, xv, "held-out knowns"))
        else:
            scaler = Standardizer.identity(0)
        self.scalers = {"proxy": scaler, "final": scaler}
        self.detector = FusionDetector(cfg.fusion).fit(self._views(xt, "known training"), yt,
                                                       self._views(xv, "held-out knowns"))
        self.threshold_ = threshold_at_tpr(self.score_samples(xv), cfg.target_tpr)

    def _views(self, xin: torch.Tensor, desc: str = "gradients") -> dict:
        """What the fused detector reads of model inputs ``xin`` (float64 tensors): logits
        N×K, head-input features N×D, the logit gradient g N×K of the configured loss
        (the head's weight gradient is g hᵀ) and, when needed, g of the uniform target,
        the standardised log gradient norms N×P or the projected full gradients N×P'."""
        rep, fus = self.config.representation, self.config.fusion
        logits, feats = self.classifier.logits_and_features(xin)
        views = {"logits": logits.to(torch.float64), "features": feats.to(torch.float64),
                 "g": logit_gradient(logits, rep.target, rep.n_ones, rep.output)}
        if "gradnorm" in fus.signals or "gradorth" in fus.signals:
            views["g_uniform"] = logit_gradient(logits, "uniform")
        if "gradient" in fus.signals and fus.gradient_rep == "norms":
            views["norms"] = self.scalers["final"](self._features(self.classifier.model, xin, desc))
        if "gradient" in fus.signals and fus.gradient_rep == "projection":
            from gradosr.gradients.projection import projected_gradients

            # the projection matrices are drawn from the method's seed (stored in osr.json)
            views["gproj"] = projected_gradients(self.classifier.model, xin, fus.projection_dim, rep.target,
                                                 rep.n_ones, rep.output, seed=self.seed)
        return views

    def _param_names(self, model: nn.Module) -> list[str]:
        from gradosr.gradients import select_parameters

        rep = self.config.representation
        self.param_names = select_parameters(model, list(rep.params) if rep.params is not None else None)
        return self.param_names

    def _features(self, model: nn.Module, x: torch.Tensor, desc: str) -> torch.Tensor:
        """Transformed (log) representations of model inputs x, followed by the
        configured projected gradients and ``logit_inputs`` of the same model: float64
        N×(P + R + L)."""
        cfg = self.config
        rep = replace(cfg.representation, params=tuple(self.param_names))
        r, _ = extract(model, x, rep, cfg.batch_size, self.progress, desc)
        parts = [transform(r, rep.log)]
        if cfg.projection_inputs:
            from gradosr.gradients.projection import projected_gradients

            keep = self._projection_columns(model)
            pg = projected_gradients(model, x, cfg.projection_inputs, rep.target, rep.n_ones, rep.output,
                                     seed=self.seed, batch_size=cfg.batch_size)
            parts.append(pg[:, keep])
        if cfg.logit_inputs:
            z = batched_outputs(model, x, cfg.batch_size)[0].to(torch.float64)
            parts.append(logit_statistics(z, cfg.logit_inputs))
        return torch.cat(parts, dim=1)

    def _projection_columns(self, model: nn.Module) -> torch.Tensor:
        """Indices of the projected-gradient columns of every layer but the head."""
        from gradosr.gradients.projection import layer_widths
        from gradosr.models import find_head_name

        head, cols, start = find_head_name(model), [], 0
        for name, width in layer_widths(model, self.config.projection_inputs):
            if name != head:
                cols.append(torch.arange(start, start + width))
            start += width
        return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)

    def _ensure_proxy(self, xt, yt, xv, yv, proxy_unknown: list[int], index: int, identity: dict,
                      run_dir: Path | None) -> Classifier:
        """Train (or reuse from ``<run_dir>/proxy``, ``proxy2``, ... for the ensemble's
        ``index``) the proxy classifier of ``proxy_unknown`` on the proxy knowns."""
        keep = [c for c in range(self.num_known) if c not in proxy_unknown]
        if tuple(proxy_unknown) in self.proxy_cache:
            return self.proxy_cache[tuple(proxy_unknown)]
        remap = np.full(self.num_known, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        ids = [self.classifier.class_ids[c] for c in keep]
        names = [self.classifier.class_names[c] for c in keep]
        tc = self.train_config
        wanted = {**identity, "train": tc.to_dict(), "proxy_of": keep}
        if run_dir is not None:
            out = run_dir / ("proxy" if index == 0 else f"proxy{index + 1}")
        elif self.proxy_root is not None:  # proxies kept apart from any run folder (ablations)
            out = Path(self.proxy_root) / ("proxy-" + "-".join(str(c) for c in proxy_unknown))
        else:
            out = None
        custom = self.classifier.arch == "custom"
        if out is not None and (out / "model.json").is_file():
            model = self._new_proxy_model(len(keep)) if custom else None
            stored = Classifier.load(out, model=model, device=self.device)
            reason = identity_mismatch(stored.meta, wanted)
            if reason is None and stored.meta.get("complete"):
                return stored
            if reason is not None:
                raise CheckpointError(f"{out} holds another proxy classifier: {reason}. Use another run folder")
        model = self._new_proxy_model(len(keep)) if custom else None
        proxy = train_classifier((xt, remap[yt]), (xv, remap[yv]), ids, tc, self.classifier.preprocessing,
                                 out_dir=out, progress=self.progress, device=self.device, class_names=names,
                                 meta={**identity, "proxy_of": keep}, model=model,
                                 resume=out is not None and (out / "model.json").is_file())
        self.proxy_cache[tuple(proxy_unknown)] = proxy
        return proxy

    def _new_proxy_model(self, n: int) -> nn.Module:
        if self.proxy_factory is not None:
            model = self.proxy_factory(n)
        else:
            model = copy.deepcopy(self.classifier.model)
            resize_head(model, n)  # before the seeded reset: the new head is initialised from the seed too
            reset_parameters(model, seed=self.train_config.seed)
        if find_head(model).out_features != n:
            raise ConfigError(f"the proxy model must have {n} outputs")
        return model.to(self.device)

    # --------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if self.detector is None:
            raise ConfigError("this GradientOSR is not fitted: call fit() or load() first")

    def representations(self, x) -> torch.Tensor:
        """Standardised detector inputs of ``x`` from the final classifier (float64
        N×(P + L)): the ``proxy`` method's MLP inputs, standardised for the first proxy
        split (the ``fusion`` method reads :meth:`_views`)."""
        return self.scalers["final"](self._raw_representations(x))

    def _raw_representations(self, x) -> torch.Tensor:
        self._check_fitted()
        if self.config.method != "proxy":
            raise ConfigError("representations() are the proxy method's detector inputs; "
                              f"the {self.config.method} method has none")
        return self._features(self.classifier.model, self.classifier.inputs(x), "gradients")

    def score_samples(self, x) -> np.ndarray:
        """Score of each input (float64 N), higher = more likely known: P(known) for the
        ``proxy`` method (the mean over the proxy splits of an ensemble), the combined
        signals for ``fusion`` (:class:`gradosr.detectors.fusion.FusionDetector`)."""
        self._check_fitted()
        if self.config.method == "fusion":
            return self.detector.score_samples(self._views(self.classifier.inputs(x)))
        r = self._raw_representations(x)
        return np.mean([m.detector.predict_proba(m.scalers["final"](r).float()) for m in self.members], axis=0)

    def predict(self, x, return_scores: bool = False):
        """Open-set labels (int64 N): the classifier's argmax, or -1 where the score is
        below the threshold. With ``return_scores``: (labels, scores)."""
        self._check_fitted()
        xin = self.classifier.inputs(x)
        scores = self.score_samples(xin)
        closed = self.classifier.logits(xin).argmax(1).numpy() if len(xin) else np.zeros(0, np.int64)
        labels = open_set_predictions(closed, scores, self.threshold_) if len(xin) else np.zeros(0, np.int64)
        return (labels, scores) if return_scores else labels

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``classifier/``, ``proxy/`` (``proxy2/``, ... for an ensemble),
        ``detector/`` and ``osr.json`` (last). Member i > 0 of an ensemble is stored
        under the tensor prefix ``m<i>.``."""
        self._check_fitted()
        directory = Path(directory)
        self.classifier.save(directory / "classifier")
        members = self.members if self.config.method == "proxy" else []
        for i, m in enumerate(members):
            if m.proxy is not None:  # a loaded GradientOSR does not carry its proxies
                m.proxy.save(directory / ("proxy" if i == 0 else f"proxy{i + 1}"))
        tensors, meta = self.detector.state()
        prefix = "net" if self.config.method == "proxy" else "fusion"
        tensors = {f"{prefix}.{k}": v for k, v in tensors.items()}
        for which, sc in self.scalers.items():
            tensors[f"scaler.{which}.mean"], tensors[f"scaler.{which}.std"] = sc.mean, sc.std
        extra = []
        for i, m in enumerate(members[1:], start=1):
            net, m_meta = m.detector.state()
            tensors.update({f"m{i}.net.{k}": v for k, v in net.items()})
            for which, sc in m.scalers.items():
                tensors[f"m{i}.scaler.{which}.mean"], tensors[f"m{i}.scaler.{which}.std"] = sc.mean, sc.std
            extra.append(m_meta)
        save_tensors(directory / "detector", "detector", tensors,
                     {**meta, "param_names": self.param_names, "members": extra}, DETECTOR_FORMAT)
        atomic_write_json(directory / "osr.json", {
            "format": OSR_FORMAT, "format_version": FORMAT_VERSION, "config": self.config.to_dict(),
            "threshold": self.threshold_, "threshold_rule": self.config.threshold_rule,
            "proxy_unknown": self.proxy_unknown, "proxy_unknowns": [m.proxy_unknown for m in members],
            "train": self.train_config.to_dict() if self.train_config else None, "seed": self.seed,
        })

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None,
             device: str | torch.device = "cpu") -> "GradientOSR":
        """Load what :meth:`save` wrote. ``model``: an instance of a custom architecture."""
        directory = check_folder(directory, "a run folder (osr.json, classifier/, detector/)")
        meta = read_json(directory / "osr.json")
        if meta.get("format") != OSR_FORMAT:
            raise CheckpointError(f"{directory}/osr.json is not a gradosr method file")
        if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"{directory} was written by a newer gradosr (format version "
                                  f"{meta.get('format_version')}); upgrade gradosr to read it")
        config = OSRConfig.from_dict(meta["config"])
        clf = Classifier.load(directory / "classifier", model=model, device=device)
        self = cls.__new__(cls)
        self.config, self.classifier, self.device, self.progress = config, clf, torch.device(device), False
        self.train_config = TrainConfig.from_dict(meta["train"]) if meta.get("train") else None
        self.proxy_factory, self.proxy, self.seed = None, None, int(meta.get("seed", 0))
        self.proxy_unknown = meta.get("proxy_unknown")
        self.threshold_ = float(meta["threshold"])
        tensors, dmeta = load_tensors(directory / "detector", "detector", DETECTOR_FORMAT)
        self.proxy_cache, self.proxy_root = {}, None
        self.param_names = list(dmeta["param_names"])
        check_params_exist(self.param_names, clf.model)

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        def scalers(prefix: str) -> dict[str, Standardizer]:
            try:
                return {w: Standardizer(tensors[f"{prefix}scaler.{w}.mean"], tensors[f"{prefix}scaler.{w}.std"])
                        for w in ("proxy", "final")}
            except KeyError as exc:
                raise CheckpointError(f"{directory}/detector is missing {exc}") from None

        self.scalers, self.members = scalers(""), []
        if config.method == "fusion":
            self.detector = FusionDetector.from_state(part("fusion."), dmeta)
            return self
        self.detector = MLPDetector.from_state(part("net."), dmeta)
        self.members = [ProxyMember(self.proxy_unknown, self.detector, self.scalers)]
        unknowns = meta.get("proxy_unknowns") or [self.proxy_unknown]
        extra = dmeta.get("members", [])
        if len(extra) != config.proxy_ensemble - 1 or len(unknowns) != config.proxy_ensemble:
            raise CheckpointError(f"{directory} should hold {config.proxy_ensemble} proxy detectors, "
                                  f"it holds {len(extra) + 1}")
        for i, m_meta in enumerate(extra, start=1):
            self.members.append(ProxyMember(unknowns[i], MLPDetector.from_state(part(f"m{i}.net."), m_meta),
                                            scalers(f"m{i}.")))
        n_proj = len(self._projection_columns(clf.model)) if config.projection_inputs else 0
        width = len(self.param_names) + n_proj + len(config.logit_inputs)
        for m in self.members:
            if m.detector.net[0].in_features != width:
                raise CheckpointError(f"{directory}/detector expects {m.detector.net[0].in_features} features, "
                                      f"but lists {len(self.param_names)} parameters, {n_proj} projected "
                                      f"gradients and {len(config.logit_inputs)} logit inputs")
        return self
