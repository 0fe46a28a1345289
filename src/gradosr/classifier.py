"""A trained closed-set classifier bundled with its preprocessing and class mapping.

Stored as ``<dir>/model.safetensors`` + ``<dir>/model.json`` (see :mod:`gradosr.checkpoint`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradosr.checkpoint import load_tensors, save_tensors
from gradosr.distributed import map_rows
from gradosr.errors import CheckpointError, DataError
from gradosr.models import build_model, eval_mode, find_head
from gradosr.models.user import is_import_path
from gradosr.preprocess import Preprocessing

CLASSIFIER_FORMAT = "gradosr.classifier"


@torch.no_grad()
def batched_outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                    features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode logits (N×K) and, if asked, the head's input features (N×D) of ``x``.

    ``x`` is a preprocessed float tensor N×C×H×W (any device); batches are moved to the
    model's device, and results are returned on the CPU. The model's training flags are
    restored afterwards.

    In a distributed run every process computes its contiguous shard of the rows (cut at
    multiples of ``batch_size``) and the shards are all-gathered
    (:func:`gradosr.distributed.map_rows`): every process returns the outputs of all rows.
    """
    return map_rows(lambda xs: _batched_outputs_local(model, xs, batch_size, features), x, align=batch_size)


@torch.no_grad()
def _batched_outputs_local(model: nn.Module, x: torch.Tensor, batch_size: int,
                           features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    head = find_head(model) if features else None
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach())) if head else None
    logits, feats = [], []
    try:
        with eval_mode(model):
            for start in range(0, len(x), batch_size):
                out = model(x[start:start + batch_size].to(device=device, dtype=dtype))
                logits.append(out.detach().cpu())
                if head is not None:
                    feats.append(captured.pop().flatten(1).cpu())
    finally:
        if hook is not None:
            hook.remove()
    # an empty shard (a distributed run) still has K logit columns
    n_out = logits[0].shape[1] if logits else (head or find_head(model)).out_features
    logit_t = torch.cat(logits) if logits else torch.zeros(0, n_out)
    feat_t = (torch.cat(feats) if feats else torch.zeros(0, head.in_features)) if head is not None else None
    return logit_t, feat_t


