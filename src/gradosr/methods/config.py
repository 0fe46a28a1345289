"""The configuration of a GradientOSR method: :class:`OSRConfig`, the presets and
:func:`make_config`, which applies options by name.

Option names are the fields of :class:`OSRConfig` and of its sections, in
scikit-learn's nested style: ``representation__target``, ``detector__hidden``,
``fusion__k``, ``extraction__batch_size``. A flat name (``target``, ``hidden``, ``k``)
is accepted where exactly one section has the field; an ambiguous one (``batch_size``:
the detector's or the extraction's) is refused, naming its candidates. Every field
carries its help text and choices (:func:`gradosr.options.option`), from which the
command line generates its flags.
:func:`config_options` is the inverse: the options that turn a preset into a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from gradosr.detectors.base import _jsonable
from gradosr.detectors.fusion import FusionConfig
from gradosr.detectors.mlp import DetectorConfig
from gradosr.detectors.registry import register_preset
from gradosr.errors import CheckpointError, ConfigError
from gradosr.options import option
from gradosr.representation import RepresentationConfig

STANDARDIZE = ("train", "own", "none")
DETECTOR_DATA = ("train", "heldout")
THRESHOLD_RULES = ("fixed", "tpr")
METHODS = ("proxy", "fusion")
LOGIT_INPUTS = ("max_logit", "logsumexp", "max_softmax")


@dataclass(frozen=True)
class ExtractionConfig:
    """How gradients and outputs are computed (no effect on results)."""

    batch_size: int = option(256, help="gradient-extraction batch size (no effect on results)")

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"the extraction batch size must be a positive integer, got {self.batch_size!r}")


@dataclass(frozen=True)
class OSRConfig:
    """Every option of the method (docs/design.md, "The method").

    Attributes:
        method: ``proxy`` (the paper: an MLP trained on a proxy classifier's gradient
            representations) or ``fusion`` (the ``plus`` preset: one-class signals of
            the final classifier, :class:`gradosr.detectors.fusion.FusedScorer`).
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
        extraction: the gradient-extraction batch size (no effect on results).
    """

    preset: str = option("paper", help="the preset this config derives from", cli=False)
    method: str = option("proxy", help="the method strategy", choices=METHODS, cli=False)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    standardize: str = option("train", choices=STANDARDIZE, help="paper: standardisation of the detector inputs")
    detector_data: str = option("train", choices=DETECTOR_DATA,
                                help="paper: proxy-known images for the detector: the proxy's training images "
                                     "(the paper) or held-out ones")
    proxy_unknown: int | None = option(None, kind="int",
                                       help="paper: number of proxy-unknown classes (default round(K/3))")
    proxy_ensemble: int = option(1, help="paper: number of proxy splits, one detector each, P(known) averaged")
    projection_inputs: int = option(0, help="paper: per-side dimension of projected full gradients of the layers "
                                            "below the head appended to the detector inputs (0: none)")
    logit_inputs: tuple[str, ...] = option((), choices=LOGIT_INPUTS,
                                           help="paper: comma-separated logit statistics appended to the detector "
                                                "inputs")
    threshold_rule: str = option("fixed", choices=THRESHOLD_RULES,
                                 help="fixed P(known) threshold, or the one accepting --target-tpr of held-out knowns")
    threshold: float = option(0.95, help="fixed P(known) threshold (paper: 0.95)")
    target_tpr: float = option(0.95, help="fraction of held-out knowns accepted (threshold rule tpr)")
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)

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
        """The config as JSON values: every tuple, in any section, becomes a list, so a
        saved config reads back equal (:meth:`from_dict`)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "OSRConfig":
        """The config of ``to_dict`` (also of files written before a section existed:
        ``fusion`` is absent in gradosr <= 0.1, ``extraction`` was a top-level
        ``batch_size``)."""
        try:
            d = dict(d)
            extraction = d.pop("extraction", {"batch_size": d.pop("batch_size", 256)})
            d.pop("batch_size", None)
            sections = {"representation": RepresentationConfig(**d.pop("representation")),
                        "detector": DetectorConfig(**d.pop("detector")),
                        "fusion": FusionConfig(**d.pop("fusion", {})), "extraction": ExtractionConfig(**extraction)}
            return cls(**sections, **d)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"invalid method config {d!r}: {exc}") from None


