"""Closed-set training of a classifier on the known classes (docs/design.md, "Training defaults").

Deterministic on CPU: the model is initialised from ``seed``; each epoch's shuffling,
augmentation and dropout draw from generators seeded by (seed, epoch), so a run resumed
at an epoch boundary (``resume=True``) ends with exactly the weights of an
uninterrupted run. A checkpoint is written atomically after every epoch.

Distributed (``torchrun``, :mod:`gradosr.distributed`): the model is wrapped in
``torch.nn.parallel.DistributedDataParallel``. Every process draws the same shuffling
and augmentation of each global batch of ``batch_size`` images and trains on its
contiguous slice of it; each process's loss is its slice's summed cross-entropy times
world_size / (global batch length), so DDP's gradient averaging gives exactly the
single-process mean gradient, also for an uneven last batch (float64: equal to 1e-10;
the difference is rounding). BatchNorm uses the global batch's statistics on CUDA
(SyncBatchNorm) and each process's own slice's statistics on CPU (gloo has no
SyncBatchNorm), where training therefore differs slightly from one process; dropout
masks also differ. Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradosr.checkpoint import load_tensors, remove_stale_temporaries, save_tensors
from gradosr.classifier import Classifier, batched_outputs
from gradosr.data.imageset import ImageSource
from gradosr import distributed
from gradosr.data.registry import dataset_info
from gradosr.errors import CheckpointError, ConfigError
from gradosr.models import build_model
from gradosr.preprocess import Preprocessing
from gradosr.progress import progress_bar
from gradosr.progress import write as progress_write
from gradosr.streams import ModelInputs, SourceInputs, TensorInputs, zip_labels

TRAIN_STATE_FORMAT = "gradosr.train_state"
AUGMENTATIONS = ("none", "crop", "crop-flip")


@dataclass(frozen=True)
class TrainConfig:
    """Closed-set training recipe (recorded in every checkpoint).

    Attributes:
        model: architecture name (``lenet``, ``cnn32``, ``resnet18``), or a user model's
            ``package.module:factory`` (:mod:`gradosr.models.user`).
        epochs, batch_size: as usual.
        optimizer: ``adam`` or ``sgd`` (momentum ``momentum``).
        lr, weight_decay: learning rate and L2 weight decay.
        schedule: ``none`` or ``cosine`` (per-epoch cosine decay to 0).
        augment: ``none``, ``crop`` (random crop, zero padding 4) or ``crop-flip``
            (plus random horizontal flip).
        seed: initialisation, shuffling, augmentation and dropout seed.
        image_size: side of the (square) model input; None = the default rule of
            :func:`default_preprocessing` (e.g. 64 keeps TinyImageNet at full size).
        head: the name of the model's classification layer when it cannot be found
            (``--head``, :func:`gradosr.models.set_head`); None: found by the rule of
            :mod:`gradosr.models.heads`.
    """

    model: str = "lenet"
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "none"
    augment: str = "none"
    seed: int = 0
    image_size: int | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.schedule not in ("none", "cosine"):
            raise ConfigError(f"schedule must be none or cosine, got {self.schedule!r}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must lie in 8..1024, got {self.image_size}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError(f"invalid training config {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def default_train_config(dataset: str, **overrides) -> TrainConfig:
    """The recipe of docs/design.md ("Training defaults") for ``dataset``; ``overrides`` that are not None win.

    28×28 data: lenet, Adam lr 1e-3, batch 128, 15 epochs (mnist-sample) or 10, no
    augmentation. 32×32 data: cnn32, SGD momentum 0.9, lr 0.1 cosine, weight decay
    5e-4, 100 epochs, random crop (pad 4) plus horizontal flip except for SVHN digits.
    """
    info = dataset_info(dataset)
    if info.image_size == (28, 28):
        base = TrainConfig("lenet", 15 if dataset == "mnist-sample" else 10, 128, "adam", 1e-3)
    else:
        base = TrainConfig("cnn32", 100, 128, "sgd", 0.1, 0.9, 5e-4, "cosine",
                           "crop" if dataset == "svhn" else "crop-flip")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def default_preprocessing(dataset: str, model: str, image_size: int | None = None) -> Preprocessing:
    """``image_size`` when given; else 28×28 for lenet on 28×28 data, the dataset's own
    size for a user model (``package.module:factory``) and 32×32 otherwise (TinyImageNet
    included); the dataset's channel count."""
    from gradosr.models.user import is_import_path

    info = dataset_info(dataset)
    if image_size is not None:
        size = (image_size, image_size)
    elif is_import_path(model) or (model == "lenet" and info.image_size == (28, 28)):
        size = info.image_size
    else:
        size = (32, 32)
    return Preprocessing.default(size, info.channels)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4) and, for ``crop-flip``, horizontal flip of N×C×H×W ``x``."""
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 8)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    if mode == "crop-flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor | ModelInputs, y: torch.Tensor, batch_size: int = 256) -> float:
    """Eval-mode closed-set accuracy of ``model`` on inputs N×C×H×W (a tensor, or
    :class:`gradosr.streams.ModelInputs` read chunk by chunk) and labels N."""
    if len(y) == 0:
        return float("nan")
    if isinstance(x, ModelInputs):
        correct = sum(int((batched_outputs(model, xb, batch_size)[0].argmax(1) == yb).sum())
                      for xb, yb in zip_labels(x, torch.as_tensor(y)))
        return correct / len(y)
    logits, _ = batched_outputs(model, x, batch_size)
    return float((logits.argmax(1) == y).float().mean())


def train_classifier(
    train: ImageSource | tuple[torch.Tensor, np.ndarray],
    val: ImageSource | tuple[torch.Tensor, np.ndarray] | None,
    class_ids: list[int],
    config: TrainConfig,
    preprocessing: Preprocessing | None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    meta: dict | None = None,
    class_names: list[str] | None = None,
    model: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
) -> Classifier:
    """Train a classifier on ``train`` (labels 0..K-1, K = len(class_ids)).

    Args:
        train, val: known training and held-out images (val is only evaluated), as
            image sources (an ImageSet or an indexed folder, read and preprocessed with
            ``preprocessing`` one batch at a time: memory does not grow with N) or as
            (inputs N×C×H×W float tensor, labels N) pairs used as they are.
        config: the recipe; ``config.seed`` seeds everything.
        preprocessing: applied to the uint8 images.
        out_dir: if given, ``model.safetensors``/``model.json`` plus the optimizer state
            are written there after every epoch.
        resume: continue from the checkpoint in ``out_dir`` (its identity ``meta`` and
            config must match).
        model: an initialised ``nn.Module`` with K outputs to train instead of building
            ``config.model`` (recorded as arch ``custom``).
        meta: extra identity recorded in the checkpoint (protocol, ...).
        log: receives one line per epoch (default: printed; on rank 0 only in a distributed run).

    Returns:
        the trained :class:`Classifier` (model in eval mode, on ``device``).
    """
    k = len(class_ids)
    device = torch.device(device)
    arch = "custom" if model is not None else config.model
    if model is None:
        if preprocessing is None:
            raise ConfigError("training a built-in architecture needs a preprocessing")
        torch.manual_seed(config.seed)
        model = build_model(config.model, k, preprocessing.channels, head=config.head)
    model.to(device)
    opt = _make_optimizer(model, config)
    history: list[dict] = []
    start_epoch = 0
    identity = {**(meta or {}), "train": config.to_dict()}
    if resume:
        if out_dir is None:
            raise ConfigError("resume needs an output folder")
        start_epoch, history = _load_resume_state(Path(out_dir), model, opt, identity, device)
    x_train, y_train = _as_inputs(train, preprocessing)
    if len(y_train) == 0:
        raise ConfigError("no training images")
    if y_train.min() < 0 or y_train.max() >= k:
        raise ConfigError(f"training labels must lie in 0..{k - 1}")
    x_val, y_val = _as_inputs(val, preprocessing) if val is not None else (None, None)
    write = log or (progress_write if progress else print)
    if not distributed.is_main():
        write = _silent
    clf = Classifier(model, arch, preprocessing, class_ids, class_names, identity)
    if start_epoch:  # resumed: keep the progress record even when no epoch is left to run
        clf.meta.update({"epoch": start_epoch, "complete": start_epoch == config.epochs, "history": history})
    world, rank = distributed.world_size(), distributed.rank()
    # DDP whenever a process group exists (also with one process: torchrun --nproc_per_node=1)
    ddp = distributed.is_initialized() and start_epoch < config.epochs
    net, restore = distributed.wrap_ddp(model, device) if ddp else (model, None)
    in_dtype = next(model.parameters()).dtype  # inputs follow the model (e.g. a float64 model, float32 images)
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.time()
            gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
            # dropout: another stream per process (rank 0's is the single-process one)
            torch.manual_seed(_epoch_seed(config.seed, epoch) + 1 + 1_000_003 * rank)
            for group in opt.param_groups:
                group["lr"] = _lr_at(config, epoch)
            order = torch.randperm(len(y_train), generator=gen)
            net.train()
            total_loss, correct, seen = 0.0, 0, 0
            bar = progress_bar(range(0, len(order), config.batch_size), desc=f"epoch {epoch + 1}/{config.epochs}",
                               leave=False, disable=not progress, unit="batch")
            # the batches' inputs are read (decoded and preprocessed) one batch at a time
            batches = x_train.batches(order[s:s + config.batch_size] for s in range(0, len(order), config.batch_size))
            for start, xb_all in zip(bar, batches):
                idx = order[start:start + config.batch_size]
                xg = augment_batch(xb_all, config.augment, gen)  # the whole global batch, as in one process
                if not ddp:
                    xb, yb = xg.to(device=device, dtype=in_dtype), y_train[idx].to(device)
                    opt.zero_grad(set_to_none=True)
                    out = net(xb)
                    loss = F.cross_entropy(out, yb)
                    loss.backward()
                    opt.step()
                    total_loss += float(loss.detach()) * len(idx)
                    correct += int((out.argmax(1) == yb).sum())
                    seen += len(idx)
                    continue
                lo, hi = distributed.shard_bounds(len(idx))
                # A process without rows of this (short) batch runs the whole batch with weight 0,
                # so that DDP's collectives stay in step; its gradient contribution is zero.
                own = hi > lo
                xb, yb = (xg[lo:hi], y_train[idx][lo:hi]) if own else (xg, y_train[idx])
                xb, yb = xb.to(device=device, dtype=in_dtype), yb.to(device)
                opt.zero_grad(set_to_none=True)
                out = net(xb)
                loss_sum = F.cross_entropy(out, yb, reduction="sum")
                (loss_sum * (world / len(idx) if own else 0.0)).backward()  # DDP averages: the global mean
                opt.step()
                if own:
                    total_loss += float(loss_sum.detach())
                    correct += int((out.argmax(1) == yb).sum())
                    seen += len(yb)
            if ddp:
                total_loss, correct, seen = distributed.all_reduce_sum([total_loss, correct, seen])
                correct, seen = int(round(correct)), int(round(seen))
            model.eval()
            record = {"epoch": epoch + 1, "loss": total_loss / seen, "train_acc": correct / seen,
                      "val_acc": accuracy(model, x_val, y_val) if x_val is not None else None,
                      "seconds": round(time.time() - t0, 3)}
            history.append(record)
            val_txt = f" val_acc {record['val_acc']:.4f}" if record["val_acc"] is not None else ""
            write(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f} "
                  f"train_acc {record['train_acc']:.4f}{val_txt} ({record['seconds']:.1f}s)")
            clf.meta.update({"epoch": epoch + 1, "complete": epoch + 1 == config.epochs, "history": history})
            if out_dir is not None:  # written by rank 0 only (every process updates clf.meta alike)
                _save_state(Path(out_dir), clf, opt)
    finally:
        if restore is not None:
            restore()  # the plain model (BatchNorm, not SyncBatchNorm), holding the trained weights
            net = None
            gc.collect()  # free the DDP wrapper (and the gradient buckets it holds) now, not at exit
    model.eval()
    return clf


def _silent(_line: str) -> None:
    """The epoch log of processes other than rank 0."""


def _as_inputs(part, preprocessing: Preprocessing | None) -> tuple[TensorInputs | SourceInputs, torch.Tensor]:
    """(model inputs, labels N int64) of an image source (an ImageSet or an indexed
    folder: preprocessed batch by batch as training reads them) or an (inputs, labels) pair."""
    if isinstance(part, ImageSource):
        if preprocessing is None:
            raise ConfigError("images need a preprocessing to become model inputs")
        return SourceInputs(part, preprocessing), torch.as_tensor(part.labels)
    x, y = part
    return TensorInputs(torch.as_tensor(x)), torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _state_stem(epoch: int) -> str:
    """The optimizer state of an epoch lives in one of two slots, by the epoch's parity."""
    return f"train_state.{int(epoch) % 2}"


