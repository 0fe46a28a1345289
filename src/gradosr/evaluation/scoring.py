"""Score every method of one protocol split on the same classifier, and evaluate it.

Shared by ``gradosr evaluate`` (one run folder), ``gradosr benchmark`` (many splits,
with a score cache) and ``gradosr ablate`` (variants of the presets). The test set is [known_test; unknown_test] with labels 0..K-1 and
-1; the held-out knowns (validation split) set the 95%-acceptance thresholds.

In a distributed run (torchrun) the logits and features, every GradientOSR preset's and
every baseline's scores are computed on contiguous shards of the rows, one per process,
and all-gathered (:func:`gradosr.distributed.map_rows`); scorers are fitted on the full
training outputs, identically on every process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData, ProtocolSpec
from gradosr.detectors import ScorerInputs
from gradosr.detectors.registry import describe, make_scorer, method_ids
from gradosr.distributed import map_rows
from gradosr.errors import ConfigError, DataError
from gradosr.evaluation.records import results_record


def test_labels(data: OSRData) -> np.ndarray:
    """Labels of the concatenated test set [known_test; unknown_test]: 0..K-1, then -1."""
    return np.concatenate([data.known_test.labels, np.full(len(data.unknown_test), -1, dtype=np.int64)])


def test_images(data: OSRData) -> np.ndarray:
    """Images of [known_test; unknown_test], N×H×W×C uint8."""
    k, u = data.known_test.images, data.unknown_test.images
    if k.shape[1:] != u.shape[1:]:
        raise ConfigError(f"known test images are {k.shape[1:]} but unknown ones {u.shape[1:]}; "
                          "cross-dataset protocols need images of one size")
    return np.concatenate([k, u])


def classifier_outputs(clf: Classifier, x: torch.Tensor) -> ScorerInputs:
    """Logits, head-input features, the inputs, the model and its head's weight and bias,
    for model inputs ``x``."""
    from gradosr.models import find_head

    logits, feats = clf.logits_and_features(x)
    head = find_head(clf.model)
    return ScorerInputs(logits, feats, x, clf.model, head.weight.detach().cpu(),
                        head.bias.detach().cpu() if head.bias is not None else None)


def sharded_scores(scorer, out: ScorerInputs) -> np.ndarray:
    """``scorer.score_samples(out)``, sharded over the rows in a distributed run (each
    sample's score depends on that sample alone). Shards are cut at multiples of the
    scorer's batch size, when it has one, so batches hold the rows of a single-process run."""
    align = getattr(scorer, "batch_size", 1)
    align = align if isinstance(align, int) and align > 0 else 1
    return map_rows(lambda rows: np.asarray(scorer.score_samples(out.rows(rows)), dtype=np.float64),
                    len(out), align=align)


def sharded_osr_scores(osr, x: torch.Tensor) -> np.ndarray:
    """``osr.score_samples(x)`` (a fitted GradientOSR, model inputs ``x``), sharded over
    the rows in a distributed run: the whole scoring (forward passes, gradient features,
    detector) runs on each process's shard, cut at multiples of the extraction batch size;
    the map_rows inside it run locally."""
    return map_rows(lambda rows: np.asarray(osr.score_samples(rows), dtype=np.float64), x,
                    align=osr.config_.extraction.batch_size)


@dataclass
class SplitScores:
    """Scores of one method on one split: test N, validation knowns M, and how the
    method's own threshold was set."""

    test: np.ndarray
    val: np.ndarray
    threshold: float | None = None
    threshold_rule: str = "tpr95-val"
    params: dict | None = None
    seconds: float = 0.0
    #: fitting the method (None: not measured, e.g. a preset fitted elsewhere)
    fit_s: float | None = None
    #: scoring the test and validation rows (for a preset: its own forward and gradient passes)
    score_s: float | None = None
    #: rows scored (test + validation)
    n_scored: int = 0
    #: the forward passes of the classifier over the same rows, which the baselines share
    forward_s: float | None = None
    #: taken from the score cache or a reused fitted run (the times are those of the run that computed it)
    cached: bool = False

    @property
    def score_ms_per_1k(self) -> float | None:
        """Scoring milliseconds per 1,000 rows."""
        return None if self.score_s is None or not self.n_scored else 1e6 * self.score_s / self.n_scored


def available_methods(presets: str | list[str] | None = None) -> list[str]:
    """Method ids: the GradientOSR presets first (``None``: every registered preset),
    then the registered baselines (:mod:`gradosr.detectors.registry`)."""
    if presets is None:
        presets = method_ids("preset")
    elif isinstance(presets, str):
        presets = [presets]
    return list(presets) + method_ids("baseline")


def score_split(clf: Classifier, data: OSRData, methods: list[str], osr=None, progress: bool = False,
                cache: Callable[[str, Callable[[], SplitScores]], SplitScores] | None = None,
                skipped: dict[str, str] | None = None, scorers: dict | None = None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, SplitScores]]:
    """Scores of ``methods`` on the split's test and validation images.

    ``osr``: a fitted GradientOSR, or a dict {preset: GradientOSR} (all on ``clf``).
    ``cache(method, compute)``: returns stored scores or calls ``compute()`` (benchmark).
    ``skipped``: when given, a baseline that cannot be fitted on this classifier (a
    DataError from its fit, e.g. OpenMax without 2 correctly classified training samples
    of a class) is left out, its reason stored there and printed on stderr, instead of
    ending the whole run.
    ``scorers``: a dict kept by the caller across calls on the same classifier and known
    training data (a cross protocol's unknown sets): every baseline is fitted once, kept
    there as (scorer, fit seconds), and reused; its records keep the fit time.
    Returns (y_true N, closed_pred N, {method: SplitScores}).
    """
    fitted = osr if isinstance(osr, dict) else ({osr.config_.preset: osr} if osr is not None else {})
    bad = [m for m in methods if m not in method_ids("baseline") and m not in fitted]
    if bad:
        raise ConfigError(f"unknown or unavailable methods {bad}; available: "
                          f"{', '.join(available_methods(list(fitted)))}")
    x_test, x_val = clf.inputs(test_images(data)), clf.inputs(data.val.images)
    t0 = time.perf_counter()
    test_out, val_out = classifier_outputs(clf, x_test), classifier_outputs(clf, x_val)
    forward_s, n_scored = time.perf_counter() - t0, len(x_test) + len(x_val)
    train_out: list[ScorerInputs] = []

    def compute(method: str) -> SplitScores:
        t0 = time.time()
        if method in fitted:
            osr = fitted[method]
            osr.progress = progress
            rule = (f"fixed-{osr.threshold_:g}" if osr.config_.threshold_rule == "fixed"
                    else f"tpr{osr.config_.target_tpr:g}-val")
            t1 = time.perf_counter()
            test, val = sharded_osr_scores(osr, x_test), sharded_osr_scores(osr, x_val)
            return SplitScores(test, val, osr.threshold_, rule, osr.config_.to_dict(), time.time() - t0,
                               fit_s=getattr(osr, "fit_seconds_", None), score_s=time.perf_counter() - t1,
                               n_scored=n_scored, forward_s=forward_s, cached=bool(getattr(osr, "reused_", False)))
        if scorers is not None and method in scorers:
            scorer, fit_s = scorers[method]
        else:
            scorer = make_scorer(method)
            fit_s = 0.0
            if scorer.needs_fit:
                if not train_out:
                    train_out.append(classifier_outputs(clf, clf.inputs(data.known_train.images)))
                t1 = time.perf_counter()
                scorer.fit(train_out[0], data.known_train.labels)
                fit_s = time.perf_counter() - t1
            if scorers is not None:
                scorers[method] = (scorer, fit_s)
        t1 = time.perf_counter()
        test, val = sharded_scores(scorer, test_out), sharded_scores(scorer, val_out)
        return SplitScores(test, val, params=dict(scorer.params), seconds=time.time() - t0, fit_s=fit_s,
                           score_s=time.perf_counter() - t1, n_scored=n_scored, forward_s=forward_s)

    scores = {}
    for m in methods:
        try:
            scores[m] = cache(m, lambda m=m: compute(m)) if cache else compute(m)
        except DataError as exc:
            if skipped is None or m in fitted:
                raise
            skipped[m] = str(exc)
            print(f"gradosr: {m} left out on {data.spec.label}: {exc}", file=sys.stderr)
    return test_labels(data), test_out.logits.argmax(1).numpy(), scores


def split_records(spec: ProtocolSpec, y_true: np.ndarray, closed_pred: np.ndarray,
                  scores: dict[str, SplitScores]) -> list[dict]:
    """One results record (docs/design.md, "Results schema") per method."""
    split = spec.split if spec.split is not None else spec.seed
    records = []
    for method, s in scores.items():
        rec = results_record(method, split, y_true, closed_pred, s.test, s.val, spec.num_known,
                             s.threshold, s.threshold_rule)
        rec["family"], rec["own"] = describe(method)
        rec["seconds"] = round(float(s.seconds), 3)
        rec.update(cost_keys(s))
        records.append(rec)
    return records


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def cost_keys(s: SplitScores) -> dict:
    """The cost keys of a results record (docs/design.md, "Results schema")."""
    forward = None if s.forward_s is None or not s.n_scored else 1e6 * s.forward_s / s.n_scored
    return {"fit_s": _rounded(s.fit_s, 6), "score_s": _rounded(s.score_s, 6),
            "score_ms_per_1k": _rounded(s.score_ms_per_1k, 6), "forward_ms_per_1k": _rounded(forward, 6),
            "cached": bool(s.cached)}
