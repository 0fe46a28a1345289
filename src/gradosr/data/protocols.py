"""Open-set recognition protocols: which classes are known, which are unknown.

A protocol is first *specified* (:class:`ProtocolSpec`, cheap, hashable, stored in
checkpoints) and then *loaded* (:class:`OSRData`, the images).

Protocols:
- ``mnist``, ``svhn``, ``cifar10``, ``tiny-imagenet``: the 5 standard splits (Neal et
  al. 2018; Vaze et al. 2022) from ``osr_splits.json``; the other classes are unknown.
- ``cifar+10``, ``cifar+50``: 4 known CIFAR-10 classes (the standard lists), and 10 or
  50 unknown CIFAR-100 classes.
- ``mnist-sample``, ``fashion-mnist``: the 5 MNIST split lists applied to those datasets.
- Any of the 10-class protocols with ``split_seed=S``: a random 6/4 split.
- ``custom``: ``dataset`` with explicit ``known`` and ``unknown`` class lists; its
  "splits" are seeds (validation hold-out, proxy split and, in benchmarks, training).
- ``cross``: every class of ``known_dataset`` is known; the unknowns are a seeded sample
  of ``unknown_dataset``'s test set, as large as the known test set (1:1; if the unknown
  set is smaller, the known test set is subsampled). Its "splits" are seeds.

Per split, a stratified 20% of the known training images (seed = the split's seed) is
held out as validation data (docs/design.md, "Protocols").
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from gradosr.data.by_path import canonical_name, check_labelled
from gradosr.data.imageset import ImageSet, ImageSource
from gradosr.data.registry import DATASETS, dataset_info, load_dataset
from gradosr.data.synthetic import generate, is_synthetic
from gradosr.errors import ConfigError, DataError

VALIDATION_FRACTION = 0.2

# protocol name -> (known dataset, unknown dataset, key of the known lists, key of the unknown lists)
STANDARD = {
    "mnist": ("mnist", "mnist", "mnist", None),
    "mnist-sample": ("mnist-sample", "mnist-sample", "mnist", None),
    "fashion-mnist": ("fashion-mnist", "fashion-mnist", "mnist", None),
    "svhn": ("svhn", "svhn", "svhn", None),
    "cifar10": ("cifar10", "cifar10", "cifar10", None),
    "cifar+10": ("cifar10", "cifar100", "cifar_plus_known", "cifar_plus_10_unknown"),
    "cifar+50": ("cifar10", "cifar100", "cifar_plus_known", "cifar_plus_50_unknown"),
    "tiny-imagenet": ("tiny-imagenet", "tiny-imagenet", "tiny_imagenet", None),
}
PROTOCOLS = tuple(STANDARD) + ("custom", "cross")
NUM_STANDARD_SPLITS = 5


@lru_cache(maxsize=1)
def standard_splits() -> dict:
    """The standard class lists (package data ``osr_splits.json``)."""
    text = resources.files("gradosr.data").joinpath("osr_splits.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class ProtocolSpec:
    """Which classes are known and unknown, and the seed of this split.

    Attributes:
        name: protocol name (see module docstring).
        dataset: dataset of the known classes.
        known: original class ids of the known classes, in label order (label i = known[i]).
        unknown: original class ids of the unknown classes in ``unknown_dataset``.
        unknown_dataset: dataset the unknowns come from.
        split: standard split index, or None.
        split_seed: seed of a random split, or None.
        seed: the split's seed: validation hold-out, proxy splits and sampling use it.
    """

    name: str
    dataset: str
    known: tuple[int, ...]
    unknown: tuple[int, ...]
    unknown_dataset: str
    split: int | None = None
    split_seed: int | None = None
    seed: int = 0

    @property
    def num_known(self) -> int:
        return len(self.known)

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``mnist-sample/split0``."""
        if self.name == "cross":
            return f"cross:{self.dataset}->{self.unknown_dataset}/seed{self.seed}"
        if self.name == "custom":
            return f"custom:{self.dataset}/seed{self.seed}"
        if self.split is not None:
            return f"{self.name}/split{self.split}"
        if self.split_seed is not None:
            return f"{self.name}/seed{self.split_seed}"
        return f"{self.name}:{self.dataset}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["known"], d["unknown"] = list(self.known), list(self.unknown)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProtocolSpec":
        try:
            return cls(**{**d, "known": tuple(d["known"]), "unknown": tuple(d["unknown"])})
        except (TypeError, KeyError) as exc:
            raise ConfigError(f"invalid protocol record {d!r}: {exc}") from None


def parse_class_list(text: str) -> tuple[int, ...]:
    """Parse ``"0,2,4"`` (or ``"0-3,7"``) into a tuple of ints."""
    return tuple(parse_index_list(text, what="class list"))


