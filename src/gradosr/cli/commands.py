"""The commands of ``gradosr``: ``cmd_<name>(args) -> exit status``."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from gradosr.cli.method_flags import method_options as _method_options
from gradosr.errors import ConfigError
from gradosr.runs import RunLayout


def _out_folder(path: str) -> Path:
    """``--out`` as a Path; ConfigError when it exists and is not a folder (checked before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return out


def _spec_from_args(args):
    from gradosr.data.protocols import resolve_protocol

    return resolve_protocol(args.protocol, split=args.split, split_seed=args.split_seed, dataset=args.dataset,
                            known=args.known, unknown=args.unknown, known_dataset=args.known_dataset,
                            unknown_dataset=args.unknown_dataset)


def _train_config_from_args(args, dataset: str):
    from gradosr.train import default_train_config

    return default_train_config(dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                                optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                                image_size=args.image_size, head=args.head)


def _load_protocol(args, spec):
    from gradosr.data.protocols import load_protocol

    return load_protocol(spec, args.data_dir, image_size=args.image_size, strict=args.strict, **_stream_options(args))


def _stream_options(args) -> dict:
    """How a folder dataset is read (``--in-memory``, ``--workers``): load_protocol's keywords."""
    return {"stream": not getattr(args, "in_memory", False), "num_workers": getattr(args, "workers", None)}


def cmd_datasets(args) -> int:
    from gradosr.data.registry import DATASETS, data_root, locate_dataset
    from gradosr.data.synthetic import GENERATORS, PREFIX

    root = data_root(args.data_dir)
    print(f"data root: {root.resolve()} (set with --data-dir or GRADOSR_DATA)")
    for name, info in DATASETS.items():
        where = locate_dataset(name, args.data_dir)
        if where is not None:
            status = f"found     {where}"
        else:
            status = f"missing   {info.how_to_get}"
        print(f"  {name:<14} {status}")
    print("synthetic outlier sets (--protocol cross --unknown-dataset NAME; generated from the seed, no download):")
    for name, gen in GENERATORS.items():
        print(f"  {PREFIX + name:<22} {gen.description} ({gen.source})")
    print("your own data, wherever a dataset name is accepted: folder:PATH (PATH/<class>/*.png|jpg|jpeg|bmp|webp, "
          "optional train/ and test/), npz:PATH (x_train, y_train, x_test, y_test or x, y), or an existing path")
    from gradosr.distributed import init_distributed, world_size

    device = init_distributed(args.device)
    procs = f", {world_size()} processes (torchrun)" if world_size() > 1 else ""
    print(f"device: {device} (--device {args.device}){procs}")
    return 0


def cmd_train(args) -> int:
    from gradosr.distributed import init_distributed
    from gradosr.runs import ensure_classifier

    spec = _spec_from_args(args)
    config = _train_config_from_args(args, spec.dataset)
    out = _out_folder(args.out) / "classifier"
    device = init_distributed(args.device)
    data = _load_protocol(args, spec)
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
    from gradosr.distributed import init_distributed
    from gradosr.osr import GradientOSR, make_config
    from gradosr.runs import identity_mismatch

    spec = _spec_from_args(args)
    config = _train_config_from_args(args, spec.dataset)
    options = _method_options(args)
    method = make_config(args.preset, seed=args.seed, **options)
    out = _out_folder(args.out)
    if (out / "osr.json").is_file():
        stored = read_json(out / "osr.json")
        same = identity_mismatch(stored, {"config": method.to_dict(), "train": config.to_dict()}) is None
        if same and args.weights is not None:
            from gradosr.models.user import weights_sha256

            clf_json = RunLayout(out).classifier / "model.json"
            same = clf_json.is_file() and read_json(clf_json).get("weights_sha256") == weights_sha256(args.weights)
        if same:
            print(f"{out} already holds this fitted method; nothing to do (gradosr evaluate {out})")
            return 0
    device = init_distributed(args.device)
    data = _load_protocol(args, spec)
    print(f"protocol {spec.label}: known {list(spec.known)}, unknown {list(spec.unknown)}")
    t0 = time.time()
    classifier = None
    if args.weights is not None:
        from gradosr.runs import ensure_classifier

        classifier, _ = ensure_classifier(data, config, RunLayout(out).classifier, device=device,
                                          progress=not args.no_progress, weights=args.weights)
    osr = GradientOSR(args.preset, classifier=classifier, train_config=config, device=device,
                      progress=not args.no_progress, seed=args.seed, **options)
    osr.fit(data, run_dir=out)
    if osr.config_.method == "fusion":
        detail = f"signals {', '.join(osr.config_.fusion.signals)} (k = {osr.method_.detector_.k_})"
    else:
        detail = (f"proxy unknowns (labels) {osr.method_.members_[0].proxy_unknown}, "
                  f"{len(osr.method_.param_names_)} gradient features")
    print(f"fitted {args.preset} in {time.time() - t0:.1f}s: classifier test accuracy "
          f"{osr.classifier_.meta.get('test_acc', float('nan')):.4f}, {detail}, threshold {osr.threshold_:.4g}; "
          f"saved in {out}")
    return 0


def cmd_predict(args) -> int:
    from gradosr.cli.predictions import predict_files

    run, paths = _run_folder(args, args.paths)
    if not paths:
        raise ConfigError("predict needs image files or folders after the run folder: gradosr predict RUN PATH [PATH ...]")
    return predict_files(run, paths, args)


def _protocol_options(args) -> dict:
    """The resolve_protocol options given besides --protocol (benchmark, ablate)."""
    keys = ("dataset", "known", "unknown", "known_dataset", "unknown_dataset")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _split_options(args) -> dict:
    """``splits`` and ``random_splits`` of --splits or --split-seeds (benchmark, ablate)."""
    from gradosr.data.protocols import parse_index_list

    if args.split_seeds is not None:
        if args.splits is not None:
            raise ConfigError("give either --splits or --split-seeds, not both")
        return {"splits": parse_index_list(args.split_seeds, "--split-seeds"), "random_splits": True}
    return {"splits": parse_index_list(args.splits or "0-4", "--splits"), "random_splits": False}


def _train_overrides(args) -> dict:
    """The training options given on the command line (benchmark, ablate; the seed apart)."""
    keys = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "image_size", "head")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def cmd_benchmark(args) -> int:
    from gradosr.evaluation.benchmark import BenchmarkSettings, run_benchmark
    from gradosr.distributed import init_distributed
    from gradosr.evaluation.tables import format_table

    if args.list_methods:
        print(list_methods())
        return 0
    if args.out is None:
        raise ConfigError("benchmark needs --out (the report folder)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = BenchmarkSettings(
        protocol=args.protocol, **_split_options(args), methods=methods, out=_out_folder(args.out),
        weights=args.weights, strict=args.strict, **_stream_options(args),
        protocol_args=_protocol_options(args), train_overrides=_train_overrides(args),
        seed=args.seed, preset=args.preset, method_options=_method_options(args), data_dir=args.data_dir,
        device=init_distributed(args.device), progress=not args.no_progress, command=_command_line(args),
        plot_all=args.plot_all)
    doc = run_benchmark(settings)
    docs = doc if len(settings.unknown_sets()) > 1 else {None: doc}
    for unknown, d in docs.items():
        if unknown is not None:
            print(f"unknown set {unknown}:")
        print(format_table(d["summary"]))
        print(f"results written to {settings.layout.results(unknown)}/results.json, results.md, results.csv "
              "and plots/")
    return 0