PRESETS: dict[str, OSRConfig] = {
    "paper": OSRConfig(),
    # chosen on the tuning suite of docs/ablation.md (round 3: plus-kfac-act-whitened)
    "plus": OSRConfig(preset="plus", method="fusion", threshold_rule="tpr",
                      fusion=FusionConfig(signals=("activation", "gradient", "features", "max_logit"),
                                          gradient_rep="kfac", gradient_metric="mahalanobis", combine="fisher")),
}
#: the preset of ``gradosr fit``/``evaluate``/``benchmark`` and of the demo
DEFAULT_PRESET = "plus"

#: the sections of OSRConfig (nested option names ``<section>__<field>``)
SECTIONS = {"representation": RepresentationConfig, "detector": DetectorConfig, "fusion": FusionConfig,
            "extraction": ExtractionConfig}


def option_fields() -> list[tuple[str, object]]:
    """(nested name, dataclass field) of every option: OSRConfig's own fields by their
    name, every section's as ``<section>__<field>``."""
    out = []
    for f in fields(OSRConfig):
        if f.name in SECTIONS:
            out += [(f"{f.name}__{g.name}", g) for g in fields(SECTIONS[f.name])]
        else:
            out.append((f.name, f))
    return out


def _route(name: str) -> tuple[str | None, str]:
    """(section or None for OSRConfig itself, field) of an option name: a nested name,
    or a flat one that exactly one section (or OSRConfig) has."""
    if "__" in name:
        section, key = name.split("__", 1)
        if section not in SECTIONS or key not in SECTIONS[section].__dataclass_fields__:
            raise ConfigError(f"unknown option {name!r}")
        return section, key
    hits = [(s, name) for s, cls in SECTIONS.items() if name in cls.__dataclass_fields__]
    if name in OSRConfig.__dataclass_fields__ and name not in SECTIONS and name != "preset":
        hits.append((None, name))
    if len(hits) > 1:
        names = [k if s is None else f"{s}__{k}" for s, k in hits]
        raise ConfigError(f"option {name!r} is ambiguous: use one of {', '.join(names)}")
    if not hits:
        raise ConfigError(f"unknown options [{name!r}]")
    return hits[0]


def make_config(preset: str = DEFAULT_PRESET, seed: int | None = None, **options) -> OSRConfig:
    """The preset's config with ``options`` (None = keep) applied; names as in the
    module docstring. ``seed`` (the method's seed) sets the detector seed unless
    ``detector__seed`` is given."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    changes: dict[str | None, dict] = {None: {}, **{s: {} for s in SECTIONS}}
    if seed is not None:
        changes["detector"]["seed"] = seed
    for name, value in options.items():
        if value is not None:
            section, key = _route(name)
            changes[section][key] = value
    sections = {s: replace(getattr(cfg, s), **changes[s]) for s in SECTIONS}
    return replace(cfg, **sections, **changes[None])


def config_options(config: OSRConfig) -> dict:
    """The options (nested names) that :func:`make_config` turns ``config.preset`` into
    ``config`` with."""
    base = PRESETS.get(config.preset)
    if base is None:
        raise CheckpointError(f"unknown preset {config.preset!r}; available: {', '.join(PRESETS)}")
    options = {}
    for f in fields(OSRConfig):
        if f.name == "preset":
            continue
        value, default = getattr(config, f.name), getattr(base, f.name)
        if f.name in SECTIONS:
            options.update({f"{f.name}__{g.name}": getattr(value, g.name) for g in fields(value)
                            if getattr(value, g.name) != getattr(default, g.name)})
        elif value != default:
            options[f.name] = value
    return options


def nested_params(config: OSRConfig) -> dict:
    """Every field of ``config`` under its nested option name (``get_params(deep=True)``)."""
    out = {}
    for f in fields(OSRConfig):
        value = getattr(config, f.name)
        if f.name in SECTIONS:
            out.update({f"{f.name}__{g.name}": getattr(value, g.name) for g in fields(value)})
        elif f.name != "preset":
            out[f.name] = value
    return out


register_preset("paper", "gradient", "Lee & AlRegib, ICIP 2021")
register_preset("plus", "gradient", "gradosr: Mahalanobis of per-layer activation and Fisher-whitened gradient norms "
                "+ feature kNN + max logit (docs/ablation.md, round 3)")
