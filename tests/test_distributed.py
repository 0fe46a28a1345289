"""Tests for gradosr.distributed: sharded extraction and scoring, DistributedDataParallel
training and rank-0 writes, each in 2 CPU processes (gloo) compared with the same
computation in this single process (float64, to 1e-10 relative; map_rows exactly).

One spawn of 2 workers (module fixture) runs :func:`compute_all` under a process group
set up from torchrun's environment variables; this process runs the same function
undistributed as the reference. The torchrun launcher itself is exercised by
``python -m torch.distributed.run`` runs of the CLI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradosr import distributed
from gradosr.distributed import map_rows, shard_bounds
from gradosr.errors import GradOSRError

pytestmark = pytest.mark.skipif(not (distributed.available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
REL = 1e-10
K = 6
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the computation


class FlatNet64(nn.Module):
    """Flatten -> Linear(64, 16) -> ReLU -> Linear(16, k) on 1×8×8 inputs, float64."""

    def __init__(self, k: int = K):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, k)
        self.double()

    def forward(self, x):
        return self.head(self.body(x))


def make_data(n_per_class: int, seed: int, num_classes: int = K):
    """Separable float64 inputs N×1×8×8: fixed class prototypes plus Gaussian noise."""
    protos = np.random.default_rng(123).normal(0.0, 1.0, (10, 1, 8, 8)) * 2.0
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    return protos[y] + rng.normal(0.0, 0.5, (len(y), 1, 8, 8)), y


def trained_model() -> FlatNet64:
    """Plain torch training (no gradosr calls): identical in every process."""
    torch.manual_seed(0)
    model = FlatNet64()
    x, y = make_data(30, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def map_rows_cases() -> dict[str, np.ndarray]:
    """map_rows on uneven, aligned, empty and nested shards, several dtypes."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 3))                                        # float64, 7 rows: 3 + 4
    b = torch.as_tensor(rng.integers(-9, 9, size=(5, 2, 2)))           # int64, 3 dims
    out = {
        "f64": map_rows(lambda r: r * 2.0 + 1.0, a),
        "i64": map_rows(lambda r: r * 3, b).numpy(),
        "one_row": map_rows(lambda r: r + 1.0, a[:1]),                 # one shard is empty
        "no_rows": map_rows(lambda r: r + 1.0, a[:0]),
        "aligned": map_rows(lambda r: r - 1.0, a[:5], align=4),        # blocks of 4: rows 0-3 | 4
        "one_block": map_rows(lambda r: r - 1.0, a[:3], align=4),      # one block: the other shard is empty
        "bool": map_rows(lambda r: r > 0, a),
        "nested": map_rows(lambda r: map_rows(lambda q: q * 5.0, r), a),
        # an empty shard whose result has the wrong trailing shape (0×0) is reshaped
        "empty_shape": map_rows(lambda s: a[s] if s.stop > s.start else np.zeros((0, 0)), 1),
        "who": map_rows(lambda s: np.full(s.stop - s.start, distributed.rank(), dtype=np.int64), 7),
        "who_aligned": map_rows(lambda s: np.full(s.stop - s.start, distributed.rank(), dtype=np.int64), 9,
                                align=4),
    }
    t, none, names = map_rows(lambda r: (torch.as_tensor(r).float(), None, ["x", "y"]), a)
    assert none is None and names == ["x", "y"]
    out["tuple"] = t.numpy()

    def fail_on_last(rows):
        if distributed.rank() == distributed.world_size() - 1:
            raise ValueError("boom")
        return rows

    try:
        map_rows(fail_on_last, a)
        out["error"] = np.array([0])
    except ValueError:
        out["error"] = np.array([1])    # the failing process: its own error
    except GradOSRError:
        out["error"] = np.array([2])    # the others: told that another process failed
    return out


def extraction_cases(model: nn.Module) -> dict[str, np.ndarray]:
    from gradosr.representation import RepresentationConfig, extract

    x, _ = make_data(9, seed=2, num_classes=10)  # 90 rows
    xt = torch.as_tensor(x)
    out = {}
    for bs in (16, 7, 1000):  # 6 | 7 uneven blocks, and one block (an empty shard)
        feats, names = extract(model, xt, RepresentationConfig(), batch_size=bs)
        assert names == [n for n, _ in model.named_parameters()]
        out[f"extract_bs{bs}"] = feats.numpy()
    out["extract_empty"] = extract(model, xt[:0], RepresentationConfig(), batch_size=16)[0].numpy()
    return out


