"""Metadata of configuration fields: what the command line generates its flags from.

A config dataclass declares each field with :func:`option`, giving its help text and,
where the field takes one of a few values, its choices. The CLI
(:mod:`gradosr.cli.method_flags`) turns every such field into a flag whose default is
"the preset's value", so the config modules are the one place that defines an option.
"""

from __future__ import annotations

from dataclasses import MISSING, field

#: how a field's command-line value is read
KINDS = ("int", "float", "str", "bool", "csv")


def option(default=MISSING, *, help: str, choices: tuple | None = None, kind: str | None = None,
           default_factory=MISSING, cli: bool = True):
    """A dataclass field with CLI metadata.

    Args:
        help: one line for ``--help``.
        choices: the allowed values (validated by the config too).
        kind: ``int``, ``float``, ``str``, ``bool`` or ``csv`` (a comma-separated tuple);
            None: inferred from the default (needed when the default is None).
        cli: False for fields that are not command-line flags (set another way).
    """
    if kind is None:
        sample = default_factory() if default_factory is not MISSING else default
        kind = {bool: "bool", int: "int", float: "float", str: "str", tuple: "csv"}.get(type(sample))
    if kind not in KINDS:
        raise ValueError(f"option kind must be one of {KINDS}, got {kind!r}")
    meta = {"help": help, "choices": tuple(choices) if choices else None, "kind": kind, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)
