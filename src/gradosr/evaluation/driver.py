"""The experiment driver: the per-split loop that ``gradosr benchmark`` and ``gradosr
ablate`` share (an ablation is a benchmark whose methods are variants of the presets).

Per split: the protocol split is resolved (for ``cross`` with several unknown datasets,
one split per unknown set, all on the same known data), the training recipe is the
dataset's default with the overrides and the split's seed (``cross`` and ``custom``:
the split index seeds the training; the standard protocols: ``seed``), the data are
loaded and the closed-set classifier is trained or reused from
``<out>/runs/split<S>/classifier``. One classifier serves every unknown set: what
trains it (:func:`gradosr.runs.training_identity`) does not include the unknowns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from gradosr.classifier import Classifier
from gradosr.errors import ConfigError
from gradosr.data.protocols import OSRData, ProtocolSpec, load_protocol, resolve_protocol
from gradosr.progress import progress_bar
from gradosr.runs import BenchmarkLayout, RunLayout, ensure_classifier
from gradosr.train import TrainConfig, default_train_config


@dataclass
class ExperimentSettings:
    """What defines the splits of an experiment.

    Attributes:
        protocol: protocol name; ``protocol_args`` holds the other resolve_protocol
            arguments (dataset, known, unknown, known_dataset, unknown_dataset; for
            ``cross`` a comma-separated ``unknown_dataset`` lists several unknown sets).
        splits: standard split indices (for ``cross`` and ``custom``: seeds, which
            also seed the training); with ``random_splits`` the seeds of random 6/4
            class splits (``--split-seeds``, ``resolve_protocol(split_seed=…)``).
        train_overrides: training options that differ from the dataset's defaults.
        seed: training seed of the standard protocols.
        strict: refuse unreadable files of a folder dataset (else skipped).
        stream, num_workers: a folder dataset is indexed and streamed (else read into
            memory), decoded by ``num_workers`` processes (:mod:`gradosr.data.indexed`).
        weights: a trained classifier's safetensors file (``--weights``) used instead of
            training; one split only.
    """

    protocol: str
    splits: list[int]
    out: Path
    protocol_args: dict = field(default_factory=dict)
    train_overrides: dict = field(default_factory=dict)
    seed: int = 0
    data_dir: str | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    command: str = ""
    random_splits: bool = False
    strict: bool = False
    stream: bool = False
    num_workers: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and len(self.splits) > 1:
            raise ConfigError(f"--weights is one trained classifier, for one split; got splits {self.splits}: "
                              "pass a single split")
        for split in self.splits[:1]:  # a bad protocol fails here, before any work
            self.spec(split, self.unknown_sets()[0])

    def spec(self, split: int, unknown: str | None = None) -> ProtocolSpec:
        """The protocol split ``split`` (against the unknown set ``unknown`` of a cross protocol)."""
        which = {"split_seed": split} if self.random_splits else {"split": split}
        args = {**self.protocol_args, "unknown_dataset": unknown} if unknown else self.protocol_args
        return resolve_protocol(self.protocol, **which, **args)

    @property
    def layout(self) -> BenchmarkLayout:
        return BenchmarkLayout(Path(self.out), "seed" if self.random_splits else "split")

    def unknown_sets(self) -> list[str | None]:
        """The unknown datasets of a ``cross`` protocol (None: the protocol's own unknowns)."""
        names = self.protocol_args.get("unknown_dataset")
        if self.protocol != "cross" or not names:
            return [None]
        return [u.strip() for u in str(names).split(",") if u.strip()]


@dataclass
class SplitRun:
    """One split, ready for its methods: a protocol split and its data per unknown set
    (``unknowns[i]`` names the set of ``specs[i]``, None for a single one), the training
    recipe, the trained classifier and the split's run folder."""

    split: int
    unknowns: list[str | None]
    specs: list[ProtocolSpec]
    data: list[OSRData]
    train_config: TrainConfig
    classifier: Classifier
    run: RunLayout


def split_runs(settings: ExperimentSettings, bar: bool = True) -> Iterator[SplitRun]:
    """The splits of ``settings``, one after another (a progress bar over splits with ``bar``)."""
    sets = settings.unknown_sets()
    for split in progress_bar(settings.splits, desc="splits", disable=not (bar and settings.progress), unit="split"):
        specs = [settings.spec(split, u) for u in sets]
        spec = specs[0]
        seed = spec.seed if spec.name in ("cross", "custom") else settings.seed
        config = default_train_config(spec.dataset, **{**settings.train_overrides, "seed": seed})
        data = [load_protocol(s, settings.data_dir, config.image_size, settings.strict, settings.stream,
                              settings.num_workers) for s in specs]
        run = settings.layout.run(split)
        clf, _ = ensure_classifier(data[0], config, run.classifier, device=settings.device,
                                   progress=settings.progress, weights=settings.weights)
        yield SplitRun(split, sets if len(sets) > 1 else [None], specs, data, config, clf, run)
