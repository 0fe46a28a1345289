"""Tests for gradosr.checkpoint: safe, atomic, verified storage; pickles are refused unread."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle

import pytest
import torch

import gradosr.checkpoint as ckpt
from gradosr.checkpoint import (
    FORMAT_VERSION,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
)
from gradosr.errors import CheckpointError


class Trap:
    """Unpickling this object creates ``marker`` (no os.system needed)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
        "idx": torch.arange(5, dtype=torch.int64),
        "half": torch.randn(2, 2, generator=g).to(torch.float16),
        "flag": torch.tensor([True, False]),
        "t": torch.randn(6, 2, generator=g).t(),  # non-contiguous
    }


META = {"arch": "lenet", "num_classes": 6, "nested": {"a": [1, 2.5, None], "s": "é"}}


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_roundtrip(tmp_path):
    tensors = sample_tensors()
    save_tensors(tmp_path / "c", "model", tensors, META, "classifier")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["model.json", "model.safetensors"]
    got, meta = load_tensors(tmp_path / "c", "model", "classifier")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k], v), k
    assert meta["format"] == "classifier" and meta["format_version"] == FORMAT_VERSION
    for k, v in META.items():
        assert meta[k] == v
    data = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((tmp_path / "c" / "model.json").read_text()) == meta


