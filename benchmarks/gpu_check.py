"""GPU check: the gradient-engine benchmark and one resnet18 training epoch, on synthetic
data, with the machine's own python3 (``PYTHONPATH=src``, no virtualenv).

Needs only torch, numpy, scipy, scikit-learn and safetensors (no tqdm, matplotlib,
dataset or network). Run it through ``benchmarks/gpu_check.sh``. Steps:

1. ``benchmarks/gradients.py --quick --device DEV`` in a child process (its outputs go to
   a temporary folder; the committed CPU results are not touched): per model the times,
   throughputs and ratios (features vs forward+backward, vmap vs features, ...).
2. One epoch of ``resnet18`` (twice: the second run measures run-to-run differences) (3×32×32, 10 classes × 1000 synthetic images, batch 128,
   SGD momentum 0.9, lr 0.1, weight decay 5e-4, crop + flip) through
   ``gradosr.train.train_classifier``, after a short warm-up, in a child process: seconds
   and images/s.
3. The same epoch under ``python3 -m torch.distributed.run --nproc_per_node=1``:
   the DistributedDataParallel path (NCCL, SyncBatchNorm on CUDA; gloo on CPU), plus
   checks of the tensor collectives used by the sharded extraction (all-gather of
   float64/int64/bool rows, all-reduce, broadcast) on that backend.

Without a GPU everything runs on the CPU, with 10 × 20 images and the gradient benchmark
of lenet and cnn32 only (a check that the script works, in about 2 minutes on 2 cores);
``GPU_CHECK_SMALL=1`` (or ``--small``) takes 10 × 50 images on a GPU. Writes ``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``benchmarks/results/gpu_check.json`` (``--json`` to choose).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLASSES = 10


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = [s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (exc.stdout, exc.stderr)]
        out, code = f"timed out after {timeout} s\n" + "".join(text), -1
    return code, out, time.perf_counter() - t0


# ---------------------------------------------------------------- one training epoch (child)


def synthetic(n_per_class: int, seed: int = 0):
    """Float inputs N×3×32×32: a smooth class pattern plus noise, and labels N."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(CLASSES, 3, 8, 8, generator=gen)
    protos = torch.nn.functional.interpolate(protos, size=(32, 32), mode="bilinear", align_corners=False)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    x = protos[y] + 0.5 * torch.randn(len(y), 3, 32, 32, generator=gen)
    return x.contiguous(), y


def collective_checks(device) -> dict:
    """The tensor collectives of gradosr.distributed on this process group's backend."""
    import numpy as np
    import torch

    from gradosr import distributed

    rng = np.random.default_rng(0)
    f64, i64 = rng.normal(size=(37, 5)), torch.as_tensor(rng.integers(-5, 5, size=(11, 2, 3)))
    flags = rng.normal(size=19) > 0
    ok = {
        "gather_float64": bool(np.array_equal(distributed.gather_rows(f64), f64)),
        "gather_int64": bool(torch.equal(distributed.gather_rows(i64), i64)),
        "gather_bool": bool(np.array_equal(distributed.gather_rows(flags), flags)),
        "gather_tuple_empty": distributed.gather_rows((np.zeros((0, 4)), None))[0].shape == (0, 4),
        "all_reduce_sum": distributed.all_reduce_sum([1.5, 2.0]) == [1.5 * distributed.world_size(),
                                                                     2.0 * distributed.world_size()],
        "agree": distributed.agree(True) is True,
    }
    distributed.barrier()
    # wrap_ddp converts BatchNorm to SyncBatchNorm on CUDA and restore() puts it back
    from gradosr.models import build_model

    model = build_model("resnet18", CLASSES, 3).to(device)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    ddp, restore = distributed.wrap_ddp(model, device)
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    restore()
    ok["sync_batchnorm_layers"] = n_sync
    ok["batchnorm_layers"] = n_bn
    ok["batchnorm_restored"] = (sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == n_bn
                                and not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()))
    del ddp
    return ok