def _save_state(out_dir: Path, clf: Classifier, opt: torch.optim.Optimizer) -> None:
    tensors, rest = _optimizer_tensors(opt)
    epoch = clf.meta["epoch"]
    # The optimizer state first, in its epoch's slot; model.json (written last) commits the
    # epoch. Until then the other slot keeps the previous epoch's state, so a crash at any
    # point leaves weights and optimizer state of the same epoch on disk.
    save_tensors(out_dir, _state_stem(epoch), tensors, {"optimizer": rest, "epoch": epoch}, TRAIN_STATE_FORMAT)
    clf.save(out_dir)  # save_tensors and clf.save write on rank 0 only
    if not distributed.is_main():
        return
    for stem in (_state_stem(epoch + 1), "train_state"):  # the previous slot; the single file of older versions
        for suffix in (".json", ".safetensors", ".safetensors.pending"):
            (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
        remove_stale_temporaries(out_dir, stem)  # of a write killed before its rename


def _load_resume_state(out_dir: Path, model: nn.Module, opt, identity: dict, device) -> tuple[int, list]:
    if not (out_dir / "model.json").is_file():
        return 0, []
    from gradosr.runs import identity_mismatch

    clf = Classifier.load(out_dir, model=model, device=device)
    reason = identity_mismatch(clf.meta, identity)
    if reason:
        raise CheckpointError(f"cannot resume {out_dir}: {reason}")
    epoch = clf.meta.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(f"cannot resume {out_dir}: model.json records no valid epoch ({epoch!r})")
    stem = _state_stem(epoch)
    if not (out_dir / f"{stem}.json").is_file() and (out_dir / "train_state.json").is_file():
        stem = "train_state"  # written by an older gradosr
    tensors, meta = load_tensors(out_dir, stem, TRAIN_STATE_FORMAT)
    if meta.get("epoch") != clf.meta.get("epoch"):
        raise CheckpointError(f"cannot resume {out_dir}: optimizer state of epoch {meta.get('epoch')} "
                              f"but weights of epoch {clf.meta.get('epoch')}")
    _restore_optimizer(opt, {k: v.to(device) for k, v in tensors.items()}, meta["optimizer"])
    return int(clf.meta["epoch"]), list(clf.meta.get("history", []))