def test_roundtrip_requires_grad_tensor_and_overwrite(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    save_tensors(tmp_path, "m", {"p": p}, {}, "x")
    save_tensors(tmp_path, "m", {"p": p * 2}, {"v": 2}, "x")  # overwrite in place
    got, meta = load_tensors(tmp_path, "m", "x")
    assert torch.equal(got["p"], torch.full((3,), 2.0)) and meta["v"] == 2
    assert leftovers(tmp_path) == []


def test_sha_mismatch(tmp_path):
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    wpath = tmp_path / "model.safetensors"
    data = bytearray(wpath.read_bytes())
    data[-1] ^= 0x01  # flip a bit in the tensor data
    wpath.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_tensors(tmp_path, "model", "classifier")
    assert "model.safetensors" in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_tensors(tmp_path / "nowhere", "model", "classifier")
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights"):
        load_tensors(tmp_path, "model", "classifier")


def edit_json(path: pathlib.Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_newer_format_version(tmp_path, version):
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    edit_json(tmp_path / "model.json", format_version=version)
    with pytest.raises(CheckpointError, match="newer gradosr") as info:
        load_tensors(tmp_path, "model", "classifier")
    assert str(version) in str(info.value)


@pytest.mark.parametrize("version", [None, "1", 1.5])
def test_bad_format_version(tmp_path, version):
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    edit_json(tmp_path / "model.json", format_version=version)
    with pytest.raises(CheckpointError):
        load_tensors(tmp_path, "model", "classifier")


def test_wrong_format(tmp_path):
    save_tensors(tmp_path, "model", sample_tensors(), META, "detector")
    with pytest.raises(CheckpointError, match="'detector'") as info:
        load_tensors(tmp_path, "model", "classifier")
    assert "'classifier'" in str(info.value)
    edit_json(tmp_path / "model.json", format=None)
    with pytest.raises(CheckpointError):
        load_tensors(tmp_path, "model", "detector")


def test_torch_save_file_as_directory(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pt"
    torch.save({"state": {"w": torch.ones(2)}, "trap": Trap(marker)}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_tensors(path, "model", "classifier")
    assert "safetensors" in str(info.value)
    assert not marker.exists()


def test_plain_pickle_as_directory(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"trap": Trap(marker)}, protocol=4))
    # the test's own trap works: unpickling it would create the marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Trap(probe)))
    assert probe.exists()
    with pytest.raises(CheckpointError, match="pickle"):
        load_tensors(path, "model", "classifier")
    assert not marker.exists()


def test_other_file_as_directory(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="is a file"):
        load_tensors(path, "model", "classifier")


@pytest.mark.parametrize("matching_sha", [True, False])
def test_torch_save_in_place_of_weights(tmp_path, matching_sha):
    marker = tmp_path / "unpickled"
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    wpath = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2), "trap": Trap(marker)}, wpath)
    if matching_sha:
        edit_json(tmp_path / "model.json", sha256=hashlib.sha256(wpath.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError) as info:
        load_tensors(tmp_path, "model", "classifier")
    msg = str(info.value)
    assert "model.safetensors" in msg
    if not matching_sha:
        assert "pickle" in msg
    assert not marker.exists()


def test_raw_pickle_in_place_of_weights_with_matching_sha(tmp_path):
    marker = tmp_path / "unpickled"
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    wpath = tmp_path / "model.safetensors"
    wpath.write_bytes(pickle.dumps(Trap(marker)))
    edit_json(tmp_path / "model.json", sha256=hashlib.sha256(wpath.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_tensors(tmp_path, "model", "classifier")
    assert not marker.exists()


def test_garbage_weights_with_matching_sha(tmp_path):
    save_tensors(tmp_path, "model", sample_tensors(), META, "classifier")
    wpath = tmp_path / "model.safetensors"
    wpath.write_bytes(wpath.read_bytes()[:40])  # truncated safetensors
    edit_json(tmp_path / "model.json", sha256=hashlib.sha256(wpath.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_tensors(tmp_path, "model", "classifier")


# --- atomic writes --------------------------------------------------------------------


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "sub" / "dir" / "f.bin"
    atomic_write_bytes(target, b"\x00\x01abc")
    assert target.read_bytes() == b"\x00\x01abc"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode("utf-8")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2], "b": "é"})
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"a": [1, 2], "b": "é"}
    assert leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_bytes(b"old content")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content that never lands")
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_write_failure_while_writing(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(ckpt.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(target, b"x" * 100_000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_save_tensors_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_tensors(tmp_path, "model", {"w": torch.ones(3)}, {"v": 1}, "classifier")
    real_replace = os.replace

    def replace_once_then_fail(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("crash before the JSON lands")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace_once_then_fail)
    with pytest.raises(OSError):
        save_tensors(tmp_path, "model", {"w": torch.zeros(3)}, {"v": 2}, "classifier")
    monkeypatch.undo()
    # the new weights wait in model.safetensors.pending: the previous object is intact
    got, meta = load_tensors(tmp_path, "model", "classifier")
    assert torch.equal(got["w"], torch.ones(3)) and meta["v"] == 1
    assert leftovers(tmp_path) == []
    # the next save drops the stale pending file
    save_tensors(tmp_path, "model", {"w": torch.full((3,), 5.0)}, {"v": 3}, "classifier")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert torch.equal(load_tensors(tmp_path, "model", "classifier")[0]["w"], torch.full((3,), 5.0))


# --- read_json ------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", b'{"a": 1'])
def test_read_json_invalid(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_json(path)
    assert str(path) in str(info.value)


def test_read_json_not_object_and_missing(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="object"):
        read_json(path)
    with pytest.raises(CheckpointError, match="missing"):
        read_json(tmp_path / "absent.json")
    path.write_text('{"a": [1, {"b": null}]}')
    assert read_json(path) == {"a": [1, {"b": None}]}


def test_a_save_removes_the_temporary_files_of_killed_writes_of_that_object(tmp_path):
    """A write killed between its temp file and its rename leaves ``.<name>.<rand>.tmp``;
    the next save of the same object deletes them, and leaves other objects' alone."""
    killed = [tmp_path / ".m.safetensors.pending.ab12.tmp", tmp_path / ".m.json.cd34.tmp"]
    other = tmp_path / ".mm.json.ef56.tmp"
    for path in [*killed, other]:
        path.write_bytes(b"half")
    save_tensors(tmp_path, "m", {"w": torch.ones(2)}, {"v": 1}, "fmt")
    assert not any(p.exists() for p in killed) and other.exists()
    assert torch.equal(load_tensors(tmp_path, "m", "fmt")[0]["w"], torch.ones(2))