def train_child(args) -> None:
    """One timed resnet18 epoch (after a warm-up); prints one JSON line (rank 0)."""
    import torch

    from gradosr import distributed
    from gradosr.preprocess import Preprocessing
    from gradosr.train import TrainConfig, train_classifier

    device = distributed.init_distributed(args.device)
    try:
        x, y = synthetic(args.per_class)
        cfg = TrainConfig(model="resnet18", epochs=1, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                          weight_decay=5e-4, augment="crop-flip", seed=0)
        pre = Preprocessing.default((32, 32), 3)
        kw = dict(progress=False, device=device, log=lambda line: None)
        n_warm = min(len(y), args.warmup)
        warm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:n_warm]
        train_classifier((x[warm], y[warm]), None, list(range(CLASSES)), cfg, pre, **kw)  # CUDA init, kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        clf = train_classifier((x, y), None, list(range(CLASSES)), cfg, pre, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        rec = {"device": str(device), "images": len(y), "batch": cfg.batch_size, "seconds": seconds,
               "images_per_s": len(y) / seconds, "loss": clf.meta["history"][-1]["loss"],
               "train_acc": clf.meta["history"][-1]["train_acc"],
               "world_size": distributed.world_size(), "distributed": distributed.is_initialized(),
               "returned_model_has_sync_batchnorm": any(isinstance(m, torch.nn.SyncBatchNorm)
                                                        for m in clf.model.modules())}
        if distributed.is_initialized():
            rec["backend"] = torch.distributed.get_backend()
            rec["collectives"] = collective_checks(device)
        if device.type == "cuda":
            rec["cuda_peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if args.weights:
            from safetensors.torch import save_file

            if distributed.is_main():
                save_file({k: v.detach().cpu().contiguous() for k, v in clf.model.state_dict().items()},
                          args.weights)
        if distributed.is_main():
            print("GPU_CHECK_RESULT " + json.dumps(rec), flush=True)
    finally:
        distributed.shutdown_distributed()


def _result(output: str) -> dict | None:
    for line in output.splitlines():
        if line.startswith("GPU_CHECK_RESULT "):
            return json.loads(line[len("GPU_CHECK_RESULT "):])
    return None


def _weights_rel_diff(a: str, b: str) -> float | None:
    try:
        from safetensors.torch import load_file

        wa, wb = load_file(a), load_file(b)
    except Exception:  # noqa: BLE001 - informative only
        return None
    num = sum(float((wa[k].double() - wb[k].double()).norm() ** 2) for k in wa if wa[k].is_floating_point())
    den = sum(float(wb[k].double().norm() ** 2) for k in wb if wb[k].is_floating_point())
    return (num / den) ** 0.5 if den else None


# ---------------------------------------------------------------- the driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda when available, else cpu")
    ap.add_argument("--json", type=Path, default=None, help="output file (default $OUT/gpu_check.json or "
                                                            "benchmarks/results/gpu_check.json)")
    ap.add_argument("--small", action="store_true", help="10 × 50 images on a GPU (also GPU_CHECK_SMALL=1)")
    ap.add_argument("--train-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--per-class", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=256, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.train_child:
        train_child(args)
        return 0

    import torch

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    small = args.small or os.environ.get("GPU_CHECK_SMALL") == "1" or not device.startswith("cuda")
    on_gpu = device.startswith("cuda")
    per_class = 1000 if not small else (50 if on_gpu else 20)
    warmup = 256 if on_gpu else 32
    out_path = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                             else HERE / "results" / "gpu_check.json")
    doc: dict = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "small": small,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "steps": {},
    }
    print(f"gpu_check on {device} ({doc['device_name']}), torch {torch.__version__}, python "
          f"{doc['python']}{', small' if small else ''}", flush=True)

    # 1. the gradient-engine benchmark (quick)
    with tempfile.TemporaryDirectory() as tmp:
        # on a GPU the full mode: batches of 256 and the ImageNet-style resnet50 at 224x224
        mode = ["--full", "--batch", os.environ.get("GPU_CHECK_BATCH", "256")] if device.startswith("cuda") \
            else ["--quick"]
        cmd = [sys.executable, str(HERE / "gradients.py"), *mode, "--device", device, "--out", tmp]
        if os.environ.get("GPU_CHECK_PRECISION"):
            cmd += ["--precision", os.environ["GPU_CHECK_PRECISION"]]
        if small and not device.startswith("cuda"):
            cmd += ["--models", "lenet,cnn32"]
        code, output, secs = _run(cmd, timeout=540)
        shown = [c for c in cmd[1:] if c not in ("--out", tmp)]
        step: dict = {"command": " ".join(shown), "returncode": code, "wall_s": round(secs, 1)}
        if code == 0:
            grad = json.loads((Path(tmp) / "gradients.json").read_text())
            step["meta"] = grad["meta"]
            step["models"] = {r["model"]: {
                "batch": r["batch"],
                "ms_per_batch": {k: v * 1e3 for k, v in r["times_s"].items()},
                "samples_per_s": r["throughput_samples_per_s"],
                "ratio_features_vs_fwdbwd": r["ratio_features_vs_fwdbwd"],
                "ratio_vmap_vs_features": r["ratio_vmap_vs_features"],
                "ratio_loop_vs_features": r["ratio_loop_vs_features"],
                "ratio_head_vs_forward": r["ratio_head_vs_forward"],
                "features_vs_vmap_max_rel_diff": r["features_vs_vmap_max_rel_diff"],
                "precision": r.get("precision"), "precision_max_rel_err": r.get("precision_max_rel_err"),
                "peak_mem_mb": [r["peak_mem_mb_small"], r["peak_mem_mb_large"]],
                **({"cuda_peak_mem_mb": [r.get("cuda_peak_mem_mb_small"), r.get("cuda_peak_mem_mb_large")]}
                   if "cuda_peak_mem_mb_small" in r else {}),
            } for r in grad["records"]}
        else:
            step["error"] = output[-3000:]
        doc["steps"]["gradients"] = step
        print(f"  gradients benchmark: {'ok' if code == 0 else 'FAILED'} ({secs:.0f} s)", flush=True)

        # 2. one resnet18 epoch, one process; 3. the same under torchrun (DDP)
        child = [str(HERE / "gpu_check.py"), "--train-child", "--device", device, "--per-class", str(per_class),
                 "--warmup", str(warmup)]
        w_one, w_ddp = str(Path(tmp) / "one.safetensors"), str(Path(tmp) / "ddp.safetensors")
        w_rep = str(Path(tmp) / "repeat.safetensors")
        runs = {
            "train_epoch": [sys.executable, *child, "--weights", w_one],
            "train_epoch_repeat": [sys.executable, *child, "--weights", w_rep],
            "train_epoch_ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                *child, "--weights", w_ddp],
        }
        for name, cmd in runs.items():
            code, output, secs = _run(cmd, timeout=300)
            rec = _result(output)
            step = {"command": " ".join(c for c in cmd[1:] if not c.startswith(tmp) and c != "--weights"),
                    "returncode": code,
                    "wall_s": round(secs, 1)}
            if code == 0 and rec is not None:
                step.update(rec)
            else:
                step["error"] = output[-3000:]
            doc["steps"][name] = step
            msg = (f"{rec['seconds']:.2f} s, {rec['images_per_s']:.0f} images/s" if rec else "FAILED")
            print(f"  {name}: {msg} (wall {secs:.0f} s)", flush=True)
        # relative L2 distance of the trained weights: DDP vs one process, and one process vs
        # itself (run-to-run nondeterminism of the GPU kernels, amplified by training)
        doc["ddp_vs_single_weights_rel_diff"] = _weights_rel_diff(w_ddp, w_one)
        doc["single_repeat_weights_rel_diff"] = _weights_rel_diff(w_rep, w_one)

    doc["ok"] = all(s.get("returncode") == 0 and "error" not in s for s in doc["steps"].values())
    coll = doc["steps"].get("train_epoch_ddp", {}).get("collectives", {})
    doc["ok"] = doc["ok"] and all(v for k, v in coll.items() if not k.endswith("layers"))
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'ok' if doc['ok'] else 'FAILED'} in {doc['wall_s']:.0f} s; wrote {out_path}", flush=True)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
