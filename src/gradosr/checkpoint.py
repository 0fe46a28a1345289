"""Safe, atomic, verified storage of tensors and metadata.

A stored object ``<dir>/<stem>`` is two files:
- ``<stem>.safetensors``: the tensors (safetensors never executes file content);
- ``<stem>.json``: metadata, with ``format`` (what the object is), ``format_version``
  and ``sha256`` (of the weights file), checked on load.

Every file is written atomically: to a temporary file in the same folder, fsync'ed,
then renamed over the target, so a crash never leaves a half-written file. Pickles
(``torch.load`` of user files) are never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gradosr.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, with a CheckpointError naming the file when missing or corrupt."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return obj


def save_tensors(directory: str | os.PathLike, stem: str, tensors: dict[str, torch.Tensor],
                 meta: dict, fmt: str) -> None:
    """Store ``tensors`` and ``meta`` as ``<directory>/<stem>.{safetensors,json}``.

    The weights file is written first, then the JSON holding its sha256, so the JSON's
    presence marks a complete object.
    """
    directory = Path(directory)
    data = st_save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(directory / f"{stem}.safetensors", data)
    record = {"format": fmt, "format_version": FORMAT_VERSION,
              "sha256": hashlib.sha256(data).hexdigest(), **meta}
    atomic_write_json(directory / f"{stem}.json", record)


def load_tensors(directory: str | os.PathLike, stem: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load what :func:`save_tensors` stored; verify format, version and checksum.

    Raises:
        CheckpointError: a file is missing or corrupt, the checksum differs, the object
            is of another kind or of a newer format version, or a pickle was handed in.
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(_pickle_hint(directory) or f"{directory} is a file; expected a checkpoint folder")
    meta = read_json(directory / f"{stem}.json")
    if meta.get("format") != fmt:
        raise CheckpointError(f"{directory / (stem + '.json')} holds a {meta.get('format')!r}, expected {fmt!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} was written by a newer gradosr (format version {version}, this one reads "
            f"<= {FORMAT_VERSION}): upgrade gradosr to read it"
        )
    wpath = directory / f"{stem}.safetensors"
    try:
        data = wpath.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file {wpath}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        hint = _pickle_hint(wpath)
        raise CheckpointError(hint or f"{wpath} does not match the sha256 recorded in {stem}.json: the file is corrupt or was replaced")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(_pickle_hint(wpath) or f"{wpath} is not a valid safetensors file: {exc}") from None
    return tensors, meta


def _pickle_hint(path: Path) -> str | None:
    """A refusal message when ``path`` looks like a pickle / torch.save file."""
    try:
        head = path.read_bytes()[:4]
    except OSError:
        return None
    if head[:1] == b"\x80" or head[:2] == b"PK":
        return (f"{path} looks like a pickle or torch.save (.pt) file; gradosr never unpickles files "
                "(they can execute code). Convert it to safetensors (safetensors.torch.save_file) or "
                "load the model yourself and use GradientOSR.from_classifier")
    return None
