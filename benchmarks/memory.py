"""Peak memory of fit + evaluate on folder datasets, streamed and in memory (issue 20).

Writes two folder datasets (ImageFolder layout, 10 classes, 32×32×3 PNG, a class-coloured
quadrant over noise so that the classifier learns something) of 2,000 and 20,000 images
once under ``--cache`` (default /tmp/gradosr-memory), and for each of ``msp``,
``mahalanobis`` and ``plus``, each size and each mode (``streamed``: the default, the
folder indexed and decoded in chunks; ``memory``: ``--in-memory``) runs in a fresh
process, through the CLI (``--protocol custom``, known 0-5, unknown 6-9):

- msp, mahalanobis: ``gradosr train`` then ``gradosr evaluate RUN --methods M``;
- plus: ``gradosr fit --preset plus`` then ``gradosr evaluate RUN --methods plus``.

Measurement: the peak resident set size of that process (``VmHWM`` of
/proc/self/status, reset through /proc/self/clear_refs after every import, as
benchmarks/scoring.py does) minus the resident size at the reset: what training,
fitting and evaluating allocate. The decoding worker processes are not counted (each
holds one batch of images). Writes ``benchmarks/results/memory.{json,md}``: one record
per run (method, images, mode, peak_rss_mb, the AUROC, seconds).

    python benchmarks/memory.py --quick      # 1 epoch of lenet, 2 runs at a time: under 10 minutes on 2 cores
    python benchmarks/memory.py              # 3 epochs of cnn32 (the default classifier of 32×32×3 data)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scoring import _status_mb  # noqa: E402  (the VmHWM reader of the scoring benchmark)

SIZES = (2000, 20000)
METHODS = ("msp", "mahalanobis", "plus")
MODES = ("streamed", "memory")
CLASSES = 10


def write_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 32×32×3 PNGs in ``root/<class>/``, written once (a marker file says done)."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % CLASSES
        x = rng.integers(0, 60, (32, 32, 3))
        r, q = divmod(c, 4)  # a quadrant (c % 4) brightened in a channel (c // 4)
        x[(q // 2) * 16:(q // 2) * 16 + 16, (q % 2) * 16:(q % 2) * 16 + 16, r % 3] += 150 + 30 * (c // 8)
        path = root / f"c{c}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(path)
    done.write_text(str(n))
    return root


def worker(job: dict) -> dict:
    """One run in this (fresh) process; returns its record."""
    import importlib

    from gradosr.cli import main

    for name in ("gradosr.evaluation.run_eval", "gradosr.osr", "gradosr.runs", "sklearn.model_selection",
                 "PIL.PngImagePlugin"):  # everything the commands import, before the baseline
        importlib.import_module(name)

    data = ["--protocol", "custom", "--dataset", f"folder:{job['folder']}", "--known", "0-5", "--unknown", "6-9"]
    common = ["--no-progress", "--device", "cpu"] + (["--in-memory"] if job["mode"] == "memory" else [])
    train = ["--epochs", str(job["epochs"]), "--seed", "0", "--model", job["model"]]
    run = job["run"]
    first = (["fit", "--preset", "plus"] if job["method"] == "plus" else ["train"]) + data + train + common
    baseline = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if main(first + ["--out", run]) != 0:
        raise SystemExit("the fit failed")
    fit_peak = _status_mb("VmHWM") - baseline
    evaluation = os.path.join(run, "memory-eval.json")
    if main(["evaluate", run, "--methods", job["method"], "--json", evaluation] + common) != 0:
        raise SystemExit("the evaluation failed")
    peak = _status_mb("VmHWM") - baseline
    rec = json.load(open(evaluation))["results"][0]
    state = Path(run) / "detector" / "detector.safetensors"  # the preset's fitted state: banks, moments, K-FAC factors
    return {"method": job["method"], "images": job["images"], "mode": job["mode"],
            "peak_rss_mb": round(peak, 1), "fit_peak_rss_mb": round(fit_peak, 1),
            "data_mb": round(job["images"] * 32 * 32 * 3 / 2**20, 1), "auroc": rec["auroc"],
            "seconds": round(time.perf_counter() - t0, 1), "epochs": job["epochs"], "model": job["model"],
            "threads": torch_threads(),
            **({"state_mb": round(state.stat().st_size / 2**20, 2)} if state.is_file() else {})}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_job(job: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if job.get("threads"):
        env.update(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        err = done.stderr.strip().splitlines()
        return {**{k: job[k] for k in ("method", "images", "mode")}, "error": err[-1] if err else str(done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(records: list[dict]) -> list[str]:
    """The issue's acceptance checks, as measured."""
    by = {(r["method"], r["images"], r["mode"]): r for r in records if "error" not in r}
    lo, hi = SIZES[0], SIZES[-1]
    lines = []
    for m in METHODS:
        for mode in MODES:
            a, b = by.get((m, lo, mode)), by.get((m, hi, mode))
            if a and b:
                growth = b["peak_rss_mb"] - a["peak_rss_mb"]
                state = (f"; fitted state (banks, moments, factors) {a['state_mb']} -> {b['state_mb']} MB, "
                         f"{b['state_mb'] - a['state_mb']:+.1f} MB" if "state_mb" in a and "state_mb" in b else "")
                lines.append(f"{m} {mode}: {a['peak_rss_mb']} -> {b['peak_rss_mb']} MB "
                             f"({growth:+.1f} MB, x{b['peak_rss_mb'] / max(a['peak_rss_mb'], 1e-9):.3f}; "
                             f"data {a['data_mb']} -> {b['data_mb']} MB{state})")
        for n in SIZES:
            a, b = by.get((m, n, "streamed")), by.get((m, n, "memory"))
            if a and b:
                lines.append(f"{m} {n}: |AUROC streamed - memory| = {abs(a['auroc'] - b['auroc']):.2e}")
    return lines


