"""The method flags of ``gradosr fit`` and ``gradosr benchmark``, generated from the
config's field metadata (:func:`gradosr.methods.config.option_fields`, declared with
:func:`gradosr.options.option`): one flag per option, its choices and help from the
config module, its default "the preset's value".

Flag names: ``--<field>`` (``--hidden``, ``--target``, ``--k``) when exactly one section
has the field and no training flag takes the name; otherwise ``--<section>-<field>``
(``--detector-batch-size``, ``--extraction-batch-size``, ``--detector-lr``): ``--batch-size``,
``--lr``, ``--weight-decay`` and ``--seed`` stay the training flags. A boolean option
that is on by default is turned off with ``--no-<field>`` (``--no-log``).
"""

from __future__ import annotations

import argparse
from collections import Counter

#: names the closed-set training flags take (:mod:`gradosr.cli.parser`)
TRAINING_FLAGS = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "image_size", "seed")


def method_flags() -> list[tuple[str, str, object]]:
    """(flag, option name, dataclass field) of every command-line option."""
    from gradosr.methods.config import option_fields

    options = [(name, f) for name, f in option_fields() if f.metadata.get("cli", False)]
    counts = Counter(name.split("__")[-1] for name, _ in option_fields())
    out = []
    for name, f in options:
        flat = name.split("__")[-1]
        spelled = flat if counts[flat] == 1 and flat not in TRAINING_FLAGS else name.replace("__", "_")
        if f.metadata["kind"] == "bool" and f.default is True:
            spelled = "no_" + spelled
        out.append(("--" + spelled.replace("_", "-"), name, f))
    return out


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """Add every method flag to ``parser`` (one argument group)."""
    g = parser.add_argument_group("method options (default: the preset's value)")
    for flag, name, f in method_flags():
        meta = f.metadata
        kind, choices, text = meta["kind"], meta["choices"], meta["help"]
        if kind == "bool":
            g.add_argument(flag, dest=name, action="store_false" if f.default is True else "store_true",
                           default=None, help=text)
        elif kind == "csv":
            among = f"; among {', '.join(choices)}" if choices else ""
            g.add_argument(flag, dest=name, default=None, type=_csv, metavar="A,B", help=text + among)
        else:
            g.add_argument(flag, dest=name, default=None, type={"int": int, "float": float, "str": str}[kind],
                           choices=choices, metavar=None if choices else {"int": "N", "float": "X", "str": "S"}[kind],
                           help=text)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def method_options(args: argparse.Namespace) -> dict:
    """The method options given on the command line, by option name (nested names for
    section fields: ``detector__hidden``)."""
    return {name: getattr(args, name) for _, name, _ in method_flags() if getattr(args, name, None) is not None}
