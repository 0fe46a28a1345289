"""The argument parser of the ``gradosr`` command: one sub-parser per command."""

from __future__ import annotations

import argparse

from gradosr.cli.method_flags import add_method_flags


def _add_protocol_args(p: argparse.ArgumentParser, one_split: bool = True) -> None:
    """The protocol options; ``one_split``: --split/--split-seed (train, fit), else
    --splits/--split-seeds (benchmark, ablate)."""
    g = p.add_argument_group("protocol (docs/design.md, Protocols)")
    g.add_argument("--protocol", default="mnist-sample",
                   help="mnist-sample (default), fashion-mnist, mnist, svhn, cifar10, cifar+10, cifar+50, "
                        "tiny-imagenet, custom or cross")
    if one_split:
        g.add_argument("--split", type=int, default=None, help="standard split 0-4 (default 0); for cross: the seed")
        g.add_argument("--split-seed", type=int, default=None, help="a random 6/4 split with this seed instead")
    else:
        g.add_argument("--splits", default=None, help="splits (cross, custom: seeds), e.g. 0-4 or 0,2 (default 0-4)")
        g.add_argument("--split-seeds", default=None,
                       help="random 6/4 class splits with these seeds instead, e.g. 1001,2002 (10-class protocols)")
    g.add_argument("--dataset", default=None,
                   help="dataset of --protocol custom: a name, folder:PATH (an image folder), npz:PATH or a path")
    g.add_argument("--known", default=None, help="known class ids of --protocol custom, e.g. 0,2,4,6")
    g.add_argument("--unknown", default=None, help="unknown class ids of --protocol custom, e.g. 1,3")
    g.add_argument("--known-dataset", default=None,
                   help="--protocol cross: every class of it is known (a name, folder:PATH, npz:PATH or a path)")
    g.add_argument("--unknown-dataset", default=None,
                   help="--protocol cross: unknowns are sampled from its test set: a name, a path, an unlabeled "
                        "folder or array, or synthetic-NAME (gradosr datasets lists them); benchmark: a "
                        "comma-separated list scores several unknown sets on one classifier")
    g.add_argument("--data-dir", default=None, help="data root (default: $GRADOSR_DATA or ./data)")
    g.add_argument("--strict", action="store_true",
                   help="refuse unreadable image files in a folder dataset (default: skip them and say how many)")
    _add_stream_args(g)


def _add_stream_args(g) -> None:
    g.add_argument("--in-memory", action="store_true",
                   help="read a folder dataset into memory (default: index it and decode its images in chunks, "
                        "docs/design.md \"Streaming\")")
    g.add_argument("--workers", type=int, default=None,
                   help="processes decoding a folder dataset's images (default: cores - 1, at most 4; 0: none)")


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_train_args(p: argparse.ArgumentParser, weights: bool = False) -> None:
    g = p.add_argument_group("closed-set training (defaults per dataset, docs/design.md)")
    _add_model_args(g, weights)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--image-size", type=int, default=None,
                   help="model input side (default 28 for lenet on 28×28 data, a user model's data size, else 32); "
                        "images of a folder or array dataset are converted to it")
    g.add_argument("--seed", type=int, default=0,
                   help="training seed, also the method's seed (detector, projections; default 0)")


def _add_model_args(g, weights: bool, head: bool = True) -> None:
    """--model (and --head, --weights): a built-in architecture or the user's own."""
    g.add_argument("--model", default=None,
                   help="lenet, cnn32, resnet18, or your own as package.module:factory (called with num_classes "
                        "and, if it takes it, in_channels; its module must be importable, e.g. on PYTHONPATH)")
    if head:
        g.add_argument("--head", default=None, metavar="NAME",
                       help="the model's classification nn.Linear, when gradosr cannot find it (e.g. classifier.3)")
    if weights:
        g.add_argument("--weights", default=None, metavar="FILE.safetensors",
                       help="an already-trained classifier for --model (safetensors; never a pickle): used instead "
                            "of training; evaluate/predict check it is the run's")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from gradosr.methods.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help=f"{DEFAULT_PRESET} (default: Fisher-whitened gradients and activations of the layers "
                        "below the head + kNN on features + max logit, docs/ablation.md) or paper (Lee & AlRegib's proxy-split MLP as stated)")
    add_method_flags(p)


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
    _add_train_args(p, weights=True)
    _add_method_args(p)
    _add_common_args(p)
    p.add_argument("--out", required=True, help="run folder (classifier/, proxy/, detector/, osr.json)")

    p = sub.add_parser("predict", help="label image files and folders with a fitted run: path, label or unknown, score")
    p.add_argument("paths", nargs="+", metavar="RUN PATH",
                   help="the run folder from gradosr fit, then image files or folders (searched recursively; PNG, "
                        "JPEG, BMP, WebP read with Pillow)")
    _add_run_option(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", default=None, metavar="FILE",
                   help="also write the predictions to FILE.csv or FILE.jsonl: path, label, class name, score, "
                        "threshold, accepted")
    _add_user_model_args(p)
    _add_common_args(p)

    p = sub.add_parser("benchmark", help="every method side by side on the same classifiers, over splits")
    _add_protocol_args(p, one_split=False)
    p.add_argument("--methods", default="all",
                   help="comma-separated method ids, family:<name> (e.g. family:activation), or all (default)")
    p.add_argument("--list-methods", action="store_true",
                   help="print every method id with its family, paper and parameters, and exit")
    p.add_argument("--plot-all", action="store_true",
                   help="ROC/OSCR plots with every method (default: the presets and the five best others)")
    p.add_argument("--out", default=None, help="report folder (runs/, cache/, results.*, plots/); required")
    _add_train_args(p, weights=True)
    _add_method_args(p)
    _add_common_args(p)

    p = sub.add_parser("ablate", help="vary one choice at a time from the paper and plus presets, over splits")
    _add_protocol_args(p, one_split=False)
    p.add_argument("--variants", default="all",
                   help="comma-separated variant names, family prefixes such as plus*, or all (default); "
                        "see docs/ablation.md")
    p.add_argument("--out", required=True, help="folder (runs/, results.json, results.md)")
    p.add_argument("--rerun", action="store_true",
                   help="recompute the variants named even where --out holds their records with the same config "
                        "(after a code change); the classifiers in --out/runs are reused")
    _add_train_args(p)
    _add_common_args(p)

    p = sub.add_parser("evaluate", help="evaluate the methods of a run on its protocol's test set")
    p.add_argument("run", nargs="?", default=None, help="run folder (from gradosr train or fit)")
    _add_run_option(p)
    p.add_argument("--methods", default=None, help="comma-separated method ids, or all (default: the run's fitted presets and msp)")
    p.add_argument("--json", default=None, help="write the results JSON here (default <run>/eval.json)")
    p.add_argument("--data-dir", default=None)
    _add_stream_args(p)
    _add_user_model_args(p)
    _add_common_args(p)
    return parser


def _add_user_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a run of your own model (given again: a run folder never makes gradosr import a module)")
    _add_model_args(g, weights=True, head=False)


def _add_run_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--run-dir", dest="run_option", default=None,
                   help="the run folder as an option (the positional RUN collides with nothing, also under "
                        "torchrun, whose own parser would take --run for --run-path)")


def _version() -> str:
    from gradosr import __version__

    return __version__