def scorer_cases(model: nn.Module) -> dict[str, np.ndarray]:
    """Every baseline through evaluate.sharded_scores, in float64."""
    from gradosr.classifier import batched_outputs
    from gradosr.detectors import ScorerInputs, make_scorer, method_ids
    from gradosr.detectors.gradunc import GradUnc
    from gradosr.detectors.knn import KNN
    from gradosr.detectors.odin import ODIN
    from gradosr.evaluation.scoring import sharded_scores

    def outputs(x):
        x = torch.as_tensor(x)
        logits, feats = batched_outputs(model, x, batch_size=32, features=True)
        assert logits.dtype == torch.float64
        return ScorerInputs(logits, feats, x, model, model.head.weight.detach(), model.head.bias.detach())

    x_train, y_train = make_data(30, seed=0)
    x_test, _ = make_data(7, seed=3, num_classes=10)  # 70 rows, unknowns included
    train_out, test_out = outputs(x_train), outputs(x_test)
    out = {"logits": test_out.logits.numpy(), "features": test_out.features.numpy()}
    scorers = {m: make_scorer(m) for m in method_ids("baseline")}
    scorers.update({"knn": KNN(k=5), "odin_bs8": ODIN(batch_size=8), "gradunc_bs8": GradUnc(batch_size=8)})
    for name, scorer in scorers.items():
        if scorer.needs_fit:
            scorer.fit(train_out, y_train)
        out[f"score_{name}"] = sharded_scores(scorer, test_out)
    return out


def osr_cases(model: nn.Module, run_dir: Path) -> dict[str, np.ndarray]:
    """GradientOSR fitted on arrays: its proxy is trained (DDP when distributed), its
    detector fitted on gathered features, saved by rank 0 only."""
    from gradosr.osr import GradientOSR
    from gradosr.train import TrainConfig

    x, y = make_data(30, seed=0)
    xv, yv = make_data(8, seed=1)
    osr = GradientOSR.from_classifier(model, preset="paper", train_config=TrainConfig(model="custom", epochs=2, batch_size=32),
                                      max_epochs=15, threshold_rule="tpr")
    osr.fit(torch.as_tensor(x), y, torch.as_tensor(xv), yv, run_dir=run_dir)
    x_test, _ = make_data(5, seed=2, num_classes=10)
    return {"osr_scores": osr.score_samples(torch.as_tensor(x_test)),
            "osr_threshold": np.array([osr.threshold_]),
            "osr_proxy": torch.cat([p.detach().flatten() for p in osr.method_.members_[0].proxy.model.parameters()]).numpy()}


