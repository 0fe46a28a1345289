"""Benchmark of the per-sample gradient engine (``gradosr.gradients``), one run per machine.

For ``lenet`` (1x28x28), ``cnn32`` and ``resnet18`` (3x32x32), 6 classes, float32, eval
mode, confounding target, all parameters selected, it measures per batch:

- ``forward``: a plain batched forward under ``torch.no_grad()``;
- ``fwd_bwd``: a training-style step: forward, summed loss, ``backward()`` filling ``.grad``
  (in eval mode, so BatchNorm is the same affine map as in the feature extraction);
- ``features``: ``squared_norms(method="fast")`` (one batched forward + backward per
  chunk of ``engine.FAST_CHUNK`` samples, hooks);
- ``head``: the closed form for the head's weight and bias only (``method="head"``);
- ``vmap``: ``torch.func`` ``vmap(grad)`` returning the full per-sample gradients of all
  parameters (then reduced to squared norms), in chunks of at most 32 samples and 2**26
  gradient entries, as the ``"func"`` path does;
- ``loop``: a naive loop, one forward + ``autograd.grad`` per sample, timed on a subset
  and scaled to the batch;
- ``fwd_bwd_chunked`` and ``features_one_chunk``: the training-style step in chunks of
  ``engine.FAST_CHUNK`` and the fast path with the whole batch as one chunk (to separate
  the effect of the chunk size, which matters on CPU caches, from the method).

Ratios are time / time (> 1: the first is slower): ``ratio_features_vs_fwdbwd``,
``ratio_vmap_vs_features``, ``ratio_loop_vs_features``, ``ratio_head_vs_forward``.

Peak memory: the feature extraction of a whole synthetic dataset streamed in batches (each
batch generated on the fly, features accumulated on the CPU) at two dataset sizes, each in
a FRESH subprocess (``VmHWM`` of ``/proc/self/status``, the resident-set high-water mark of
the whole process, torch and the model included; plus ``torch.cuda.max_memory_allocated``
on CUDA): ``peak_mem_mb_small`` and ``peak_mem_mb_large``. Without ``--quick``, each other
measurement's peak (one batch) is also taken in a fresh subprocess.

GPU batch sizes and ImageNet scale: ``--batch 256`` (or 512) sets every model's batch;
``--full`` adds the ImageNet-style ``resnet50`` (gradosr.models.resnet50, 3x224x224,
2,048-d features). ``--precision tf32|bf16`` runs every measurement with TF32 matrix
products (CUDA) or under ``torch.autocast`` in bfloat16, and reports the features'
largest relative error against float32 on the same inputs (``precision_max_rel_err``).

Usage::

    PYTHONPATH=src python benchmarks/gradients.py [--quick] [--device cpu|cuda] [--batch 256] [--full]
                                                  [--precision fp32|tf32|bf16]

Writes ``benchmarks/results/gradients.json`` and ``benchmarks/results/gradients.md``
(``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

from gradosr.gradients import engine, per_sample_loss, squared_norms
from gradosr.models import build_model, find_head_name

MODELS = {"lenet": (1, 28, 28), "cnn32": (3, 32, 32), "resnet18": (3, 32, 32)}
#: added by --full
FULL_MODELS = {"resnet50": (3, 224, 224)}
#: the numeric mode of every measurement (--precision)
PRECISION = {"mode": "fp32", "device": "cpu"}
NUM_CLASSES = 6
METHODS = ("forward", "fwd_bwd", "features", "head", "vmap", "loop", "fwd_bwd_chunked",
           "features_one_chunk")
RESULTS = Path(__file__).resolve().parent / "results"


def make_model(name: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, in_channels=MODELS[name][0]).to(device)
    return model.eval()


def make_batch(name: str, n: int, device: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *MODELS[name], generator=gen).to(device)


def precision_context():
    """The autocast context of --precision (bf16), else a no-op."""
    import contextlib

    if PRECISION["mode"] == "bf16":
        return torch.autocast(device_type=PRECISION["device"].split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_precision(mode: str, device: str) -> None:
    """TF32 on (``tf32``) or off for the CUDA matrix products and convolutions; bf16 autocast."""
    PRECISION.update(mode=mode, device=device)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def precision_error(model, x) -> float:
    """Largest relative error of the fast features under --precision against float32."""
    mode = PRECISION["mode"]
    if mode == "fp32":
        return 0.0
    set_precision("fp32", PRECISION["device"])
    ref = run_features(model, x).double()
    set_precision(mode, PRECISION["device"])
    with precision_context():
        got = run_features(model, x).double()
    return ((got - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


def loss_sum(z: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(z).sum()


# ---- the measured computations -------------------------------------------------------------


def run_forward(model, x):
    with torch.no_grad():
        return model(x)


def run_fwd_bwd(model, x):
    model.zero_grad(set_to_none=True)
    loss_sum(model(x)).backward()


def run_features(model, x):
    return squared_norms(model, x, method="fast")[0]


def run_fwd_bwd_chunked(model, x):
    """The training-style step in chunks of the fast path's default chunk size."""
    model.zero_grad(set_to_none=True)
    for xc in x.split(engine.FAST_CHUNK):
        loss_sum(model(xc)).backward()


