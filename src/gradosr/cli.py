"""The ``gradosr`` command.

Every expected failure is a :class:`gradosr.errors.GradOSRError`: it prints one line
``gradosr: error: …`` on stderr and exits with status 2 (``--debug`` shows the traceback).
An ``OSError`` (a file or folder the system will not read or write) is reported the same way.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m gradosr COMMAND …``) every process runs
the command (:mod:`gradosr.distributed`): training is DistributedDataParallel, extraction
and scoring are sharded; only rank 0 writes files and prints to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import time
from pathlib import Path

from gradosr.errors import ConfigError, GradOSRError

EXIT_ERROR = 2


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol (DESIGN.md §8)")
    g.add_argument("--protocol", default="mnist-sample",
                   help="mnist-sample (default), fashion-mnist, mnist, svhn, cifar10, cifar+10, cifar+50, "
                        "tiny-imagenet, custom or cross")
    g.add_argument("--split", type=int, default=None, help="standard split 0-4 (default 0); for cross: the seed")
    g.add_argument("--split-seed", type=int, default=None, help="a random 6/4 split with this seed instead")
    g.add_argument("--dataset", default=None, help="dataset of --protocol custom")
    g.add_argument("--known", default=None, help="known class ids of --protocol custom, e.g. 0,2,4,6")
    g.add_argument("--unknown", default=None, help="unknown class ids of --protocol custom, e.g. 1,3")
    g.add_argument("--known-dataset", default=None, help="--protocol cross: every class of it is known")
    g.add_argument("--unknown-dataset", default=None, help="--protocol cross: unknowns are sampled from its test set")
    g.add_argument("--data-dir", default=None, help="data root (default: $GRADOSR_DATA or ./data)")


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("closed-set training (defaults per dataset, DESIGN.md §8)")
    g.add_argument("--model", default=None, help="lenet, cnn32 or resnet18")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--image-size", type=int, default=None,
                   help="model input side (default 28 for lenet on 28×28 data, else 32; e.g. 64 for TinyImageNet)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method options (default: the preset's)")
    g.add_argument("--preset", default="plus",
                   help="plus (default: kNN in gradient space + kNN on features + max logit, docs/ablation.md) "
                        "or paper (Lee & AlRegib's proxy-split MLP as stated)")
    g.add_argument("--target", choices=("confounding", "predicted", "uniform"), default=None)
    g.add_argument("--n-ones", type=int, default=None, help="ones in the confounding label (default N; 0 or 2..N)")
    g.add_argument("--output", choices=("softmax", "sigmoid"), default=None, help="activation of the confounding loss")
    g.add_argument("--no-log", dest="log", action="store_false", default=None, help="do not log the squared norms")
    g.add_argument("--standardize", choices=("train", "own", "none"), default=None)
    g.add_argument("--detector-data", choices=("train", "heldout"), default=None,
                   help="proxy-known images for the detector: the proxy's training images (paper) or held-out ones")
    g.add_argument("--proxy-unknown", type=int, default=None, help="number of proxy-unknown classes (default round(K/3))")
    g.add_argument("--proxy-ensemble", type=int, default=None,
                   help="paper: number of proxy splits, one detector each, P(known) averaged (default 1)")
    g.add_argument("--projection-inputs", type=int, default=None,
                   help="paper: per-side dimension of projected full gradients of the layers below the head "
                        "appended to the detector inputs (default 0: none)")
    g.add_argument("--logit-inputs", default=None,
                   help="paper: comma-separated logit statistics appended to the detector inputs, among max_logit, "
                        "logsumexp, max_softmax (default none)")
    g.add_argument("--threshold-rule", choices=("fixed", "tpr"), default=None)
    g.add_argument("--threshold", type=float, default=None, help="fixed P(known) threshold (paper: 0.95)")
    g.add_argument("--target-tpr", type=float, default=None, help="fraction of held-out knowns accepted (rule tpr)")
    g.add_argument("--hidden", type=int, default=None, help="detector hidden width (default 128)")
    g.add_argument("--signals", default=None,
                   help="plus: comma-separated signals summed by the fused detector, among gradient, features, "
                        "max_logit, gradnorm, gradorth (default gradient,features,max_logit)")
    g.add_argument("--gradient-rep", choices=("head", "norms", "projection"), default=None,
                   help="plus: gradient representation of the kNN-in-gradient-space signal: the full head-weight "
                        "gradient (default), the log per-parameter squared norms, or a random projection of the "
                        "full gradient of every Linear/Conv weight")
    g.add_argument("--projection-dim", type=int, default=None,
                   help="plus, --gradient-rep projection: projected size per side of each layer (default 16)")
    g.add_argument("--k", type=int, default=None, help="plus: the largest k of the kNN signals (default 50)")
    g.add_argument("--gradient-metric", choices=("knn", "mahalanobis"), default=None,
                   help="plus, --gradient-rep norms|projection: cosine/Euclidean kNN (default) or the Mahalanobis "
                        "distance to the nearest class mean of the known training gradients")
    g.add_argument("--combine", choices=("sum", "fisher"), default=None,
                   help="plus: how the signals are combined: the sum of their z-scores on held-out knowns, or "
                        "Fisher's combination of their empirical p-values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradosr",
        description="Open-set recognition with gradient-based representations (Lee & AlRegib, ICIP 2021).",
    )
    parser.add_argument("--version", action="version", version=f"gradosr {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("datasets", help="list the datasets found on this machine and how to get the others")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps: the device to report")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("train", help="train the closed-set classifier of a protocol split")
    _add_protocol_args(p)
    _add_train_args(p)
    _add_common_args(p)
    p.add_argument("--out", required=True, help="run folder; the classifier goes to <out>/classifier/")
    p.add_argument("--resume", action="store_true", help="continue an unfinished training run")

    p = sub.add_parser("fit", help="fit the gradient method (classifier, proxy, detector) on a protocol split")
    _add_protocol_args(p)
    _add_train_args(p)
    _add_method_args(p)
    _add_common_args(p)
    p.add_argument("--out", required=True, help="run folder (classifier/, proxy/, detector/, osr.json)")

    p = sub.add_parser("predict", help="label image files with a fitted run: path, label or unknown, score")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder from gradosr fit (--run-dir under torchrun, whose parser takes --run for --run-path)")
    p.add_argument("files", nargs="+", help="image files (PNG, JPEG, ... read with Pillow)")
    p.add_argument("--batch-size", type=int, default=64)
    _add_common_args(p)

    p = sub.add_parser("benchmark", help="every method side by side on the same classifiers, over splits")
    _add_protocol_args(p)
    p.add_argument("--splits", default="0-4", help="splits (cross: seeds), e.g. 0-4 or 0,2 (default 0-4)")
    p.add_argument("--methods", default="all", help="comma-separated method ids, or all (default)")
    p.add_argument("--out", required=True, help="report folder (runs/, cache/, results.*, plots/)")
    _add_train_args(p)
    _add_method_args(p)
    _add_common_args(p)

    p = sub.add_parser("ablate", help="vary one choice at a time from the paper and plus presets, over splits")
    _add_protocol_args(p)
    p.add_argument("--splits", default="0-4", help="splits (cross: seeds), e.g. 0-4 or 0,2 (default 0-4)")
    p.add_argument("--variants", default="all",
                   help="comma-separated variant names, family prefixes such as plus*, or all (default); "
                        "see docs/ablation.md")
    p.add_argument("--out", required=True, help="folder (runs/, results.json, results.md)")
    _add_train_args(p)
    _add_common_args(p)

    p = sub.add_parser("evaluate", help="evaluate the methods of a run on its protocol's test set")
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run folder (from gradosr train or fit); --run-dir under torchrun, whose parser takes --run "
                        "for its --run-path")
    p.add_argument("--methods", default=None, help="comma-separated method ids, or all (default: the run's fitted presets and msp)")
    p.add_argument("--json", default=None, help="write the results JSON here (default <run>/eval.json)")
    p.add_argument("--data-dir", default=None)
    _add_common_args(p)
    return parser


def _out_folder(path: str) -> Path:
    """``--out`` as a Path; ConfigError when it exists and is not a folder (checked before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def _version() -> str:
    from gradosr import __version__

    return __version__


def _spec_from_args(args):
    from gradosr.data.protocols import resolve_protocol

    return resolve_protocol(args.protocol, split=args.split, split_seed=args.split_seed, dataset=args.dataset,
                            known=args.known, unknown=args.unknown, known_dataset=args.known_dataset,
                            unknown_dataset=args.unknown_dataset)


def _train_config_from_args(args, dataset: str):
    from gradosr.train import default_train_config

    return default_train_config(dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                                optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                                image_size=args.image_size)


def cmd_datasets(args) -> int:
    from gradosr.data.registry import DATASETS, data_root, locate_dataset

    root = data_root(args.data_dir)
    print(f"data root: {root.resolve()} (set with --data-dir or GRADOSR_DATA)")
    for name, info in DATASETS.items():
        where = locate_dataset(name, args.data_dir)
        if where is not None:
            status = f"found     {where}"
        else:
            status = f"missing   {info.how_to_get}"
        print(f"  {name:<14} {status}")
    from gradosr.distributed import init_distributed, world_size

    device = init_distributed(args.device)
    procs = f", {world_size()} processes (torchrun)" if world_size() > 1 else ""
    print(f"device: {device} (--device {args.device}){procs}")
    return 0


def cmd_train(args) -> int:
    from gradosr.data.protocols import load_protocol
    from gradosr.distributed import init_distributed
    from gradosr.runs import ensure_classifier

    spec = _spec_from_args(args)
    config = _train_config_from_args(args, spec.dataset)
    out = _out_folder(args.out) / "classifier"
    device = init_distributed(args.device)
    data = load_protocol(spec, args.data_dir)
    print(f"protocol {spec.label}: known {list(spec.known)}, unknown {list(spec.unknown)}; "
          f"{len(data.known_train)} train / {len(data.val)} val / {len(data.known_test)} known test images")
    print(f"training {config.model} on {device}: {config.to_dict()}")
    t0 = time.time()
    clf, reused = ensure_classifier(data, config, out, resume=args.resume, device=device,
                                    progress=not args.no_progress)
    if reused:
        print(f"{out} already holds this trained classifier; nothing to do")
    print(f"closed-set test accuracy: {clf.meta['test_acc']:.4f} (val {clf.meta['val_acc']:.4f}); "
          f"{time.time() - t0:.1f}s; saved in {out}")
    return 0


def cmd_fit(args) -> int:
    from gradosr.checkpoint import read_json
    from gradosr.data.protocols import load_protocol
    from gradosr.distributed import init_distributed
    from gradosr.osr import GradientOSR, make_config
    from gradosr.train import identity_mismatch

    spec = _spec_from_args(args)
    config = _train_config_from_args(args, spec.dataset)
    options = _method_options(args)
    method = make_config(args.preset, **options)
    out = _out_folder(args.out)
    if (out / "osr.json").is_file():
        stored = read_json(out / "osr.json")
        if identity_mismatch(stored, {"config": method.to_dict(), "train": config.to_dict()}) is None:
            print(f"{out} already holds this fitted method; nothing to do (gradosr evaluate --run {out})")
            return 0
    device = init_distributed(args.device)
    data = load_protocol(spec, args.data_dir)
    print(f"protocol {spec.label}: known {list(spec.known)}, unknown {list(spec.unknown)}")
    t0 = time.time()
    osr = GradientOSR(args.preset, train_config=config, device=device, progress=not args.no_progress,
                      seed=args.seed, **options)
    osr.fit(data, run_dir=out)
    if osr.config.method == "fusion":
        detail = f"signals {', '.join(osr.config.fusion.signals)} (k = {osr.detector.k_})"
    else:
        detail = f"proxy unknowns (labels) {osr.proxy_unknown}, {len(osr.param_names)} gradient features"
    print(f"fitted {args.preset} in {time.time() - t0:.1f}s: classifier test accuracy "
          f"{osr.classifier.meta.get('test_acc', float('nan')):.4f}, {detail}, threshold {osr.threshold_:.4g}; "
          f"saved in {out}")
    return 0


def _method_options(args) -> dict:
    keys = ("target", "n_ones", "output", "log", "standardize", "detector_data", "proxy_unknown",
            "proxy_ensemble", "projection_inputs", "threshold_rule", "threshold", "target_tpr", "hidden", "gradient_rep", "k",
            "projection_dim", "combine", "gradient_metric")
    options = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    for key in ("signals", "logit_inputs"):
        if getattr(args, key, None) is not None:
            options[key] = tuple(x.strip() for x in getattr(args, key).split(",") if x.strip())
    return options


def cmd_predict(args) -> int:
    from gradosr.distributed import init_distributed
    from gradosr.images import read_image
    from gradosr.osr import GradientOSR

    osr = GradientOSR.load(args.run, device=init_distributed(args.device))
    clf = osr.classifier
    failed = 0
    ok: list[tuple[str, object]] = []

    def flush() -> None:
        if not ok:
            return
        import torch

        labels, scores = osr.predict(torch.cat([x for _, x in ok]), return_scores=True)
        for (path, _), label, score in zip(ok, labels, scores):
            if label < 0:
                text = "unknown"
            else:
                cid, name = clf.class_ids[label], clf.class_names[label]
                text = str(cid) if name == str(cid) else f"{cid} ({name})"
            print(f"{path}\t{text}\t{score:.6f}", flush=True)
        ok.clear()

    for path in args.files:
        try:
            ok.append((path, clf.inputs(read_image(path, clf.preprocessing))))
        except GradOSRError as exc:
            flush()
            failed += 1
            print(f"{path}\terror\t{exc}", flush=True)
            continue
        if len(ok) >= args.batch_size:
            flush()
    flush()
    return 1 if failed else 0


def _protocol_options(args) -> dict:
    """The resolve_protocol options given besides --protocol (benchmark, ablate)."""
    keys = ("dataset", "known", "unknown", "known_dataset", "unknown_dataset")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _train_overrides(args) -> dict:
    """The training options given on the command line (benchmark, ablate; the seed apart)."""
    keys = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "image_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def cmd_benchmark(args) -> int:
    from gradosr.bench import BenchmarkSettings, run_benchmark
    from gradosr.data.protocols import parse_index_list
    from gradosr.distributed import init_distributed
    from gradosr.evaluation import format_table

    if args.split is not None or args.split_seed is not None:
        raise ConfigError("benchmark takes --splits (e.g. 0-4), not --split/--split-seed")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = BenchmarkSettings(
        protocol=args.protocol, splits=parse_index_list(args.splits, "--splits"), methods=methods,
        out=_out_folder(args.out),
        protocol_args=_protocol_options(args), train_overrides=_train_overrides(args),
        seed=args.seed, preset=args.preset, method_options=_method_options(args), data_dir=args.data_dir,
        device=init_distributed(args.device), progress=not args.no_progress, command=_command_line(args))
    doc = run_benchmark(settings)
    print(format_table(doc["summary"]))
    print(f"results written to {settings.out}/results.json, results.md, results.csv and plots/")
    return 0


def cmd_ablate(args) -> int:
    from gradosr.ablation import AblationSettings, run_ablation, select_variants
    from gradosr.data.protocols import parse_index_list
    from gradosr.distributed import init_distributed

    if args.split is not None or args.split_seed is not None:
        raise ConfigError("ablate takes --splits (e.g. 0-4), not --split/--split-seed")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    select_variants(names)  # unknown names fail before any work
    settings = AblationSettings(
        protocol=args.protocol, splits=parse_index_list(args.splits, "--splits"), variants=names,
        out=_out_folder(args.out),
        protocol_args=_protocol_options(args), train_overrides=_train_overrides(args),
        seed=args.seed, data_dir=args.data_dir, device=init_distributed(args.device), progress=not args.no_progress,
        command=_command_line(args))
    run_ablation(settings)
    print(f"results written to {settings.out}/results.json and results.md")
    return 0


def cmd_evaluate(args) -> int:
    from gradosr.distributed import init_distributed
    from gradosr.evaluate import evaluate_run
    from gradosr.evaluation import format_table, results_document
    from gradosr.checkpoint import atomic_write_json

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    records, info = evaluate_run(Path(args.run), methods, data_dir=args.data_dir, device=init_distributed(args.device),
                                 progress=not args.no_progress)
    doc = results_document(_command_line(args), records, info)
    out = Path(args.json) if args.json else Path(args.run) / "eval.json"
    atomic_write_json(out, doc)
    print(format_table(doc["summary"]))
    print(f"results written to {out}")
    return 0


def _command_line(args) -> str:
    """The command as the user gave it (the argv passed to :func:`main`, else sys.argv)."""
    argv = getattr(args, "argv", None)
    return "gradosr " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


COMMANDS = {"ablate": cmd_ablate, "datasets": cmd_datasets, "train": cmd_train, "fit": cmd_fit, "evaluate": cmd_evaluate,
            "benchmark": cmd_benchmark,
            "predict": cmd_predict}


class _Discard(io.TextIOBase):
    """A text stream that drops what is written (stdout of the ranks other than 0)."""

    def write(self, s: str) -> int:
        return len(s)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else [str(a) for a in argv]
    if args.command is None:
        parser.print_help()
        return 0
    from gradosr import distributed

    rank = distributed.env_rank()
    where = f" (rank {rank})" if rank else ""  # under torchrun every process reports its own errors
    ok = False
    try:
        with contextlib.redirect_stdout(_Discard()) if rank != 0 else contextlib.nullcontext():
            code = COMMANDS[args.command](args)  # only rank 0 prints results
        ok = True
        return code
    except GradOSRError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"gradosr: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the system refused a read or write (permissions, disk full, a file for a folder)
        if getattr(args, "debug", False):
            raise
        print(f"gradosr: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gradosr: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown_distributed(wait=ok)


if __name__ == "__main__":
    sys.exit(main())
