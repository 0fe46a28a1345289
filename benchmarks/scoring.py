"""Cost at scale of the bank-based scorers: fit time, scoring time and peak memory.

    python benchmarks/scoring.py --quick        # banks of 10k and 100k, one fit per row (< 5 min on 2 cores)
    python benchmarks/scoring.py                # 10k, 100k and 1M
    python benchmarks/scoring.py --dim 2048     # the ImageNet width (the default with CUDA)

Synthetic features with class structure: K = 10 classes, class centres N(0, 0.0225 I) in D
dimensions (sd 0.15: overlapping classes, so that the AUROC is not 1), samples centre + N(0, I), float32 (the bank: N×D). Queries: 10k, half from
the known classes and half from 10 other centres (the AUROC of known vs. other, a
sanity check and the measure of a float16 bank's effect). Logits for the methods that
read them come from a fixed random linear head. Multi-layer Mahalanobis
(``mahalanobis_ml``) runs a model: two fixed random ReLU layers on the features before
that head (:func:`layered_model`), its two layers' Gaussians fitted from one streamed
forward pass.

Every (method, backend, bank size) runs in a fresh subprocess with the same number of
threads (``--threads``, default all cores, for torch and FAISS alike). Memory: the
peak resident set size (``VmHWM``) after the synthetic data were generated, minus the
resident size at that point (the high-water mark is reset through
``/proc/self/clear_refs`` first), i.e. everything the fit and the scoring allocate on
top of the features the caller holds: ``peak_mb``. ``bank_mb`` is the size of the N×D
float32 features. With CUDA, ``gpu_peak_mb`` is torch's peak allocation on the device.

``fit_s`` is the fastest of ``--fit-repeats`` fits (default 3, 1 with ``--quick``; every one is kept in
``fit_runs_s``) in the same process, since the timings of a shared machine drift; the
scoring runs once.

The kNN record with the torch backend forced also times FAISS ``IndexFlatL2`` on the
same normalised float32 bank and queries in the same process and threads
(``faiss_score_s``), when faiss-cpu is installed.

``--append`` adds a run's rows (say, a method added later) to an existing
``scoring.json`` of the same machine and threads; each row's ratios still come from one
process.

Writes ``benchmarks/results/scoring.json`` (one record per method, backend and bank
size: method, backend, bank, dim, queries, fit_s, score_s, peak_mb, bank_mb, ...) and
``scoring.md`` (the table and the targets' ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = 10

#: (method, backend, bank_dtype): the runs per bank size; backend None = the method has no search
RUNS = [
    ("knn", "torch", "float32"),
    ("knn", "faiss", "float32"),
    ("knn", "torch", "float16"),
    ("nnguide", "torch", "float32"),
    ("mahalanobis", None, None),
    ("rmds", None, None),
    ("vim", None, None),
    ("gmm", None, None),
    ("mahalanobis_ml", None, None),
]


def layered_model(w, b):
    """The model of the ``mahalanobis_ml`` rows: the synthetic features x pass two fixed
    random ReLU layers (D→D, He-scaled, seed 0) before the head (w, b); the method's
    layers are the two ReLU outputs, so it fits two D-dimensional Gaussians from a
    streamed forward pass (its inputs are the features, N×D)."""
    import torch
    from torch import nn

    d = w.shape[1]
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
    for lin in (body[0], body[2]):
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
    head = nn.Linear(d, w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    return nn.Sequential(body, head).eval()


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(n: int, d: int, seed: int, unknown: bool = False):
    """(features N×D float32, labels N, logits N×K float32, head weight, head bias),
    generated in chunks into preallocated arrays (the generation's peak is the data)."""
    import numpy as np

    rng = np.random.default_rng(1234)
    centres = rng.normal(0, 0.15, size=(2 * CLASSES, d)).astype(np.float32)  # overlapping classes
    w = (rng.normal(size=(CLASSES, d)) / np.sqrt(d)).astype(np.float32)
    b = rng.normal(size=CLASSES).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    if unknown:
        y = np.where(np.arange(n) % 2 == 0, y, y + CLASSES)  # every other query from another centre
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 16):
        rows = slice(s, min(s + (1 << 16), n))
        x[rows] = centres[y[rows]] + rng.standard_normal((len(x[rows]), d), dtype=np.float32)
    logits = np.empty((n, CLASSES), dtype=np.float32)
    for s in range(0, n, 1 << 16):
        logits[s:s + (1 << 16)] = x[s:s + (1 << 16)] @ w.T + b
    return x, y, logits, w, b