def markdown(records: list[dict], notes: list[str], command: str, jobs: int) -> str:
    head = "| method | images | mode | peak RSS MB | fit peak MB | data MB | AUROC | seconds |"
    rows = [head, "|" + "---|" * 8]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['method']} | {r['images']} | {r['mode']} | error: {r['error']} | | | | |")
        else:
            rows.append(f"| {r['method']} | {r['images']} | {r['mode']} | {r['peak_rss_mb']} | "
                        f"{r['fit_peak_rss_mb']} | {r['data_mb']} | {r['auroc']:.4f} | {r['seconds']} |")
    return "\n".join([
        "# Peak memory: streamed and in-memory folder datasets", "",
        f"Command: `{command}`", "",
        "Peak RSS above the resident size after imports (VmHWM reset through /proc/self/clear_refs), one fresh "
        "process per row running train/fit then evaluate through the CLI; decoding workers not counted. "
        "`data MB` is the uint8 size of all images. Classifier: "
        + ", ".join(sorted({f"{r['model']}, {r['epochs']} epoch(s)" for r in records if "model" in r})) + "; "
        + ", ".join(sorted({f"{r['threads']} torch thread(s)" for r in records if "threads" in r}))
        + f" per run, {jobs} run(s) at a time.", "",
        *rows, "", *[f"- {n}" for n in notes], ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 training epoch of lenet (under 10 minutes on 2 cores)")
    ap.add_argument("--model", default=None, help="the classifier (default cnn32, --quick lenet)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 3, --quick 1)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradosr-memory"),
                    help="where the folder datasets are written once")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs at a time, each with cores/jobs torch threads (default 1, --quick 2: the "
                         "peak RSS of a process does not depend on what runs beside it)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    epochs = args.epochs or (1 if args.quick else 3)
    model = args.model or ("lenet" if args.quick else "cnn32")
    jobs = max(1, args.jobs or (2 if args.quick else 1))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    cache = Path(args.cache)
    todo = [{"method": method, "images": n, "mode": mode, "folder": str(write_folder(cache / f"images{n}", n)),
             "epochs": epochs, "model": model, "threads": threads}
            for n in SIZES for method in [m.strip() for m in args.methods.split(",") if m.strip()] for mode in MODES]

    def one(job: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="gradosr-memory-run") as run:
            rec = run_job({**job, "run": os.path.join(run, "run")}, args.timeout)
        print(json.dumps(rec), flush=True)
        return rec

    # the longest runs first (plus, the larger set), so that parallel runs end together
    order = sorted(range(len(todo)), key=lambda i: (todo[i]["method"] != "plus", -todo[i]["images"]))
    with ThreadPoolExecutor(jobs) as pool:
        done = dict(zip(order, pool.map(one, [todo[i] for i in order])))
    records = [done[i] for i in range(len(todo))]
    notes = summary(records)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"command": command, "records": records, "summary": notes},
                                                indent=1) + "\n")
    text = markdown(records, notes, command, jobs)
    (out / "memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
