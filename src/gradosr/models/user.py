"""A user's own model on the command line: ``--model package.module:factory``.

The factory is any callable that returns an ``nn.Module`` mapping N×C×H×W inputs to
N×K logits. It is called with ``num_classes=K`` and, when its signature accepts it (or
``**kwargs``), ``in_channels=C``. The module is imported only when the user names it on
the command line (``train``, ``fit``, ``evaluate``, ``predict``, ``benchmark``); a run
folder records the import path but loading a run never imports it: ``evaluate`` and
``predict`` need ``--model`` again, compared with the record.

``--weights FILE.safetensors`` loads an already-trained classifier's weights
(:func:`load_weights`); a pickle file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) is refused
with how to convert it, never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path

import torch
from torch import nn

from gradosr.checkpoint import looks_pickled
from gradosr.errors import ConfigError, DataError
from gradosr.models.heads import find_head, set_head

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
#: how to turn a pickle checkpoint into the safetensors file ``--weights`` takes
CONVERT = ("which gradosr never loads (it can run code). Convert it once, in Python, where you trust the file: "
           "read its state dict with torch's loader and weights_only=True, then "
           "safetensors.torch.save_file(state_dict, 'model.safetensors'), and pass --weights model.safetensors")



def is_import_path(name: object) -> bool:
    """Whether ``name`` has the form ``package.module:factory``."""
    return isinstance(name, str) and bool(_REF.match(name))


def import_factory(ref: str):
    """The callable named by ``ref`` (``package.module:attr.attr``); ConfigError naming
    what failed."""
    if not is_import_path(ref):
        raise ConfigError(f"--model {ref!r} is neither a built-in model nor package.module:factory")
    module_name, attr = ref.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--model {ref}: cannot import {module_name!r} ({exc}); is its folder on "
                          "PYTHONPATH?") from None
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(f"--model {ref}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {ref}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {ref}: {attr!r} is not callable")
    return obj


def build_user_model(ref: str, num_classes: int, in_channels: int = 3, head: str | None = None) -> nn.Module:
    """``factory(num_classes=K[, in_channels=C])`` of ``ref``, with its head found (or set
    to ``head``) and checked to have K outputs."""
    factory = import_factory(ref)
    kwargs = {"num_classes": int(num_classes)}
    try:
        params = inspect.signature(factory).parameters
        if "in_channels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["in_channels"] = int(in_channels)
    except (TypeError, ValueError):  # no signature (a builtin): pass num_classes only
        pass
    call = f"{ref}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(f"--model: calling {call} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model: {call} returned a {type(model).__name__}, not an nn.Module")
    if head is not None:
        set_head(model, head)
    out = find_head(model).out_features
    if out != num_classes:
        raise ConfigError(f"--model: the head of {call} has {out} outputs, not {num_classes}; pass --head NAME "
                          "to name the classification layer")
    return model


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """The sha256 of the ``--weights`` file ``path``; DataError for a missing file or a
    pickle (with how to convert it to safetensors)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"--weights {path} is a pickle checkpoint ({path.suffix}), {CONVERT}")
    if not path.is_file():
        raise DataError(f"--weights: no such file: {path}")
    return sha256_of(path)


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load the safetensors file ``path`` into ``model`` (strict); returns the file's
    sha256. DataError for a missing file, a pickle, an unreadable file or weights that
    do not fit the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sha = weights_sha256(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        if looks_pickled(Path(path)):
            raise DataError(f"--weights {path} is a pickle or torch.save file by its content, {CONVERT}") from None
        raise DataError(f"--weights {path} is not a readable safetensors file: {exc}") from None
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel/DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    extra = [k for k in tensors if k not in want]
    wrong = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    if missing or extra or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
                 (f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(tensors[wrong[0]].shape)} for "
                  f"{tuple(want[wrong[0]].shape)})") if wrong else ""]
        raise DataError(f"--weights {path} do not fit {type(model).__name__}: "
                        f"{'; '.join(p for p in parts if p)} tensors")
    with torch.no_grad():
        model.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()}, strict=True)
    return sha