class Classifier:
    """A closed-set classifier over K known classes.

    Attributes:
        model: the ``nn.Module`` mapping N×C×H×W inputs to N×K logits.
        arch: architecture name (``lenet``, ``cnn32``, ``resnet18``) or ``"custom"``.
        preprocessing: how uint8 images become inputs (None: the caller passes
            model inputs, float N×C×H×W, itself).
        class_ids: original dataset class id of each label 0..K-1.
        class_names: name of each label 0..K-1.
        meta: everything else recorded in ``model.json`` (protocol, seed, training
            config, epoch, metrics).
    """

    def __init__(self, model: nn.Module, arch: str, preprocessing: Preprocessing | None,
                 class_ids: list[int], class_names: list[str] | None = None, meta: dict | None = None):
        self.model = model
        self.arch = arch
        self.preprocessing = preprocessing
        self.class_ids = [int(c) for c in class_ids]
        self.class_names = list(class_names) if class_names else [str(c) for c in class_ids]
        self.meta = dict(meta or {})

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """C×H×W of the model inputs, when known: the preprocessing's, else the shape
        recorded in ``meta["input_shape"]`` (set when a GradientOSR is fitted on arrays)."""
        if self.preprocessing is not None:
            return (self.preprocessing.channels, *self.preprocessing.size)
        shape = self.meta.get("input_shape")
        return tuple(int(s) for s in shape) if shape else None

    def inputs(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Model inputs (float N×C×H×W) of ``images``; rejects NaN/Inf.

        uint8 images N×H×W×C (or N×H×W) go through the stored preprocessing; float
        arrays/tensors of 4 dimensions are taken as model inputs already, and must then
        have the C×H×W of :attr:`input_shape` when it is known.
        """
        if isinstance(images, torch.Tensor):
            is_float = images.is_floating_point()
        else:
            try:
                images = np.asarray(images)
            except (ValueError, TypeError) as exc:
                raise DataError(f"inputs could not be converted to an array: {exc}") from None
            if images.dtype.kind not in "biuf":
                raise DataError(f"inputs must be uint8 images or float model inputs, got dtype {images.dtype}")
            is_float = np.issubdtype(images.dtype, np.floating)
        if is_float:
            x = torch.as_tensor(images)
            if x.ndim != 4:
                raise DataError(f"float inputs must be model inputs N×C×H×W, got shape {tuple(x.shape)}")
            want = self.input_shape
            if want is not None and tuple(x.shape[1:]) != want:
                raise DataError(f"float inputs must be model inputs N×{want[0]}×{want[1]}×{want[2]} for this "
                                f"classifier, got shape {tuple(x.shape)}; pass uint8 images N×H×W×C to have "
                                "them converted and resized")
        elif self.preprocessing is None:
            raise DataError("this classifier has no stored preprocessing: pass float model inputs N×C×H×W")
        else:
            x = self.preprocessing(images)
        if not torch.isfinite(x).all():
            raise DataError("inputs contain NaN or Inf values")
        return x

    def logits(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Eval-mode logits, float32 N×K on the CPU, of uint8 N×H×W×C images."""
        return batched_outputs(self.model, self.inputs(images), batch_size)[0].float()

    def logits_and_features(self, images: np.ndarray, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N×K, penultimate features N×D: the head's input), float32 on the CPU."""
        logits, feats = batched_outputs(self.model, self.inputs(images), batch_size, features=True)
        return logits.float(), feats.float()

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        """Write ``model.safetensors`` and ``model.json`` atomically into ``directory``."""
        meta = {
            **self.meta, **(extra or {}),
            "arch": self.arch,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
            "class_ids": self.class_ids,
            "class_names": self.class_names,
        }
        self.meta = {k: v for k, v in meta.items()}
        save_tensors(directory, "model", self.model.state_dict(), meta, CLASSIFIER_FORMAT)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None,
             device: str | torch.device = "cpu", model_ref: str | None = None) -> "Classifier":
        """Load a classifier saved by :meth:`save`.

        ``model``: an untrained instance for ``arch == "custom"`` checkpoints (its state
        dict must match). ``model_ref``: the ``package.module:factory`` the user gave
        (``--model``) for a classifier whose arch is one: it must equal the recorded one,
        and only then is the module imported (never because a run folder names it).
        Raises CheckpointError on any mismatch.
        """
        directory = Path(directory)
        tensors, meta = load_tensors(directory, "model", CLASSIFIER_FORMAT)
        try:
            arch, k = meta["arch"], int(meta["num_classes"])
            pre = Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing") else None
            class_ids = meta["class_ids"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory}/model.json lacks a valid field: {exc}") from None
        if len(class_ids) != k:
            raise CheckpointError(f"{directory}/model.json: {len(class_ids)} class ids for {k} classes")
        if model is None:
            if arch == "custom":
                raise CheckpointError(f"{directory} holds a custom model: pass an instance of it as model=")
            if pre is None:
                raise CheckpointError(f"{directory}/model.json has no preprocessing for arch {arch!r}")
            head = (meta.get("train") or {}).get("head")
            if is_import_path(arch) and model_ref is None:
                raise CheckpointError(f"{directory} holds a user model built by {arch}: pass --model {arch} "
                                      "again (gradosr never imports a module named in a run folder)")
            if (is_import_path(arch) or is_import_path(model_ref)) and model_ref != arch:
                raise CheckpointError(f"{directory} holds a model built by {arch}, but --model is {model_ref}")
            model = build_model(arch, k, pre.channels, head=head)
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"{directory}: weights do not fit architecture {arch!r} with {k} classes ({first})") from None
        out = find_head(model).out_features
        if out != k:
            raise CheckpointError(f"{directory}: the model's head has {out} outputs, model.json says {k} classes")
        model.to(device).eval()
        meta_rest = {key: v for key, v in meta.items() if key not in ("format", "format_version", "sha256")}
        return cls(model, arch, pre, class_ids, meta.get("class_names"), meta_rest)