def worker(job: dict) -> dict:
    """One (method, backend, bank size) in this process."""
    import numpy as np
    import torch

    from gradosr.detectors import ScorerInputs
    from gradosr.detectors.registry import make_scorer
    from gradosr.metrics import auroc

    torch.set_num_threads(job["threads"])
    faiss = None
    try:
        import faiss

        faiss.omp_set_num_threads(job["threads"])
    except ImportError:
        pass
    n, d, nq = job["bank"], job["dim"], job["queries"]
    x, y, logits, w, b = synthetic(n, d, seed=0)
    qx, qy, qlogits, _, _ = synthetic(nq, d, seed=1, unknown=True)
    head = dict(head_weight=torch.from_numpy(w), head_bias=torch.from_numpy(b))
    train = ScorerInputs(logits=torch.from_numpy(logits), features=torch.from_numpy(x), **head)
    test = ScorerInputs(logits=torch.from_numpy(qlogits), features=torch.from_numpy(qx), **head)
    options = {}
    if job["method"] == "mahalanobis_ml":  # it runs a model on its inputs (the features)
        model = layered_model(w, b)
        train.inputs, train.model = train.features, model
        test.inputs, test.model = test.features, model
        options = {"layers": ("0.1", "0.3")}
    if job["backend"] is not None:
        options = {"backend": job["backend"], "bank_dtype": job["bank_dtype"]}
        if torch.cuda.is_available() and job["backend"] == "torch":
            options["device"] = "cuda"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident size
    fits, scorer = [], None
    for _ in range(job.get("fit_repeats", 1)):  # the fastest of the repeats, as timeit does
        del scorer  # the previous fit's banks are freed before the next is built
        scorer = make_scorer(job["method"])
        if options:
            scorer.set_params(**options)
        t0 = time.perf_counter()
        scorer.fit(train, y)
        fits.append(time.perf_counter() - t0)
    fit_s = min(fits)
    t0 = time.perf_counter()
    scores = scorer.score_samples(test)
    score_s = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - baseline
    rec = {"method": job["method"], "backend": scorer.params.get("backend") or "numpy",
           "bank_dtype": job["bank_dtype"] or "float64", "bank": n, "dim": d, "queries": nq,
           "threads": job["threads"], "fit_s": round(fit_s, 3), "fit_runs_s": [round(t, 3) for t in fits],
           "score_s": round(score_s, 3),
           "peak_mb": round(peak, 1), "bank_mb": round(x.nbytes / 2**20, 1),
           "auroc": round(float(auroc(scores, qy < CLASSES)), 6)}
    if cuda:
        rec["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if job["method"] == "knn" and job["backend"] == "torch" and job["bank_dtype"] == "float32" and faiss:
        bank = np.ascontiguousarray(scorer.bank_[0].cpu().numpy())
        q = qx / np.maximum(np.linalg.norm(qx, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        t0 = time.perf_counter()
        _, idx = index.search(np.ascontiguousarray(q, dtype=np.float32), scorer.k_)
        rec["faiss_score_s"] = round(time.perf_counter() - t0, 3)
        ours = scorer.banks_[0].search(torch.from_numpy(q), scorer.k_)
        rec["faiss_same_kth"] = round(float((ours[:, -1].numpy() == idx[:, -1]).mean()), 6)
    return rec


def run(job: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        return {**{k: job[k] for k in ("method", "backend", "bank", "dim", "queries")},
                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def targets(records: list[dict]) -> list[str]:
    """The issue's targets as measured ratios (only those the run's bank sizes allow)."""
    ok = [r for r in records if "error" not in r]
    by = {(r["method"], r["backend"], r["bank_dtype"], r["bank"]): r for r in ok}
    banks = sorted({r["bank"] for r in ok})
    top, lines = banks[-1] if banks else None, []
    knn = by.get(("knn", "torch", "float32", top))
    if knn and knn.get("faiss_score_s"):
        lines.append(f"- kNN, torch backend forced / FAISS IndexFlatL2, scoring at {top}×{knn['dim']}: "
                     f"{ratio(knn['score_s'], knn['faiss_score_s'])}× (target ≤ 1.25×)")
    for r in ok:
        if r["bank"] == top:
            # the fixed footprint: the same method's peak at the smallest bank of the run
            # (runtime, block buffers); the marginal ratio is what the bank's growth costs
            base = by.get((r["method"], r["backend"], r["bank_dtype"], banks[0])) if len(banks) > 1 else None
            marginal = (f"; above the fixed footprint (its peak at {banks[0]}: {base['peak_mb']} MB) "
                        f"{ratio(r['peak_mb'] - base['peak_mb'], r['bank_mb'] - base['bank_mb'])}× the bank's growth"
                        if base else "")
            lines.append(f"- memory, {r['method']} ({r['backend']}, {r['bank_dtype']}) at {top}: peak above the data "
                         f"{r['peak_mb']} MB = {ratio(r['peak_mb'], r['bank_mb'])}× the float32 bank "
                         f"{r['bank_mb']} MB{marginal} (target ≤ 1.5× + fixed footprint)")
    if len(banks) >= 2:
        lo, hi = banks[-2], banks[-1]
        for (m, be, dt, n), r in by.items():
            small = by.get((m, be, dt, lo))
            if n != hi or not small:
                continue
            growth = f"×{hi // lo} bank"
            # the marginal growth: both times less the smallest bank's (a fixed cost, such as
            # GMM's per-class eigendecompositions, makes the plain ratio sublinear)
            base = by.get((m, be, dt, banks[0])) if len(banks) > 2 else None
            marginal = "" if base is None else (
                f"; less the {banks[0]} row's times: fit {ratio(r['fit_s'] - base['fit_s'], small['fit_s'] - base['fit_s'])}×"
                + (f", scoring {ratio(r['score_s'] - base['score_s'], small['score_s'] - base['score_s'])}×"
                   if be in ("torch", "faiss") else ""))  # a Gaussian's scoring does not grow
            lines.append(f"- {m} ({be}, {dt}) {growth}: fit {ratio(r['fit_s'], small['fit_s'])}×, "
                         f"scoring {ratio(r['score_s'], small['score_s'])}×{marginal} (targets: fit and kNN "
                         f"scoring in [8, 12] for ×10; Gaussian scoring flat)")
    return lines


def markdown(doc: dict) -> str:
    cols = ["method", "backend", "bank_dtype", "bank", "dim", "queries", "fit_s", "score_s", "faiss_score_s",
            "peak_mb", "bank_mb", "auroc"]
    lines = ["# Scoring cost at scale", "", f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}; {doc['threads']} threads for torch and FAISS alike.", "",
             "peak_mb: peak resident memory of the fit and the scoring above the resident size after the synthetic "
             "features were generated (VmHWM reset through /proc/self/clear_refs, a fresh process per row); "
             "bank_mb: the N×D float32 training features. auroc: known vs. other-centre queries (synthetic).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in doc["records"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['backend']} | – | {r['bank']} | {r['dim']} | {r['queries']} | "
                         f"error: {r['error']} |" + " |" * (len(cols) - 7))
            continue
        lines.append("| " + " | ".join("–" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    lines += ["", "Targets (ratios measured in one run, each row's in one process):", ""] + (doc["targets"] or ["- (none measurable)"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="banks of 10k and 100k only")
    ap.add_argument("--banks", default=None, help="comma-separated bank sizes (default 10k,100k,1M)")
    ap.add_argument("--dim", type=int, default=None, help="feature dimension (default 512; 2048 with CUDA)")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all bank-based)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fit-repeats", type=int, default=None,
                    help="fits per row; fit_s is the fastest (this machine's timings drift by up to 30%%); "
                         "default 3, 1 with --quick")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends of the search methods' rows (default: all; e.g. torch)")
    ap.add_argument("--bank-dtypes", default=None, help="comma-separated bank dtypes of those rows (default: all)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true",
                    help="add this run's rows to OUT/scoring.json (replacing rows of the same method, backend, "
                         "dtype and bank) instead of starting a new file; its command is listed beside the others")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fit_repeats is None:
        args.fit_repeats = 1 if args.quick else 3
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    dim = args.dim or (2048 if torch.cuda.is_available() else 512)
    banks = ([int(float(b)) for b in args.banks.split(",")] if args.banks
             else [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    methods = args.methods.split(",") if args.methods else None
    records = []
    for bank in banks:
        for method, backend, dtype in RUNS:
            if methods and method not in methods:
                continue
            if backend is not None and ((args.backends and backend not in args.backends.split(","))
                                        or (args.bank_dtypes and dtype not in args.bank_dtypes.split(","))):
                continue
            if backend == "faiss":
                from gradosr.detectors.search import faiss_module

                if faiss_module() is None:
                    continue
            job = {"method": method, "backend": backend, "bank_dtype": dtype, "bank": bank, "dim": dim,
                   "queries": args.queries, "threads": args.threads, "fit_repeats": args.fit_repeats}
            rec = run(job, args.timeout)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    command = " ".join(["python benchmarks/scoring.py"] + (argv if argv is not None else sys.argv[1:]))
    doc = {"command": command, "machine": machine, "threads": args.threads, "torch": torch.__version__,
           "records": records}
    out = Path(args.out)
    if args.append and (out / "scoring.json").is_file():
        old = json.loads((out / "scoring.json").read_text())
        if (old.get("machine"), old.get("threads")) != (machine, args.threads):
            sys.exit(f"scoring.py: --append needs the machine and threads of {out / 'scoring.json'} "
                     f"({old.get('machine')}, {old.get('threads')} threads)")
        key = lambda r: (r["method"], r["backend"], r.get("bank_dtype"), r["bank"])  # noqa: E731
        new = {key(r) for r in records}
        doc["records"] = sorted([r for r in old["records"] if key(r) not in new] + records, key=lambda r: r["bank"])
        doc["command"] = " && ".join([old["command"], command])
    doc["targets"] = targets(doc["records"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoring.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "scoring.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
