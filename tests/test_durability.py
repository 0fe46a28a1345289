"""Durability (issue 8): a training run killed at any point resumes to exactly the
weights of an uninterrupted run, and every writer goes through the atomic writes.

- ``test_crash_at_every_rename_*``: a simulated crash before each rename that
  checkpointing performs (the only moments the files on disk change), then a resume;
- ``test_sigkill_train_then_resume`` (slow): ``gradosr train`` in a subprocess, killed
  with SIGKILL after an epoch's checkpoint (and again at a random moment of the resumed
  run), then ``--resume``; compared tensor by tensor with an uninterrupted run.

The benchmark's resume after an interruption is tested in test_bench.py
(test_interrupted_benchmark_resumes).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gradosr.checkpoint as ckpt
from gradosr.checkpoint import load_tensors, save_tensors
from gradosr.classifier import Classifier
from gradosr.train import TrainConfig, train_classifier
from tiny_runs import FlatNet

SRC = Path(__file__).resolve().parents[1] / "src" / "gradosr"


class Crash(BaseException):
    """A simulated power cut (BaseException: nothing in gradosr may swallow it)."""


def crash_before_rename(monkeypatch, n: int) -> list[int]:
    """Make the n-th os.replace made by gradosr.checkpoint raise Crash instead of renaming.
    Returns a list that receives the number of renames done."""
    real = os.replace
    done = [0]

    def replace(src, dst):
        if done[0] + 1 == n:
            raise Crash(f"before rename {n}: {dst}")
        real(src, dst)
        done[0] += 1

    monkeypatch.setattr(ckpt.os, "replace", replace)
    return done


# ------------------------------------------------------------ simulated crashes

X = torch.as_tensor(np.random.default_rng(0).normal(size=(48, 1, 8, 8)).astype(np.float32))
Y = np.repeat(np.arange(4), 12)
CONFIG = TrainConfig(model="custom", epochs=3, batch_size=16, seed=0)


def train_flat(out_dir: Path | None, resume: bool = False) -> Classifier:
    torch.manual_seed(0)
    return train_classifier((X, Y), None, [0, 1, 2, 3], CONFIG, None, out_dir=out_dir, resume=resume,
                            progress=False, log=lambda line: None, model=FlatNet())


def test_crash_at_every_rename_then_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    reference = train_flat(None).model.state_dict()
    count_dir = tmp_path / "count"
    done = crash_before_rename(monkeypatch, 0)
    train_flat(count_dir)
    renames = done[0]
    assert renames == 6 * CONFIG.epochs  # per epoch: optimizer state and weights, 3 renames each
    monkeypatch.undo()
    for n in range(1, renames + 1):
        out = tmp_path / f"crash{n}"
        crash_before_rename(monkeypatch, n)
        with pytest.raises(Crash):
            train_flat(out)
        monkeypatch.undo()
        if (out / "model.json").is_file():  # whatever was committed loads, and is a finished epoch
            stored = Classifier.load(out, model=FlatNet())
            assert 1 <= stored.meta["epoch"] <= CONFIG.epochs
        resumed = train_flat(out, resume=True)
        state = resumed.model.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference), f"crash before rename {n}"
        assert [h["epoch"] for h in resumed.meta["history"]] == [1, 2, 3]
        final = Classifier.load(out, model=FlatNet()).model.state_dict()
        assert all(torch.equal(final[k], reference[k]) for k in reference)
        # a crash in the last epoch's save may leave a *.pending file (read as the committed
        # weights; the next save settles it) or the previous epoch's optimizer state
        names = {p.name for p in out.iterdir()}
        assert {"model.json", "model.safetensors", "train_state.1.json", "train_state.1.safetensors"} <= names
        assert names <= {"model.json", "model.safetensors", "model.safetensors.pending", "train_state.0.json",
                         "train_state.0.safetensors", "train_state.1.json", "train_state.1.safetensors",
                         "train_state.1.safetensors.pending"}, n


def test_crash_at_every_rename_of_a_save_keeps_one_whole_object(tmp_path, monkeypatch):
    """save_tensors replaces a (weights, JSON) pair as one: after a crash at any rename,
    the folder loads as the old object or as the new one, never as a mix or an error."""
    old, new = {"w": torch.zeros(4)}, {"w": torch.ones(4)}
    for n in (1, 2, 3):
        folder = tmp_path / f"c{n}"
        save_tensors(folder, "model", old, {"v": "old"}, "fmt")
        crash_before_rename(monkeypatch, n)
        with pytest.raises(Crash):
            save_tensors(folder, "model", new, {"v": "new"}, "fmt")
        monkeypatch.undo()
        tensors, meta = load_tensors(folder, "model", "fmt")
        expected = old if n <= 2 else new  # rename 2 writes the JSON, the commit point
        assert meta["v"] == ("old" if n <= 2 else "new") and torch.equal(tensors["w"], expected["w"])
        # the next save completes or drops what the crash left, and leaves the two files only
        save_tensors(folder, "model", {"w": torch.full((4,), 2.0)}, {"v": "next"}, "fmt")
        assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
        assert load_tensors(folder, "model", "fmt")[1]["v"] == "next"


def test_a_new_save_after_a_crash_after_the_commit_keeps_the_committed_object(tmp_path, monkeypatch):
    """Crash after the JSON lands (weights still pending), then another save that crashes
    before its own commit: the first crash's object must still load."""
    save_tensors(tmp_path, "m", {"w": torch.zeros(2)}, {"v": 1}, "fmt")
    crash_before_rename(monkeypatch, 3)
    with pytest.raises(Crash):
        save_tensors(tmp_path, "m", {"w": torch.ones(2)}, {"v": 2}, "fmt")
    monkeypatch.undo()
    crash_before_rename(monkeypatch, 3)  # rename 1 completes v2, rename 2 stages v3, crash before v3's JSON
    with pytest.raises(Crash):
        save_tensors(tmp_path, "m", {"w": torch.full((2,), 3.0)}, {"v": 3}, "fmt")
    monkeypatch.undo()
    tensors, meta = load_tensors(tmp_path, "m", "fmt")
    assert meta["v"] == 2 and torch.equal(tensors["w"], torch.ones(2))