def score_split_cases() -> dict[str, np.ndarray]:
    """evaluate.score_split end to end: uint8 images through a classifier's preprocessing,
    the paper preset (proxy trained with DDP when distributed) and baselines."""
    from gradosr.classifier import Classifier
    from gradosr.data.imageset import ImageSet
    from gradosr.data.protocols import OSRData, ProtocolSpec
    from gradosr.evaluation.scoring import score_split
    from gradosr.osr import GradientOSR
    from gradosr.preprocess import Preprocessing
    from gradosr.train import TrainConfig
    from tiny_runs import quadrant_images

    k = 4
    train, val, test = quadrant_images(24, seed=0), quadrant_images(6, seed=1), quadrant_images(9, seed=2)
    noise = np.random.default_rng(4).integers(0, 255, size=(23, 28, 28, 1)).astype(np.uint8)
    spec = ProtocolSpec("custom", "mnist-sample", (0, 1, 2, 3), (9,), "mnist-sample")
    data = OSRData(spec, train, val, test, ImageSet(noise, np.full(23, 9)), ("0", "1", "2", "3"))
    pre = Preprocessing.default((8, 8), 1)
    torch.manual_seed(1)
    model = FlatNet64(k)
    xt, yt = pre(train.images).double(), torch.as_tensor(train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    clf = Classifier(model.eval(), "custom", pre, list(range(k)), meta={"complete": True})
    osr = GradientOSR("paper", classifier=clf, train_config=TrainConfig(model="custom", epochs=1, batch_size=16),
                      max_epochs=5, threshold_rule="tpr", extraction__batch_size=16)  # shards of 16 rows
    osr.fit(train.images, train.labels, val.images, val.labels)
    methods = ["paper", "msp", "energy", "knn", "mahalanobis", "openmax", "gradnorm", "odin", "gradunc"]
    y_true, closed, scores = score_split(clf, data, methods, osr)
    out = {"split.y_true": y_true, "split.closed": closed}
    for m, s in scores.items():
        out[f"split.{m}.test"], out[f"split.{m}.val"] = s.test, s.val
    return out


def training_cases(out_dir: Path) -> dict[str, np.ndarray]:
    """train_classifier of a BatchNorm-free float64 model; the global batch of 32 leaves an
    uneven last batch (180 = 5·32 + 20) and, with 161 images, a last batch of one image
    (one process has no row of it)."""
    from gradosr.train import TrainConfig, train_classifier

    out = {}
    for n_per_class, augment, optimizer in ((30, "crop-flip", "sgd"), (None, "none", "adam")):
        x, y = make_data(30, seed=0)
        if n_per_class is None:
            x, y = x[:161], y[:161]
        xv, yv = make_data(4, seed=1)
        torch.manual_seed(0)
        cfg = TrainConfig(model="custom", epochs=2, batch_size=32, optimizer=optimizer,
                          lr=0.05 if optimizer == "sgd" else 1e-2, augment=augment, seed=3)
        clf = train_classifier((torch.as_tensor(x), y), (torch.as_tensor(xv), yv), list(range(K)), cfg, None,
                               model=FlatNet64(), progress=False, log=lambda line: None,
                               out_dir=out_dir / f"{len(y)}")
        tag = f"train{len(y)}"
        for name, t in clf.model.state_dict().items():
            out[f"{tag}.{name}"] = t.numpy()
        out[f"{tag}.history"] = np.array([[h["loss"], h["train_acc"], h["val_acc"]] for h in clf.meta["history"]])
    return out


def compute_all(folder: Path) -> dict[str, np.ndarray]:
    """Everything compared between 2 processes and 1; writes go under ``folder``."""
    model = trained_model()
    out = map_rows_cases()
    out.update(extraction_cases(model))
    out.update(scorer_cases(model))
    out.update(score_split_cases())
    out.update(training_cases(folder / "train"))
    out.update(osr_cases(model, folder / f"run{distributed.rank()}"))
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    device = distributed.init_distributed("cpu")
    try:
        assert device == torch.device("cpu") and distributed.world_size() == world and distributed.rank() == rank
        out = compute_all(Path(folder) / "dist")
        np.savez(Path(folder) / f"rank{rank}.npz", **out)
        distributed.shutdown_distributed()
    finally:
        distributed.shutdown_distributed(wait=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(2-process results of rank 0, of rank 1, single-process results, the folder)."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(WORLD, free_port(), str(folder)), nprocs=WORLD, join=False,
                             start_method="spawn")
    single = compute_all(folder / "single")  # the reference, while the workers run
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the distributed workers did not finish in 240 s")
    ranks = [dict(np.load(folder / f"rank{r}.npz")) for r in range(WORLD)]
    assert distributed.world_size() == 1  # this process never joined a group
    return ranks[0], ranks[1], single, folder


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def test_every_process_ends_with_the_same_full_results(results):
    r0, r1, single, _ = results
    assert set(r0) == set(r1) == set(single)
    for key in r0:
        if key != "error":  # each process reports its own kind of failure
            np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)


def test_map_rows_equals_the_unsharded_result_exactly(results):
    r0, _, single, _ = results
    for key in ("f64", "i64", "one_row", "no_rows", "aligned", "one_block", "bool", "nested", "empty_shape",
                "tuple"):
        assert r0[key].dtype == single[key].dtype and r0[key].shape == single[key].shape, key
        np.testing.assert_array_equal(r0[key], single[key], err_msg=key)
    assert single["no_rows"].shape == (0, 3) and single["empty_shape"].shape == (1, 3)


