"""Safe, atomic, verified storage of tensors and metadata.

A stored object ``<dir>/<stem>`` is two files:
- ``<stem>.safetensors``: the tensors (safetensors never executes file content);
- ``<stem>.json``: metadata, with ``format`` (what the object is), ``format_version``
  and ``sha256`` (of the weights file), checked on load.

Every file is written atomically: to a temporary file in the same folder, fsync'ed,
then renamed over the target, so a crash never leaves a half-written file. Pickles
(``torch.load`` of user files) are never used.

The pair of files is replaced as one: the new weights go to
``<stem>.safetensors.pending`` first, then the JSON (the commit point) is replaced,
then the pending file is renamed over ``<stem>.safetensors``. A crash before the JSON
lands leaves the previous object readable; a crash after it leaves the new one
readable (:func:`load_tensors` takes the pending file when it is the one the JSON
names, and the next save completes or drops it).

In a distributed run (torchrun, :mod:`gradosr.distributed`) only rank 0 writes: the
writers here do nothing on the other processes, so every process may call the same
code. A process that must read what rank 0 wrote in the same run waits at
:func:`gradosr.distributed.barrier` first.
"""

from __future__ import annotations

import glob
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

from gradosr.distributed import is_main
from gradosr.errors import CheckpointError

FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); a no-op on the
    processes other than rank 0 of a distributed run."""
    if not is_main():
        return
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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: not every system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
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

    The weights are written first (to ``<stem>.safetensors.pending``), then the JSON
    holding their sha256, which commits the object, then the pending file is renamed
    into place: a crash at any point leaves either the previous or the new object
    readable, never a mix (see the module docstring). A no-op on the processes other than
    rank 0 of a distributed run.
    """
    if not is_main():
        return
    directory = Path(directory)
    data = st_save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
    wpath, pending = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors{PENDING}"
    _settle(directory, stem)
    atomic_write_bytes(pending, data)
    record = {"format": fmt, "format_version": FORMAT_VERSION,
              "sha256": hashlib.sha256(data).hexdigest(), **meta}
    atomic_write_json(directory / f"{stem}.json", record)  # the commit point
    os.replace(pending, wpath)
    _fsync_dir(directory)


PENDING = ".pending"


def _settle(directory: Path, stem: str) -> None:
    """Complete (when the JSON names it) or drop a pending weights file that a crashed
    :func:`save_tensors` left behind, before it is overwritten; and delete the temporary
    files of the object's writes that were killed before their rename."""
    remove_stale_temporaries(directory, stem)
    pending = directory / f"{stem}.safetensors{PENDING}"
    if not pending.is_file():
        return
    try:
        sha = json.loads((directory / f"{stem}.json").read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        sha = None
    if sha is not None and hashlib.sha256(pending.read_bytes()).hexdigest() == sha:
        os.replace(pending, directory / f"{stem}.safetensors")
        _fsync_dir(directory)
    else:
        pending.unlink()


def remove_stale_temporaries(directory: Path, stem: str) -> None:
    """Delete ``.<stem>.*.tmp`` in ``directory``: temporary files of :func:`atomic_write_bytes`
    calls for the object ``stem`` that were killed before their rename (one writer per
    folder: a live write of the same object never runs beside this)."""
    if directory.is_dir():
        for stale in directory.glob(f".{glob.escape(stem)}.*.tmp"):
            stale.unlink(missing_ok=True)


def load_tensors(directory: str | os.PathLike, stem: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load what :func:`save_tensors` stored; verify format, version and checksum.

    Raises:
        CheckpointError: a file is missing or corrupt, the checksum differs, the object
            is of another kind or of a newer format version, or a pickle was handed in.
    """
    directory = check_folder(directory)
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
    data = _read_weights(wpath)
    if hashlib.sha256(data or b"").hexdigest() != meta.get("sha256"):
        # a save that crashed after its JSON landed: the weights are still pending
        pending = _read_weights(wpath.with_name(wpath.name + PENDING))
        if pending is not None and hashlib.sha256(pending).hexdigest() == meta.get("sha256"):
            data = pending
    if data is None:
        raise CheckpointError(f"missing weights file {wpath}")
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        hint = _pickle_hint(wpath)
        raise CheckpointError(hint or f"{wpath} does not match the sha256 recorded in {stem}.json: the file is corrupt or was replaced")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(_pickle_hint(wpath) or f"{wpath} is not a valid safetensors file: {exc}") from None
    return tensors, meta


def _read_weights(path: Path) -> bytes | None:
    """The bytes of ``path``, None when it does not exist; CheckpointError when unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def check_folder(path: str | os.PathLike, what: str = "a checkpoint folder") -> Path:
    """``path`` as a Path; CheckpointError when it is a file (a pickle / torch.save file
    is refused with that reason) rather than ``what``."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(_pickle_hint(path) or f"{path} is a file; expected {what}")
    return path


def looks_pickled(path: Path) -> bool:
    """Whether the file starts like a pickle (protocol 2+ opcode) or a torch.save zip
    archive, whatever its name says (reads its first 2 bytes; nothing is unpickled)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK"


def _pickle_hint(path: Path) -> str | None:
    """A refusal message when ``path`` looks like a pickle / torch.save file."""
    if looks_pickled(path):
        return (f"{path} looks like a pickle or torch.save (.pt) file; gradosr never unpickles files "
                "(they can execute code). Convert it to safetensors (safetensors.torch.save_file) or "
                "load the model yourself and use GradientOSR.from_classifier")
    return None


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``tensors`` with every name preceded by ``prefix`` (a component's part of a file)."""
    return {prefix + k: v for k, v in tensors.items()}


def under_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named ``prefix…``, with the prefix removed (inverse of :func:`with_prefix`)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
