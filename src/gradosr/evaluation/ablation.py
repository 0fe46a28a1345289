"""``gradosr ablate``: vary one choice at a time from the ``paper`` and ``plus`` presets.

An ablation is a benchmark whose methods are variants: every variant is a
:class:`gradosr.osr.GradientOSR` preset plus options, fitted on the same closed-set
classifier of each split (the split loop of :mod:`gradosr.evaluation.driver`; proxy
classifiers are trained once per split and proxy-unknown set, in one
:class:`gradosr.methods.ProxyStore` shared between variants), and scored like ``gradosr
benchmark`` (:func:`gradosr.evaluation.scoring.score_split`; docs/design.md metrics). Tuning discipline (docs/ablation.md): choices are
made on the mnist-sample splits only, never on unknown test classes of the protocols the
results are reported on.

Layout of ``--out``: ``runs/split<S>/classifier`` (trained or reused),
``runs/split<S>/proxy-<labels>`` (proxy classifiers, reused), ``results.json`` (schema 1,
``method`` = variant name, rewritten after every variant; an interrupted ablation
resumes from it) and ``results.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from gradosr.checkpoint import atomic_write_json, atomic_write_text
from gradosr.errors import ConfigError
from gradosr.evaluation.driver import ExperimentSettings, split_runs
from gradosr.evaluation.tables import mean_std, render


@dataclass(frozen=True)
class Variant:
    """One configuration: ``preset`` plus ``options`` (make_config keywords)."""

    name: str
    preset: str
    options: dict
    change: str
    cite: str = ""
    #: the row ΔAUROC is measured against ("" = the preset's own row)
    base: str = ""


def _params_last(k: int) -> Callable:
    """Parameter selection: the parameters of the last ``k`` modules that own parameters."""
    def select(model):
        owners = [name for name, m in model.named_modules() if list(m.parameters(recurse=False))]
        keep = set(owners[-k:])
        return tuple(n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in keep)
    return select


#: the plus preset as shipped in rounds 1-2 (docs/ablation.md); the plus-family rows of rounds 1-3 are changes of it
PLUS_R1 = {"signals": ("gradient", "features", "max_logit"), "gradient_rep": "head", "gradient_metric": "knn"}

#: variants, by family; the first of each family is its base (ΔAUROC against ``base`` where it is set)
VARIANTS: list[Variant] = [
    Variant("paper", "paper", {}, "the paper as stated (docs/design.md)", "Lee & AlRegib, ICIP 2021"),
    Variant("paper-sigmoid", "paper", {"output": "sigmoid"}, "sigmoid instead of softmax outputs in the confounding loss"),
    Variant("paper-n2", "paper", {"n_ones": 2}, "confounding label with n = 2 ones (at the 2 largest logits)"),
    Variant("paper-n0", "paper", {"n_ones": 0}, "confounding label with n = 0 ones"),
    Variant("paper-predicted", "paper", {"target": "predicted"}, "target: the predicted label"),
    Variant("paper-uniform", "paper", {"target": "uniform"},
            "target: uniform (GradNorm's; with softmax and n = N the same gradients up to a factor N)",
            "Huang et al., NeurIPS 2021"),
    Variant("paper-head", "paper", {"params": "last1"}, "parameters: the head only"),
    Variant("paper-last2", "paper", {"params": "last2"}, "parameters: the last 2 layers"),
    Variant("paper-nolog", "paper", {"log": False}, "reduction: squared norms without the log"),
    Variant("paper-own", "paper", {"standardize": "own"},
            "standardise each classifier's features with its own held-out known statistics"),
    Variant("paper-heldout", "paper", {"detector_data": "heldout"},
            "held-out (not training) proxy-known images for the detector"),
    Variant("paper-pu1", "paper", {"proxy_unknown": 1}, "1 proxy-unknown class (default round(K/3))"),
    Variant("paper-pu3", "paper", {"proxy_unknown": 3}, "3 proxy-unknown classes"),
    Variant("paper-ensemble3", "paper", {"proxy_ensemble": 3},
            "ensemble: mean P(known) of detectors on 3 distinct proxy splits (3 proxy classifiers)"),
    Variant("paper-h32", "paper", {"hidden": 32}, "detector width 32 (default 128)"),
    Variant("paper-h512", "paper", {"hidden": 512}, "detector width 512"),
    Variant("paper-wd1e-2", "paper", {"weight_decay": 1e-2}, "detector weight decay 1e-2 (default 1e-4)"),
    Variant("paper-projection", "paper", {"projection_inputs": 16},
            "detector inputs: a 16×16-per-layer random projection of the full gradient of every Linear/Conv weight "
            "below the head appended to the norms", "Choe et al., 2024 (LoGra)"),
    Variant("paper-maxlogit", "paper", {"logit_inputs": ("max_logit",)},
            "detector inputs: the max logit appended to the gradient features", "Vaze et al., ICLR 2022"),
    Variant("paper-logits", "paper", {"logit_inputs": ("max_logit", "logsumexp", "max_softmax")},
            "detector inputs: max logit, logsumexp and max softmax appended to the gradient features",
            "Vaze et al., ICLR 2022; Liu et al., NeurIPS 2020; Hendrycks & Gimpel, ICLR 2017"),
    Variant("paper-tpr", "paper", {"threshold_rule": "tpr"},
            "threshold accepting 95% of held-out knowns instead of P(known) >= 0.95 (macro-F1 only)"),
    Variant("plus", "plus", {}, "the preset as shipped (round 3's plus-kfac-act-whitened): Mahalanobis of the "
            "per-layer log activation norms and of the per-layer log Fisher-whitened gradient norms below the head "
            "+ kNN on features + max logit, Fisher's combination", "docs/ablation.md, round 3", base="plus-r1"),
    # round 4 (docs/ablation.md): the same signals, their combination weighted per classifier against outliers
    # the fit generates from held-out knowns (issue 21, item 6), each with its non-gradient control
    *[Variant(name, "plus", {"combine": "learned", "calibration_outliers": gens, **extra}, change, cite, base="plus")
      for name, gens, extra, change, cite in [
          ("plus-calibrated", ("mixup",), {},
           "plus with Fisher's combination weighted by a non-negative logistic regression of held-out knowns "
           "against mixup outliers made from them", "Zhang et al., ICLR 2018; Zhou et al., CVPR 2021 (PROSER)"),
          ("plus-calibrated-no-gradient", ("mixup",), {"signals": ("activation", "features", "max_logit")},
           "control of plus-calibrated: without the whitened-gradient signal", ""),
          ("plus-calibrated-jigsaw", ("mixup", "jigsaw"), {},
           "plus-calibrated with mixup and jigsaw outliers", "Noroozi & Favaro, ECCV 2016; Li et al., CVPR 2021"),
          ("plus-calibrated-jigsaw-no-gradient", ("mixup", "jigsaw"),
           {"signals": ("activation", "features", "max_logit")},
           "control of plus-calibrated-jigsaw: without the whitened-gradient signal", "")]],
    # rounds 1-3 vary the preset as shipped in rounds 1-2 (plus-r1): its options are pinned
    *[replace(v, options={**PLUS_R1, **v.options}, base="plus-r1") for v in [
    Variant("plus-r1", "plus", {}, "the preset of rounds 1-2: kNN on the head's confounding gradient + kNN on "
            "features + max logit, Fisher's combination of their p-values on held-out knowns",
            "Sun et al., ICML 2022; Vaze et al., ICLR 2022; Fisher 1925"),
    Variant("plus-no-gradient", "plus", {"signals": ("features", "max_logit")}, "without the gradient signal"),
    Variant("plus-no-features", "plus", {"signals": ("gradient", "max_logit")}, "without the feature kNN"),
    Variant("plus-no-logit", "plus", {"signals": ("gradient", "features")}, "without the max logit"),
    Variant("plus-gradient-only", "plus", {"signals": ("gradient",)}, "the gradient signal alone"),
    Variant("plus-norms", "plus", {"gradient_rep": "norms"},
            "gradient signal: kNN on standardised log per-parameter squared norms (Eq. 1) of the final classifier"),
    Variant("plus-projection", "plus", {"gradient_rep": "projection"},
            "gradient signal: cosine kNN on a 16×16-per-layer random projection of the full gradient of every "
            "Linear/Conv weight", "Choe et al., 2024 (LoGra); Park et al., ICML 2023 (TRAK)"),
    Variant("plus-projection-only", "plus", {"gradient_rep": "projection", "signals": ("gradient",)},
            "the projected full-gradient kNN alone", "Choe et al., 2024 (LoGra)"),
    Variant("plus-projection-mahalanobis", "plus", {"gradient_rep": "projection", "gradient_metric": "mahalanobis"},
            "gradient signal: Mahalanobis distance (tied covariance, nearest class mean) of the projected full "
            "gradient", "Lee et al., NeurIPS 2018, in gradient space"),
    Variant("plus-norms-mahalanobis", "plus", {"gradient_rep": "norms", "gradient_metric": "mahalanobis"},
            "gradient signal: Mahalanobis distance of the standardised log per-parameter squared norms",
            "Lee et al., NeurIPS 2018, in gradient space"),
    *[Variant(name, "plus", {"gradient_rep": "kfac", "gradient_metric": "mahalanobis", "kfac_features": feats},
              change, cite) for name, feats, change, cite in [
        ("plus-kfac", "whitened", "gradient signal: Mahalanobis of the per-layer log Fisher-whitened (K-FAC) "
         "gradient norms of the layers below the head", "Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016"),
        ("plus-kfac-act", "activation", "control of plus-kfac: Mahalanobis of the per-layer log activation factors "
         "only (no gradient)", ""),
        ("plus-kfac-both", "both", "gradient signal: Mahalanobis of both K-FAC factors per layer (activation and "
         "output gradient)", ""),
        ("plus-kfac-sum", "whitened-sum", "gradient signal: 1-D Mahalanobis of the log sum over layers of the "
         "whitened gradient norms", ""),
        ("plus-kfac-act-sum", "activation-sum", "control of plus-kfac-sum: the log sum over layers of the "
         "activation factors", "")]],
    Variant("plus-kfac-knn", "plus", {"gradient_rep": "kfac"},
            "gradient signal: Euclidean kNN on the standardised per-layer log whitened gradient norms"),
    # round 3 (docs/ablation.md): a gradient signal beside the activation signal, and the leverage
    Variant("plus-leverage", "plus", {"gradient_rep": "projection", "gradient_metric": "leverage"},
            "gradient signal: self-influence (leverage) of the projected full gradient against the known training "
            "gradients", "Park et al., ICML 2023 (TRAK); Choe et al., 2024 (LoGra)"),
    *[Variant(name, "plus", {"signals": ("activation", "gradient", "features", "max_logit"), **opts}, change, cite)
      for name, opts, change, cite in [
          ("plus-kfac-act-leverage", {"gradient_rep": "projection", "gradient_metric": "leverage"},
           "plus-kfac-act with a fourth signal: the leverage of the projected full gradient",
           "Park et al., ICML 2023 (TRAK)"),
          ("plus-kfac-act-projection", {"gradient_rep": "projection", "gradient_metric": "mahalanobis"},
           "plus-kfac-act with a fourth signal: the Mahalanobis distance of the projected full gradient", ""),
          ("plus-kfac-act-whitened", {"gradient_rep": "kfac", "gradient_metric": "mahalanobis"},
           "plus-kfac-act with a fourth signal: the Mahalanobis distance of the per-layer log whitened gradient "
           "norms", "Martens & Grosse, ICML 2015")]],
    # round 5 (docs/ablation.md): the class-conditional gradient (issue 21, items 2 and 5) and the
    # activation-gradient statistics of the blocks (item 3), each beside the activation signal
    *[Variant(name, "plus", {"signals": ("activation", "gradient", "features", "max_logit"),
                             "gradient_rep": "projection", "gradient_metric": metric}, change, cite)
      for name, metric, change, cite in [
          ("plus-kfac-act-gradpca", "gradpca",
           "plus-kfac-act with a fourth signal: minus the share of the projected full gradient off the span of "
           "the known training gradients' class means", "Seleznova et al., ICLR 2026 (GradPCA)"),
          ("plus-kfac-act-predicted", "mahalanobis_predicted",
           "plus-kfac-act with a fourth signal: the Mahalanobis distance of the projected full gradient to the "
           "predicted class's mean", "Lee et al., NeurIPS 2018, in gradient space"),
          ("plus-kfac-act-relative", "relative_mahalanobis",
           "plus-kfac-act with a fourth signal: the relative Mahalanobis distance (class-conditional minus "
           "background) of the projected full gradient", "Ren et al., 2021 (RMDS), in gradient space")]],
    *[Variant(name, "plus", {"signals": ("activation", signal, "features", "max_logit")}, change, cite)
      for name, signal, change, cite in [
          ("plus-kfac-act-nac", "nac", "plus-kfac-act with a fourth signal: NAC-UE's coverage of the blocks' "
           "activation-gradient states", "Liu et al., ICLR 2024 (NAC)"),
          ("plus-kfac-act-coverage", "coverage", "control of plus-kfac-act-nac: the coverage of the activation "
           "states alone (no gradient)", ""),
          ("plus-kfac-act-gaia", "gaia", "plus-kfac-act with a fourth signal: GAIA-A's channel-wise average "
           "attribution abnormality", "Chen et al., NeurIPS 2023 (GAIA)")]],
    Variant("plus-gradorth", "plus", {"signals": ("gradorth", "features", "max_logit")},
            "GradOrth's projected head-gradient norm in place of the gradient kNN", "Behpour et al., NeurIPS 2023"),
    Variant("plus-gradnorm", "plus", {"signals": ("gradnorm", "features", "max_logit")},
            "GradNorm's head-gradient L1 norm in place of the gradient kNN", "Huang et al., NeurIPS 2021"),
    Variant("plus-predicted", "plus", {"target": "predicted"}, "head gradient of the predicted-label loss"),
    Variant("plus-n2", "plus", {"n_ones": 2}, "head gradient of a confounding label with n = 2"),
    Variant("plus-sigmoid", "plus", {"output": "sigmoid"}, "head gradient of the sigmoid confounding loss"),
    Variant("plus-sum", "plus", {"combine": "sum"},
            "the sum of the signals' z-scores on held-out knowns instead of Fisher's combination of their "
            "p-values (the plus preset as first shipped)"),
    Variant("plus-k10", "plus", {"k": 10}, "k = 10 instead of 50"),
    ]],
]
VARIANT_NAMES = [v.name for v in VARIANTS]


@dataclass
class AblationSettings(ExperimentSettings):
    """An ablation: the splits (:class:`ExperimentSettings`) and the variant names
    (``all``, names, or family patterns such as ``plus*``). ``rerun``: recompute the
    named variants even where ``out`` holds their records with the same config (after a
    code change; the classifiers in ``out/runs`` are reused all the same)."""

    variants: list[str] = field(default_factory=lambda: ["all"])
    rerun: bool = False


def select_variants(names: list[str]) -> list[Variant]:
    """The variants named (``all``: every one; a family name such as ``plus*``)."""
    if not names or "all" in names:
        return list(VARIANTS)
    chosen = []
    for name in names:
        if name.endswith("*"):
            hits = [v for v in VARIANTS if v.name.startswith(name[:-1])]
        else:
            hits = [v for v in VARIANTS if v.name == name]
        if not hits:
            raise ConfigError(f"unknown variant {name!r}; available: all, {', '.join(VARIANT_NAMES)}")
        chosen += [v for v in hits if v not in chosen]
    return chosen


def _options(variant: Variant, model) -> dict:
    opts = dict(variant.options)
    if isinstance(opts.get("params"), str):  # "last<k>": resolved on the classifier
        opts["params"] = _params_last(int(opts["params"][4:]))(model)
    return opts


def run_ablation(settings: AblationSettings, log: Callable[[str], None] = print) -> dict:
    """Fit and evaluate every variant on every split; returns the results document."""
    from gradosr.evaluation.scoring import score_split, split_records
    from gradosr.methods import ProxyStore
    from gradosr.osr import GradientOSR
    from gradosr.progress import progress_bar

    if len(settings.unknown_sets()) > 1:
        raise ConfigError("gradosr ablate takes one unknown dataset; run one ablation per unknown set")
    variants = select_variants(settings.variants)
    out = Path(settings.out)
    records: list[dict] = []
    t_start = time.time()
    previous = _previous_document(out / "results.json", settings)  # read once
    done = _finished(previous, settings)
    names = {v.name for v in variants}
    # an ablation run on some variants keeps the other variants' records of the same protocol
    # (those whose variant has changed since are dropped)
    params_variants = {v.name for v in VARIANTS if "params" in v.options}
    kept = [r for r in _records(previous) if r.get("method") not in names
            and (r.get("method") in params_variants or (r.get("method"), r.get("split")) in done)]
    shown = [v for v in VARIANTS if v in variants or any(r.get("method") == v.name for r in kept)]
    commands = _commands(previous, settings)

    def document() -> dict:
        doc = _document(settings, _merged(records, kept), shown, time.time() - t_start)
        doc["commands"] = commands
        return doc

    for run in split_runs(settings, bar=False):
        spec, data, clf, config = run.specs[0], run.data[0], run.classifier, run.train_config
        proxies = ProxyStore(root=run.run.root)
        for v in progress_bar(variants, desc=f"split {run.split}", disable=not settings.progress, unit="variant"):
            if not settings.rerun and (v.name, run.split) in done:  # an interrupted ablation resumes
                records.append({**done[(v.name, run.split)], "cached": True})
                continue
            t0 = time.time()
            osr = GradientOSR(v.preset, classifier=clf, train_config=config, device=settings.device,
                              seed=config.seed, proxy_store=proxies, **_options(v, clf.model)).fit(data)
            osr.fit_seconds_ = time.time() - t0
            y_true, closed, scores = score_split(clf, data, [v.name], {v.name: osr})
            (rec,) = split_records(spec, y_true, closed, scores)
            rec["seconds"] = round(time.time() - t0, 3)
            rec["config"] = osr.config_.to_dict()
            records.append(rec)
            atomic_write_json(out / "results.json", document())
        atomic_write_json(out / "results.json", document())
        log(f"{spec.label}: {len(variants)} variants ({time.time() - t_start:.0f}s so far)")
    doc = document()
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(doc))
    return doc


def _previous_document(path: Path, settings: AblationSettings) -> dict:
    """The results document of an earlier run of the same ablation in ``path`` (same
    protocol, training options and seed), else an empty dict."""
    from gradosr.checkpoint import read_json
    from gradosr.errors import CheckpointError

    if not path.is_file():
        return {}
    try:
        doc = read_json(path)
    except CheckpointError:
        return {}
    same = (doc.get("protocol") == settings.protocol and doc.get("protocol_args") == settings.protocol_args
            and doc.get("train_overrides", {}) == settings.train_overrides and doc.get("seed", 0) == settings.seed)
    return doc if same else {}


def _records(previous: dict) -> list[dict]:
    """The records of an earlier run's document (:func:`_previous_document`)."""
    return [r for r in previous.get("results", []) if isinstance(r, dict)]