# ------------------------------------------------------------ every writer is atomic


WRITE_CALLS = re.compile(r"""open\([^)]*['"][wax]b?\+?['"]|\.write_text\(|\.write_bytes\(|np\.save[z]?\(|"""
                         r"""torch\.save\(|\.savefig\(|\.to_csv\(|json\.dump\(|pickle\.dump|os\.fdopen\(""")


def test_every_writer_goes_through_the_atomic_writes():
    """Outside gradosr/checkpoint.py, no module writes a file itself; and torch.load (a
    pickle) is never called."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "torch.load(" in text:
            offenders.append(f"{path.relative_to(SRC)}: torch.load")
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if WRITE_CALLS.search(code) and path.name != "checkpoint.py":
                if ".savefig(buf" in code or "np.save(f\"{out}" in code:  # to memory; the SVHN reader's child
                    continue
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert offenders == []


# ------------------------------------------------------------------- SIGKILL (slow)


def gradosr(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradosr", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_args(out: Path, epochs: int, *extra: str) -> list[str]:
    return gradosr("train", "--protocol", "custom", "--dataset", "mnist-sample", "--known", "0,1,2",
                   "--unknown", "3,4", "--epochs", str(epochs), "--out", str(out), "--no-progress",
                   "--device", "cpu", *extra)


def stored_epoch(out: Path) -> int:
    try:
        return int(json.loads((out / "classifier" / "model.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def run_and_kill(args: list[str], out: Path, at_epoch: int, delay: float = 0.0, timeout: float = 180) -> bool:
    """Start ``args``; SIGKILL it ``delay`` seconds after the checkpoint of ``at_epoch``
    lands. Returns True when it was killed, False when it finished first."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if stored_epoch(out) >= at_epoch:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return proc.returncode == -signal.SIGKILL
            if time.monotonic() > deadline:
                raise AssertionError(f"{args} did not reach epoch {at_epoch} in {timeout}s")
            time.sleep(0.005)
        assert proc.returncode == 0, proc.stderr.read().decode()
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "classifier" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_train_then_resume(tmp_path):
    for epochs in (6, 12, 24):  # more epochs if a run finishes before it can be killed
        interrupted = tmp_path / f"killed-{epochs}"
        if not run_and_kill(train_args(interrupted, epochs), interrupted, at_epoch=1):
            continue
        meta = json.loads((interrupted / "classifier" / "model.json").read_text())
        assert 1 <= meta["epoch"] < epochs and meta["complete"] is False
        # a second kill, at a random moment of the resumed run (maybe in the middle of a save)
        run_and_kill(train_args(interrupted, epochs, "--resume"), interrupted, at_epoch=meta["epoch"] + 1,
                     delay=random.Random(epochs).uniform(0.0, 0.4))
        done = subprocess.run(train_args(interrupted, epochs, "--resume"), env=ENV, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        break
    else:
        pytest.fail("every training run finished before it could be killed")

    reference = tmp_path / "reference"
    full = subprocess.run(train_args(reference, epochs), env=ENV, capture_output=True, text=True, timeout=180)
    assert full.returncode == 0, full.stderr
    a, b = weights(interrupted), weights(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    meta_a = json.loads((interrupted / "classifier" / "model.json").read_text())
    meta_b = json.loads((reference / "classifier" / "model.json").read_text())
    assert meta_a["complete"] is meta_b["complete"] is True
    assert meta_a["test_acc"] == meta_b["test_acc"] and meta_a["epoch"] == epochs
    assert [h["epoch"] for h in meta_a["history"]] == list(range(1, epochs + 1))
    assert [p.name for p in (interrupted / "classifier").iterdir() if p.name.endswith(".tmp")] == []