def list_methods() -> str:
    """Every benchmark method: id, family, kind, paper and parameters, grouped by family."""
    from dataclasses import replace

    from gradosr.detectors.registry import METHODS, family_order, method_ids
    from gradosr.evaluation.tables import render
    from gradosr.methods.config import config_options, make_config

    rows = []
    for m in family_order(method_ids("preset") + method_ids("baseline")):
        info = METHODS[m]
        if info.kind == "preset":  # what the preset changes from the paper as stated
            diff = config_options(replace(make_config(m), preset="paper"))
            params = f"GradientOSR preset; {diff or 'the paper as stated'}"
        else:
            params = str(info.factory().params)
        rows.append([m, info.family, "gradosr" if info.kind == "preset" else "other", info.paper, params])
    return render(["id", "family", "own", "paper", "parameters"], rows, fmt="text")


def cmd_ablate(args) -> int:
    from gradosr.evaluation.ablation import AblationSettings, run_ablation, select_variants
    from gradosr.distributed import init_distributed

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    select_variants(names)  # unknown names fail before any work
    settings = AblationSettings(
        protocol=args.protocol, **_split_options(args), variants=names, rerun=args.rerun, out=_out_folder(args.out),
        strict=args.strict, **_stream_options(args),
        protocol_args=_protocol_options(args), train_overrides=_train_overrides(args),
        seed=args.seed, data_dir=args.data_dir, device=init_distributed(args.device), progress=not args.no_progress,
        command=_command_line(args))
    run_ablation(settings)
    print(f"results written to {settings.out}/results.json and results.md")
    return 0


def _run_folder(args, extra: list[str] | None = None) -> tuple[Path, list[str]]:
    """The run folder (positional, or --run/--run-dir) and the remaining positional paths."""
    paths = list(extra or [])
    if args.run_option is not None:
        return Path(args.run_option), paths
    if getattr(args, "run", None) is not None:
        return Path(args.run), paths
    if paths:
        return Path(paths[0]), paths[1:]
    raise ConfigError(f"{args.command} needs the run folder: gradosr {args.command} RUN")


def cmd_evaluate(args) -> int:
    from gradosr.distributed import init_distributed
    from gradosr.evaluation.run_eval import evaluate_run
    from gradosr.evaluation.records import results_document
    from gradosr.evaluation.tables import format_table
    from gradosr.checkpoint import atomic_write_json

    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    run, _ = _run_folder(args)
    records, info = evaluate_run(run, methods, data_dir=args.data_dir, device=init_distributed(args.device),
                                 progress=not args.no_progress, model_ref=args.model, weights=args.weights,
                                 **_stream_options(args))
    doc = results_document(_command_line(args), records, info)
    out = Path(args.json) if args.json else RunLayout(run).eval_json
    atomic_write_json(out, doc)
    print(format_table(doc["summary"]))
    print(f"results written to {out}")
    return 0


def _command_line(args) -> str:
    """The command as the user gave it (the argv passed to :func:`main`, else sys.argv)."""
    argv = getattr(args, "argv", None)
    return "gradosr " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