def run_features_one_chunk(model, x):
    """The fast path with the whole batch as one chunk."""
    return squared_norms(model, x, method="fast", chunk_size=x.shape[0])[0]


def run_head(model, x):
    head = find_head_name(model)
    return squared_norms(model, x, params=[f"{head}.weight", f"{head}.bias"], method="head")[0]


def vmap_chunk(model) -> int:
    numel = sum(p.numel() for p in model.parameters())
    return max(1, min(32, 2**26 // numel))


def run_vmap(model, x):
    """Full per-sample gradients of every parameter by vmap(grad), then squared norms."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def sample_loss(p, xi):
        return loss_sum(functional_call(model, (p, buffers), (xi.unsqueeze(0),)))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0))
    out = []
    for xc in x.split(vmap_chunk(model)):
        grads = per_sample_grads(params, xc)  # materialised: (C, *param.shape) each
        out.append(torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()], dim=1))
    return torch.cat(out)


def run_loop(model, x):
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_sum(model(x[i : i + 1])), params)
        rows.append(torch.stack([g.pow(2).sum() for g in grads]))
    return torch.stack(rows)


RUNNERS = {"forward": run_forward, "fwd_bwd": run_fwd_bwd, "features": run_features,
           "head": run_head, "vmap": run_vmap, "loop": run_loop,
           "fwd_bwd_chunked": run_fwd_bwd_chunked, "features_one_chunk": run_features_one_chunk}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn, warm, device: str, warmup: int, repeats: int, budget_s: float) -> float:
    """Median seconds of ``fn()`` over up to ``repeats`` runs (fewer past ``budget_s``),
    after ``warmup`` calls of ``warm()``."""
    for _ in range(warmup):
        warm()
        sync(device)
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- peak memory in fresh subprocesses ------------------------------------------------------


def vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_main(args) -> None:
    """Run one measurement once in this fresh process and print its peak memory (JSON)."""
    torch.manual_seed(0)
    model = make_model(args.model, args.device)
    base = vmhwm_mb()
    if args.child == "stream":  # the whole dataset, batch by batch
        feats = []
        for i, start in enumerate(range(0, args.n, args.batch)):
            xb = make_batch(args.model, min(args.batch, args.n - start), args.device, seed=i)
            feats.append(run_features(model, xb).detach().cpu().double())
        assert torch.cat(feats).shape[0] == args.n
    else:
        RUNNERS[args.child](model, make_batch(args.model, args.n, args.device))
    sync(args.device)
    out = {"peak_mb": vmhwm_mb(), "base_mb": base}
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def child_peak(model: str, what: str, n: int, batch: int, device: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", what, "--model", model,
           "--n", str(n), "--batch", str(batch), "--device", device, "--precision", PRECISION["mode"]]
    cmd += ["--full"] if model in FULL_MODELS else []
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the benchmark ---------------------------------------------------------------------------


def _precise(runner, model, x):
    """``runner(model, x)`` under --precision; the float32 references (vmap, the loop) as they are."""
    if runner in (run_vmap, run_loop):
        return runner(model, x)
    with precision_context():
        return runner(model, x)


def bench_model(name: str, cfg: dict, device: str) -> dict:
    batch = cfg["batch"][name]
    model = make_model(name, device)
    x = make_batch(name, batch, device)
    sub = x[: cfg["loop_samples"]]
    t: dict[str, float] = {}
    # the slow ones warm up on one vmap chunk / one sample (same shapes as timed)
    warm_data = {"vmap": x[: vmap_chunk(model)], "loop": sub[:1]}
    for method in METHODS:
        data = sub if method == "loop" else x
        fn = (lambda m=method, d=data, net=model: _precise(RUNNERS[m], net, d))
        warm = (lambda m=method, d=warm_data.get(method, data), net=model: _precise(RUNNERS[m], net, d))
        t[method] = time_it(fn, warm, device, cfg["warmup"], cfg["repeats"], cfg["budget_s"])
        if method == "loop":
            t[method] *= batch / sub.shape[0]
        print(f"  {name:9s} {method:9s} {t[method] * 1e3:10.1f} ms/batch", flush=True)
    model.zero_grad(set_to_none=True)
    # sanity: the fast features equal the materialised per-sample gradients' norms
    n_check = min(batch, 8)
    fast_f = run_features(model, x[:n_check])
    ref_f = run_vmap(model, x[:n_check])
    max_rel = ((fast_f - ref_f).abs() / ref_f.abs().clamp_min(1e-30)).max().item()
    rec = {
        "model": name,
        "input": list(MODELS[name]),
        "num_classes": NUM_CLASSES,
        "batch": batch,
        "loop_samples_timed": int(sub.shape[0]),
        "vmap_chunk": vmap_chunk(model),
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_param_tensors": len(list(model.parameters())),
        "times_s": t,
        "throughput_samples_per_s": {k: batch / v for k, v in t.items()},
        "ratio_features_vs_fwdbwd": t["features"] / t["fwd_bwd"],
        "ratio_vmap_vs_features": t["vmap"] / t["features"],
        "ratio_loop_vs_features": t["loop"] / t["features"],
        "ratio_head_vs_forward": t["head"] / t["forward"],
        "fast_chunk": engine.FAST_CHUNK,
        "ratio_features_vs_fwdbwd_same_chunk": t["features"] / t["fwd_bwd_chunked"],
        "ratio_features_one_chunk_vs_fwdbwd": t["features_one_chunk"] / t["fwd_bwd"],
        "features_vs_vmap_max_rel_diff": max_rel,
        "precision": PRECISION["mode"],
        "precision_max_rel_err": precision_error(model, x[:n_check]),
    }
    del model, x, sub
    small, large = cfg["mem_sizes"][name]
    for key, n in (("small", small), ("large", large)):
        peak = child_peak(name, "stream", n, batch, device)
        rec[f"peak_mem_mb_{key}"] = peak["peak_mb"]
        rec[f"dataset_size_{key}"] = n
        rec["base_mem_mb"] = peak["base_mb"]
        if "cuda_peak_mb" in peak:
            rec[f"cuda_peak_mem_mb_{key}"] = peak["cuda_peak_mb"]
    if cfg["mem_all"]:
        rec["peak_mem_mb_one_batch"] = {}
        for method in METHODS:
            n = cfg["loop_samples"] if method == "loop" else batch
            rec["peak_mem_mb_one_batch"][method] = child_peak(name, method, n, batch,
                                                              device)["peak_mb"]
    print(f"  {name:9s} peak memory {rec['peak_mem_mb_small']:.0f} MB ({small} samples), "
          f"{rec['peak_mem_mb_large']:.0f} MB ({large} samples)", flush=True)
    return rec


def markdown(records: list[dict], meta: dict) -> str:
    head = ("| model | batch | forward | fwd+bwd | features (fast) | head only | vmap (full grads) "
            "| naive loop | features/fwd+bwd | vmap/features | loop/features | head/forward "
            "| peak MB (small) | peak MB (large) |")
    lines = ["# Per-sample gradient engine benchmark", "",
             f"Device: {meta['device']} ({meta['cpu']}), torch {meta['torch']}, "
             f"{meta['threads']} threads, float32, {NUM_CLASSES} classes, "
             f"{'quick' if meta['quick'] else 'full'} run, {meta['date']}.", "",
             "Throughput in samples/s (per-batch time in parentheses); ratios are time/time "
             "(> 1: the first is slower). Peak memory: VmHWM of a fresh process streaming "
             "the dataset through the fast feature extraction.", "",
             head, "|" + "---|" * 14]
    for r in records:
        t, thr = r["times_s"], r["throughput_samples_per_s"]
        cell = (lambda k: f"{thr[k]:.0f} ({t[k] * 1e3:.0f} ms)")
        lines.append(
            f"| {r['model']} | {r['batch']} | {cell('forward')} | {cell('fwd_bwd')} | "
            f"{cell('features')} | {cell('head')} | {cell('vmap')} | {cell('loop')} | "
            f"{r['ratio_features_vs_fwdbwd']:.2f} | {r['ratio_vmap_vs_features']:.2f} | "
            f"{r['ratio_loop_vs_features']:.2f} | {r['ratio_head_vs_forward']:.2f} | "
            f"{r['peak_mem_mb_small']:.0f} (n={r['dataset_size_small']}) | "
            f"{r['peak_mem_mb_large']:.0f} (n={r['dataset_size_large']}) |")
    lines += ["", f"The fast path runs the batch in chunks of {records[0]['fast_chunk']} "
              "samples (its default). Same-chunk comparisons: the training-style step in "
              "those chunks, and the fast path with the whole batch as one chunk:", "",
              "| model | fwd+bwd in chunks | features/fwd+bwd (same chunks) "
              "| features, one chunk | features one chunk/fwd+bwd |", "|---|---|---|---|---|"]
    for r in records:
        t = r["times_s"]
        lines.append(f"| {r['model']} | {t['fwd_bwd_chunked'] * 1e3:.0f} ms | "
                     f"{r['ratio_features_vs_fwdbwd_same_chunk']:.2f} | "
                     f"{t['features_one_chunk'] * 1e3:.0f} ms | "
                     f"{r['ratio_features_one_chunk_vs_fwdbwd']:.2f} |")
    if any("peak_mem_mb_one_batch" in r for r in records):
        lines += ["", "Peak memory (MB, VmHWM of a fresh process) of one batch of each "
                  "measurement (the loop: its timed subset):", "",
                  "| model | " + " | ".join(METHODS) + " |", "|" + "---|" * (len(METHODS) + 1)]
        for r in records:
            if "peak_mem_mb_one_batch" in r:
                pm = r["peak_mem_mb_one_batch"]
                lines.append(f"| {r['model']} | " + " | ".join(f"{pm[m]:.0f}" for m in METHODS)
                             + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small batches, one repeat (< 2 min)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--models", default=None, help="comma-separated subset (default: all, with --full resnet50)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder of the outputs")
    ap.add_argument("--child", choices=["stream", *METHODS], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help="batch size of every model (e.g. 256 or 512 on a GPU)")
    ap.add_argument("--full", action="store_true", help="add the ImageNet-style resnet50 at 3x224x224")
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                    help="float32 (default), TF32 matrix products (CUDA) or bfloat16 autocast")
    args = ap.parse_args(argv)
    if args.full:
        MODELS.update(FULL_MODELS)
    set_precision(args.precision, args.device)
    if args.child:
        child_main(args)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    models = [m.strip() for m in (args.models or ",".join(MODELS)).split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.quick:
        cfg = dict(batch={"lenet": 64, "cnn32": 32, "resnet18": 16}, warmup=1, repeats=1,
                   budget_s=0.0, loop_samples=4, mem_all=False,
                   mem_sizes={"lenet": (64, 256), "cnn32": (32, 128), "resnet18": (16, 48)})
    else:
        cfg = dict(batch={m: 256 for m in MODELS}, warmup=1, repeats=5, budget_s=20.0,
                   loop_samples=16, mem_all=True,
                   mem_sizes={m: (256, 1024) for m in MODELS})
    cfg["batch"] = {m: cfg["batch"].get(m, 16) for m in MODELS}
    cfg["mem_sizes"] = {m: cfg["mem_sizes"].get(m, (16, 48)) for m in MODELS}
    if args.batch:
        cfg["batch"] = {m: args.batch for m in MODELS}
        cfg["mem_sizes"] = {m: (args.batch, 4 * args.batch) for m in MODELS}
    meta = {"device": args.device, "cpu": cpu_name(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "quick": args.quick, "full": args.full,
            "precision": args.precision, "batch": args.batch,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    print(f"gradient engine benchmark: {meta}", flush=True)
    t0 = time.perf_counter()
    records = [bench_model(m, cfg, args.device) for m in models]
    meta["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradients.json").write_text(json.dumps({"meta": meta, "records": records},
                                                        indent=2) + "\n")
    md = markdown(records, meta)
    (args.out / "gradients.md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.out / 'gradients.json'} and {args.out / 'gradients.md'} "
          f"in {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