def parse_index_list(text: str, what: str = "list") -> list[int]:
    """Parse ``"0-4"``, ``"0,2"`` or ``"1,3-5"`` into a list of ints (order kept)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                out.extend(range(lo_i, hi_i + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"invalid {what} {text!r}: use numbers like 0,2,4 or ranges like 0-4") from None
    if not out:
        raise ConfigError(f"empty {what} {text!r}")
    return out


def canonical_dataset(name: str) -> str:
    """The name a protocol records for dataset ``name``: a registered name as it is (it
    wins over a folder of that name), a path as ``folder:/abs/path`` or
    ``npz:/abs/path.npz``, a synthetic set as it is; ConfigError for anything else."""
    if name in DATASETS:
        return name
    canonical = canonical_name(str(name))
    if canonical is None:
        dataset_info(name)  # the error listing the known names
    return canonical


def _check_classes(known, unknown, n_known_ds: int, n_unknown_ds: int, same_dataset: bool) -> None:
    for what, ids, n in (("known", known, n_known_ds), ("unknown", unknown, n_unknown_ds)):
        bad = [c for c in ids if not 0 <= c < n]
        if bad:
            raise ConfigError(f"{what} class ids {bad} are out of range 0..{n - 1}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{what} class list {list(ids)} has duplicates")
    if len(known) < 2:
        raise ConfigError(f"at least 2 known classes are needed, got {list(known)}")
    if not unknown:
        raise ConfigError("at least 1 unknown class is needed")
    if same_dataset and set(known) & set(unknown):
        raise ConfigError(f"classes {sorted(set(known) & set(unknown))} are both known and unknown")


def resolve_protocol(
    name: str,
    split: int | None = None,
    split_seed: int | None = None,
    dataset: str | None = None,
    known: tuple[int, ...] | str | None = None,
    unknown: tuple[int, ...] | str | None = None,
    known_dataset: str | None = None,
    unknown_dataset: str | None = None,
) -> ProtocolSpec:
    """Build the :class:`ProtocolSpec` that the CLI flags describe.

    Standard protocols take ``split`` (0-4, default 0) or ``split_seed`` (random 6/4
    split, 10-class datasets). ``custom`` takes ``dataset``, ``known``, ``unknown`` and
    ``split`` (= seed); ``cross`` takes ``known_dataset``, ``unknown_dataset`` and
    ``split`` (= seed).
    """
    if isinstance(known, str):
        known = parse_class_list(known)
    if isinstance(unknown, str):
        unknown = parse_class_list(unknown)
    dataset, known_dataset, unknown_dataset = (None if d is None else canonical_dataset(d)
                                               for d in (dataset, known_dataset, unknown_dataset))
    if name == "custom" or (name is None and dataset is not None):
        if dataset is None or known is None or unknown is None:
            raise ConfigError("the custom protocol needs --dataset, --known and --unknown")
        info = dataset_info(dataset)
        check_labelled(info, "--dataset of --protocol custom")
        n = info.num_classes
        _check_classes(known, unknown, n, n, True)
        if split is not None and split_seed is not None:
            raise ConfigError("give either --split or --split-seed, not both")
        seed = split_seed if split_seed is not None else (int(split) if split is not None else 0)
        return ProtocolSpec("custom", dataset, tuple(known), tuple(unknown), dataset,
                            split=None if split is None else int(split), split_seed=split_seed, seed=seed)
    if name == "cross":
        if known_dataset is None or unknown_dataset is None:
            raise ConfigError("the cross protocol needs --known-dataset and --unknown-dataset")
        if known_dataset == unknown_dataset:
            raise ConfigError("the cross protocol needs two different datasets")
        if split_seed is not None:
            raise ConfigError("the cross protocol knows every class (no class split to draw): its seeds are "
                              "--split (train, fit) or --splits (benchmark, ablate), not --split-seed(s)")
        ka, ub = dataset_info(known_dataset), dataset_info(unknown_dataset)
        check_labelled(ka, "--known-dataset")
        seed = 0 if split is None else int(split)
        return ProtocolSpec("cross", known_dataset, tuple(range(ka.num_classes)),
                            tuple(range(ub.num_classes)), unknown_dataset, split=seed, seed=seed)
    if name not in STANDARD:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    if known is not None or unknown is not None:
        raise ConfigError(f"--known/--unknown need --protocol custom, not {name!r}")
    ds, uds, known_key, unknown_key = STANDARD[name]
    n_known_ds = dataset_info(ds).num_classes
    splits = standard_splits()
    if split_seed is not None:
        if split is not None:
            raise ConfigError("give either --split or --split-seed, not both")
        if unknown_key is not None or n_known_ds != 10:
            raise ConfigError(f"--split-seed (a random 6/4 split) needs a 10-class protocol, not {name!r}")
        perm = np.random.default_rng(int(split_seed)).permutation(10)
        known_ids = tuple(int(c) for c in sorted(perm[:6]))
        unknown_ids = tuple(int(c) for c in sorted(perm[6:]))
        return ProtocolSpec(name, ds, known_ids, unknown_ids, uds, split_seed=int(split_seed), seed=int(split_seed))
    split = 0 if split is None else int(split)
    if not 0 <= split < NUM_STANDARD_SPLITS:
        raise ConfigError(f"--split must be 0..{NUM_STANDARD_SPLITS - 1}, got {split}")
    known_ids = tuple(int(c) for c in splits[known_key][split])
    if unknown_key is None:
        unknown_ids = tuple(c for c in range(n_known_ds) if c not in known_ids)
    else:
        unknown_ids = tuple(int(c) for c in splits[unknown_key][split])
    return ProtocolSpec(name, ds, known_ids, unknown_ids, uds, split=split, seed=split)


@dataclass(frozen=True)
class OSRData:
    """The images of one protocol split (image sources: :class:`ImageSet` in memory, or
    indexed folders, :mod:`gradosr.data.indexed`).

    Attributes:
        spec: the protocol split.
        known_train: known training images, labels remapped to 0..K-1 (80%).
        val: held-out known training images (20%, stratified), labels 0..K-1. Never used
            to train the classifier.
        known_test: known test images, labels 0..K-1.
        unknown_test: unknown test images; labels are their original ids in
            ``spec.unknown_dataset``.
        class_names: names of the K known classes, in label order.
    """

    spec: ProtocolSpec
    known_train: ImageSource
    val: ImageSource
    known_test: ImageSource
    unknown_test: ImageSource
    class_names: tuple[str, ...]

    @property
    def num_known(self) -> int:
        return self.spec.num_known


def _select(data: ImageSource, classes: tuple[int, ...], remap: bool, what: str) -> ImageSource:
    mask = np.isin(data.labels, classes)
    picked = data.subset(mask)
    counts = {c: int((picked.labels == c).sum()) for c in classes}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(f"{what}: classes {empty} have no images")
    if remap:
        lookup = np.full(int(max(classes)) + 1, -1, dtype=np.int64)
        lookup[list(classes)] = np.arange(len(classes))
        picked = picked.with_labels(lookup[picked.labels])
    return picked


def load_protocol(spec: ProtocolSpec, data_dir: str | os.PathLike | None = None, image_size: int | None = None,
                  strict: bool = False, stream: bool = False, num_workers: int | None = None) -> OSRData:
    """Load the images of ``spec`` (see :class:`OSRData`).

    ``image_size``, ``strict``: how path datasets are read (:func:`load_dataset`). In a
    ``cross`` protocol the unknown images are converted to the known images' H×W×C
    (:func:`gradosr.preprocess.convert_uint8`), and a synthetic set is generated with
    the split's seed, as many images as the known test set.

    ``stream``: folder datasets are indexed, not loaded: the parts are then
    :class:`gradosr.data.indexed.FolderImages` (the same images, decoded on demand by
    ``num_workers`` processes; docs/design.md, "Streaming").
    """
    from sklearn.model_selection import train_test_split

    train, test = load_dataset(spec.dataset, data_dir, image_size, strict, stream, num_workers)
    known_train = _select(train, spec.known, True, f"{spec.dataset} train")
    known_test = _select(test, spec.known, True, f"{spec.dataset} test")
    if is_synthetic(spec.unknown_dataset):
        images = generate(spec.unknown_dataset, known_test.materialise().images, spec.seed)
        unknown_test = ImageSet(images, np.full(len(images), -1, np.int64))
    elif spec.unknown_dataset == spec.dataset:
        unknown_test = _select(test, spec.unknown, False, f"{spec.unknown_dataset} test")
    else:
        unknown_test = load_dataset(spec.unknown_dataset, data_dir, image_size, strict, stream, num_workers)[1]
    if spec.name == "cross":
        rng = np.random.default_rng(spec.seed)
        n = min(len(known_test), len(unknown_test))
        if len(unknown_test) > n:
            unknown_test = unknown_test.subset(np.sort(rng.choice(len(unknown_test), n, replace=False)))
        if len(known_test) > n:
            known_test = known_test.subset(np.sort(rng.choice(len(known_test), n, replace=False)))
        h, w, c = known_test.shape
        unknown_test = unknown_test.converted((h, w), c)
    elif spec.unknown_dataset != spec.dataset:
        unknown_test = _select(unknown_test, spec.unknown, False, f"{spec.unknown_dataset} test")
    counts = np.bincount(known_train.labels, minlength=spec.num_known)
    if counts.min() < 2:
        raise DataError(f"every known class needs at least 2 training images for the validation split, got {counts.tolist()}")
    n_val = int(np.ceil(VALIDATION_FRACTION * len(known_train)))
    if min(n_val, len(known_train) - n_val) < spec.num_known:
        raise DataError(f"{len(known_train)} known training images are too few for a stratified "
                        f"{VALIDATION_FRACTION:.0%} validation split of {spec.num_known} classes: every class needs "
                        f"about {int(np.ceil(1 / VALIDATION_FRACTION))} or more")
    idx_train, idx_val = train_test_split(
        np.arange(len(known_train)), test_size=VALIDATION_FRACTION,
        stratify=known_train.labels, random_state=spec.seed,
    )
    names = dataset_info(spec.dataset).class_names
    class_names = tuple(names[c] if c < len(names) else str(c) for c in spec.known)
    return OSRData(spec, known_train.subset(np.sort(idx_train)), known_train.subset(np.sort(idx_val)),
                   known_test, unknown_test, class_names)