def test_map_rows_really_shards_contiguously(results):
    r0, r1, single, _ = results
    want = np.concatenate([np.full(hi - lo, r) for r in range(WORLD)
                           for lo, hi in [shard_bounds(7, 1, r, WORLD)]])
    np.testing.assert_array_equal(r0["who"], want)
    assert list(want) == [0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(r0["who_aligned"], [0] * 4 + [1] * 5)  # blocks of 4: 0-3 | 4-7, 8
    np.testing.assert_array_equal(single["who"], np.zeros(7))


def test_map_rows_raises_on_every_process_when_one_fails(results):
    r0, r1, single, _ = results
    assert int(r1["error"][0]) == 1  # the failing process: its own ValueError
    assert int(r0["error"][0]) == 2  # the other one: a GradOSRError instead of waiting forever
    assert int(single["error"][0]) == 1  # one process is the last rank: its own ValueError


def test_extract_in_two_processes_equals_one_process(results):
    r0, _, single, _ = results
    for key in ("extract_bs16", "extract_bs7", "extract_bs1000", "extract_empty"):
        assert rel_err(r0[key], single[key]) <= REL, key
    # shards cut at batch boundaries: each batch holds the same rows, the same bits
    np.testing.assert_array_equal(r0["extract_bs16"], single["extract_bs16"])
    assert single["extract_bs16"].shape == (90, 4)


def test_baseline_scores_in_two_processes_equal_one_process(results):
    r0, _, single, _ = results
    keys = [k for k in single if k.startswith("score_")]
    assert {"score_msp", "score_knn", "score_mahalanobis", "score_gradnorm", "score_odin", "score_gradunc",
            "score_openmax", "score_odin_bs8", "score_gradunc_bs8"} <= set(keys)
    for key in keys + ["logits", "features"]:
        assert rel_err(r0[key], single[key]) <= REL, (key, rel_err(r0[key], single[key]))
        assert r0[key].shape == single[key].shape and len(r0[key]) == 70


def test_score_split_in_two_processes_equals_one_process(results):
    r0, _, single, _ = results
    keys = [k for k in single if k.startswith("split.")]
    assert len(keys) == 2 + 2 * 9
    np.testing.assert_array_equal(r0["split.y_true"], single["split.y_true"])
    np.testing.assert_array_equal(r0["split.closed"], single["split.closed"])
    assert len(single["split.paper.test"]) == 36 + 23 and len(single["split.msp.val"]) == 24
    for key in keys:
        assert rel_err(r0[key], single[key]) <= REL, (key, rel_err(r0[key], single[key]))


def test_gradient_osr_fitted_in_two_processes_equals_one_process(results):
    r0, _, single, folder = results
    assert rel_err(r0["osr_proxy"], single["osr_proxy"]) <= REL
    assert rel_err(r0["osr_scores"], single["osr_scores"]) <= REL
    assert rel_err(r0["osr_threshold"], single["osr_threshold"]) <= REL
    # only rank 0 wrote its run folder; rank 1 (given another folder) wrote nothing
    assert (folder / "dist" / "run0" / "osr.json").is_file()
    assert not (folder / "dist" / "run1").exists()


def test_ddp_training_equals_single_process_training(results):
    r0, _, single, folder = results
    for n in (180, 161):
        keys = [k for k in single if k.startswith(f"train{n}.")]
        assert len(keys) == 5
        for key in keys:
            assert rel_err(r0[key], single[key]) <= REL, (key, rel_err(r0[key], single[key]))
    # rank 0's checkpoint holds the returned weights
    from gradosr.classifier import Classifier

    clf = Classifier.load(folder / "dist" / "train" / "180", model=FlatNet64())
    for name, t in clf.model.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), r0[f"train180.{name}"])
    assert clf.meta["complete"] and clf.meta["epoch"] == 2


# ------------------------------------------------------------------ torchrun + CLI


def torchrun(*args: str, nproc: int = WORLD, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "gradosr", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_torchrun_datasets_prints_once():
    proc = torchrun("datasets", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("data root:") == 1
    assert "device: cpu (--device cpu), 2 processes (torchrun)" in proc.stdout


@pytest.mark.slow
def test_torchrun_train_is_close_to_one_process(tmp_path):
    """lenet (BatchNorm: per-process batch statistics on CPU) trained on mnist-sample in 2
    processes vs 1: the same test accuracy within 0.02, weights within a loose bound."""
    from gradosr.classifier import Classifier
    from gradosr.cli import main

    args = ["train", "--protocol", "mnist-sample", "--split", "0", "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    proc = torchrun(*args, "--out", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("closed-set test accuracy") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a = Classifier.load(tmp_path / "ddp" / "classifier")
    b = Classifier.load(tmp_path / "one" / "classifier")
    assert abs(a.meta["test_acc"] - b.meta["test_acc"]) <= 0.02
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    num = sum(float((sa[k].double() - sb[k].double()).norm() ** 2) for k in sa if sa[k].is_floating_point())
    den = sum(float(sb[k].double().norm() ** 2) for k in sb if sb[k].is_floating_point())
    assert (num / den) ** 0.5 < 0.05
    assert json.loads((tmp_path / "ddp" / "classifier" / "model.json").read_text())["complete"]
