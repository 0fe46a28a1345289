"""Score every method of one protocol split on the same classifier, and evaluate it.

Shared by ``gradosr evaluate`` (one run folder), ``gradosr benchmark`` (many splits,
with a score cache) and ``gradosr ablate`` (variants of the presets). The test set is [known_test; unknown_test] with labels 0..K-1 and
-1; the held-out knowns (validation split) set the 95%-acceptance thresholds.

Streamed (docs/design.md, "Streaming"): images are read chunk by chunk from the split's
image sources (:mod:`gradosr.streams`); no stage holds every image or every row's
classifier outputs, only the scores (N floats) and what a method keeps by definition.

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
from gradosr.data import imageset
from gradosr.data.imageset import ImageSource, concat_sources
from gradosr.distributed import map_rows
from gradosr.errors import ConfigError, DataError
from gradosr.evaluation.records import results_record
from gradosr.streams import ModelInputs, SourceInputs, chunk_rows, zip_labels


def test_labels(data: OSRData) -> np.ndarray:
    """Labels of the concatenated test set [known_test; unknown_test]: 0..K-1, then -1."""
    return np.concatenate([data.known_test.labels, np.full(len(data.unknown_test), -1, dtype=np.int64)])


def test_source(data: OSRData) -> ImageSource:
    """The image source of [known_test; unknown_test] (its labels are those of the parts)."""
    k, u = data.known_test, data.unknown_test
    if k.shape != u.shape:
        raise ConfigError(f"known test images are {k.shape} but unknown ones {u.shape}; "
                          "cross-dataset protocols need images of one size")
    return concat_sources([k, u])


def test_images(data: OSRData) -> np.ndarray:
    """Images of [known_test; unknown_test], N×H×W×C uint8 (read into memory)."""
    return test_source(data).materialise().images


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


def _rows(inputs: ModelInputs, rows: slice) -> ModelInputs:
    return inputs if rows.start == 0 and rows.stop == len(inputs) else inputs.subset(np.arange(rows.start, rows.stop))


def sharded_osr_scores(osr, inputs: ModelInputs) -> np.ndarray:
    """``osr.score_samples(inputs)`` (a fitted GradientOSR; model inputs streamed chunk by
    chunk), sharded over the rows in a distributed run: the whole scoring (forward passes,
    gradient features, detector) runs on each process's shard, cut at multiples of the
    chunk length; the map_rows inside it run locally."""
    align = chunk_rows(osr.config_.extraction.batch_size)
    return map_rows(lambda rows: np.asarray(osr.score_samples(_rows(inputs, rows)), dtype=np.float64),
                    len(inputs), align=align)


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


class _Miss(Exception):
    """Raised by the compute function given to the cache to learn whether it holds a method."""


def _raise_miss() -> SplitScores:
    raise _Miss


class _Baselines:
    """The baselines of one split, fitted in one streamed pass over the known training
    images and scored in one streamed pass over the test and validation images: every
    chunk's classifier outputs are computed once and read by every scorer (memory:
    one chunk's outputs, the scores, and what each scorer keeps by definition)."""

    def __init__(self, clf: Classifier, methods: list[str], reuse: dict | None = None):
        self.clf = clf
        self.reuse = reuse if reuse is not None else {}  # method -> (fitted scorer, fit seconds)
        self.scorers = {m: self.reuse[m][0] if m in self.reuse else make_scorer(m) for m in methods}
        self.fit_s = {m: self.reuse[m][1] if m in self.reuse else 0.0 for m in methods}
        self.score_s = {m: 0.0 for m in methods}
        self.errors: dict[str, str] = {}
        self.forward_s = 0.0

    def live(self) -> list[str]:
        return [m for m in self.scorers if m not in self.errors]

    def _run(self, m: str, times: dict, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        except DataError as exc:
            self.errors[m] = str(exc)
            return None
        finally:
            times[m] += time.perf_counter() - t0

    def fit(self, train: ModelInputs, labels: np.ndarray) -> None:
        fitting = [m for m in self.live() if self.scorers[m].needs_fit and m not in self.reuse]
        if fitting:
            for x, y in zip_labels(train, labels):
                out = classifier_outputs(self.clf, x)
                for m in fitting:
                    if m not in self.errors:
                        self._run(m, self.fit_s, lambda m=m: self.scorers[m].partial_fit(out, y))
            for m in fitting:
                if m not in self.errors:
                    self._run(m, self.fit_s, self.scorers[m].check_fitted)
        for m in self.live():
            self.reuse.setdefault(m, (self.scorers[m], self.fit_s[m]))

    def score(self, inputs: ModelInputs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(closed-set predictions N, {method: scores N}) of ``inputs``, sharded over the
        rows in a distributed run (each sample's score depends on that sample alone)."""
        names = self.live()

        def local(rows: slice):
            preds, cols = [], {m: [] for m in names}
            for x in _rows(inputs, rows).chunks():
                t0 = time.perf_counter()
                out = classifier_outputs(self.clf, x)
                self.forward_s += time.perf_counter() - t0
                preds.append(out.logits.argmax(1).to(torch.float64).numpy())
                for m in names:
                    s = None if m in self.errors else self._run(m, self.score_s,
                                                                lambda m=m: self.scorers[m].score_samples(out))
                    cols[m].append(np.full(len(x), np.nan) if s is None else np.asarray(s, dtype=np.float64))
            cat = [np.concatenate(c) if c else np.zeros(0) for c in [preds] + [cols[m] for m in names]]
            return tuple(cat)

        parts = map_rows(local, len(inputs), align=imageset.CHUNK_ROWS)
        return parts[0].astype(np.int64), dict(zip(names, parts[1:]))

    def split_scores(self, m: str, test: np.ndarray, val: np.ndarray, n_scored: int) -> SplitScores:
        sc = self.scorers[m]
        return SplitScores(test, val, params=dict(sc.params), seconds=self.fit_s[m] + self.score_s[m],
                           fit_s=self.fit_s[m], score_s=self.score_s[m], n_scored=n_scored,
                           forward_s=self.forward_s)


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

    Streamed (docs/design.md, "Streaming"): the images are read chunk by chunk from the
    split's image sources; the baselines not in the cache share one pass over the known
    training images (their fits) and one over the test and validation images (their
    scores, and the closed-set predictions); a preset scores chunk by chunk.
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
    test_in, val_in = SourceInputs(test_source(data), clf.inputs), SourceInputs(data.val, clf.inputs)
    n_scored = len(test_in) + len(val_in)
    scores: dict[str, SplitScores] = {}
    pending = []
    for m in methods:
        if m in fitted:
            continue
        try:
            scores[m] = cache(m, _raise_miss) if cache else _raise_miss()
        except _Miss:
            pending.append(m)
    base = _Baselines(clf, pending, scorers)
    base.fit(SourceInputs(data.known_train, clf.inputs), data.known_train.labels)
    closed_pred, test_scores = base.score(test_in)
    val_scores = base.score(val_in)[1] if pending else {}
    for m in pending:
        if m in base.errors:
            if skipped is None:
                raise DataError(base.errors[m])
            skipped[m] = base.errors[m]
            print(f"gradosr: {m} left out on {data.spec.label}: {base.errors[m]}", file=sys.stderr)
            continue
        result = base.split_scores(m, test_scores[m], val_scores[m], n_scored)
        scores[m] = cache(m, lambda result=result: result) if cache else result

    def compute(method: str) -> SplitScores:
        t0 = time.time()
        osr = fitted[method]
        osr.progress = progress
        rule = (f"fixed-{osr.threshold_:g}" if osr.config_.threshold_rule == "fixed"
                else f"tpr{osr.config_.target_tpr:g}-val")
        t1 = time.perf_counter()
        test, val = sharded_osr_scores(osr, test_in), sharded_osr_scores(osr, val_in)
        return SplitScores(test, val, osr.threshold_, rule, osr.config_.to_dict(), time.time() - t0,
                           fit_s=getattr(osr, "fit_seconds_", None), score_s=time.perf_counter() - t1,
                           n_scored=n_scored, forward_s=base.forward_s, cached=bool(getattr(osr, "reused_", False)))

    for m in methods:
        if m in fitted:
            scores[m] = cache(m, lambda m=m: compute(m)) if cache else compute(m)
    return test_labels(data), closed_pred, {m: scores[m] for m in methods if m in scores}


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