def _commands(previous: dict, settings: AblationSettings) -> list[str]:
    """Every command that wrote records of this ablation, this run's last."""
    earlier = previous.get("commands") or ([previous["command"]] if previous.get("command") else [])
    return [c for c in earlier if c != settings.command] + [settings.command]


def _finished(previous: dict, settings: AblationSettings) -> dict:
    """Records of an earlier run's document (:func:`_previous_document`), by (variant,
    split): reused only when the variant's config is unchanged (with the method seed of
    that split: the split index for ``cross`` and ``custom``, else ``settings.seed``)."""
    from gradosr.errors import CheckpointError
    from gradosr.methods.config import OSRConfig, make_config

    found = {}
    for rec in _records(previous):
        v = next((v for v in VARIANTS if v.name == rec.get("method")), None)
        if v is None or "params" in v.options:
            continue  # parameter selections resolve on the model; recomputed
        try:  # options added since the record was written read as their defaults
            stored = OSRConfig.from_dict(rec.get("config") or {}).to_dict()
        except (CheckpointError, ConfigError):
            continue
        seed = rec["split"] if settings.protocol in ("cross", "custom") else settings.seed
        if stored == make_config(v.preset, seed=seed, **v.options).to_dict():
            found[(v.name, rec["split"])] = rec
    return found


def _merged(records: list[dict], kept: list[dict]) -> list[dict]:
    """This run's records and the earlier run's records of the variants not run now, in
    the order of VARIANTS, then split."""
    order = {name: i for i, name in enumerate(VARIANT_NAMES)}
    return sorted(records + kept, key=lambda r: (order.get(r["method"], len(order)), r["split"]))


def _document(settings: AblationSettings, records: list[dict], variants: list[Variant], seconds: float) -> dict:
    from gradosr.evaluation.records import results_document

    return results_document(settings.command, records, {
        "protocol": settings.protocol, "protocol_args": settings.protocol_args,
        "train_overrides": settings.train_overrides, "seed": settings.seed,
        "splits": sorted({r["split"] for r in records}),
        "variants": [{"name": v.name, "preset": v.preset, "options": {k: (list(x) if isinstance(x, tuple) else x)
                                                                      for k, x in v.options.items()},
                      "change": v.change, "cite": v.cite, "base": v.base or v.preset} for v in variants],
        "seconds": round(seconds, 2),
    })


def markdown(doc: dict) -> str:
    """The ablation table: one row per variant, mean ± std over splits, and the change of
    mean AUROC against the base of its family (``paper``, or ``plus-r1`` for the ``plus`` rows)."""
    summary = doc["summary"]
    info = {v["name"]: v for v in doc.get("variants", [])}
    commands = doc.get("commands") or [doc["command"]]
    lines = [f"# Ablation: {doc.get('protocol')}", "",
             *(["Command: " + f"`{commands[0]}`"] if len(commands) == 1 else
               ["Commands (their records merged; each variant from the last command that ran it):", "",
                *[f"- `{c}`" for c in commands]]), "",
             f"Mean ± std (population) over splits {doc.get('splits')}. ΔAUROC: against the base of the "
             "family (`paper`, or `plus-r1` for the `plus` rows) on the same classifiers. `macro-F1` at the variant's own threshold "
             "rule, `macro-F1@TPR95` at 95% acceptance of held-out knowns.", ""]
    rows = []
    for name, stats in summary.items():
        base = info.get(name, {}).get("base") or info.get(name, {}).get("preset", "paper")
        delta = stats["auroc"]["mean"] - summary[base]["auroc"]["mean"] if base in summary else float("nan")
        change = info.get(name, {}).get("change", "")
        cite = info.get(name, {}).get("cite", "")
        rows.append([name, f"{change}{f' ({cite})' if cite else ''}", mean_std(stats.get("auroc")),
                     "—" if name == base else f"{delta:+.3f}", mean_std(stats.get("macro_f1_tpr95")),
                     mean_std(stats.get("macro_f1")), mean_std(stats.get("fpr95"))])
    header = ["variant", "change", "AUROC", "ΔAUROC", "macro-F1@TPR95", "macro-F1", "FPR@95TPR"]
    return "\n".join(lines) + "\n" + render(header, rows) + "\n"
