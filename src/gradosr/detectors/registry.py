"""The registry of methods, by method id: each one's kind, family and paper.

Kinds:
- ``baseline``: a post-hoc :class:`gradosr.detectors.base.Scorer` fitted on the known
  training outputs of the classifier; ``--methods all`` runs every one;
- ``component``: a scorer that other methods compose (the ``plus`` preset's gradient
  signals); not a benchmark row of its own;
- ``preset``: a :class:`gradosr.osr.GradientOSR` preset (``paper``, ``plus``), fitted
  as a whole estimator.

A scorer class joins with one line, ``@register`` above it (or ``register(cls)``), and
then runs through ``gradosr benchmark`` and the registry's contract test unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gradosr.errors import ConfigError

KINDS = ("baseline", "component", "preset")
#: method families, in the order tables list them
FAMILIES = ("gradient", "feature", "logit", "activation", "detector")


@dataclass(frozen=True)
class MethodInfo:
    """One registered method: ``factory()`` builds it with its default hyperparameters
    (a scorer class, or for a preset a callable returning its name)."""

    method_id: str
    kind: str
    family: str
    paper: str
    factory: Callable


#: method id -> MethodInfo, in registration order (presets first, then the baselines)
METHODS: dict[str, MethodInfo] = {}


def register(cls=None, *, kind: str = "baseline"):
    """Register a Scorer subclass under its ``method_id`` (usable as ``@register`` or
    ``@register(kind="component")``). Re-registering an id replaces it."""
    def add(c):
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        if not getattr(c, "method_id", ""):
            raise ConfigError(f"{c.__name__} has no method_id")
        METHODS[c.method_id] = MethodInfo(c.method_id, kind, c.family, c.paper, c)
        return c

    return add(cls) if cls is not None else add


def register_preset(name: str, family: str, paper: str) -> None:
    """Register a GradientOSR preset as a method id (before the baselines in listings)."""
    entry = MethodInfo(name, "preset", family, paper, lambda: name)
    others = {k: v for k, v in METHODS.items() if k != name}
    presets = {k: v for k, v in others.items() if v.kind == "preset"}
    rest = {k: v for k, v in others.items() if v.kind != "preset"}
    METHODS.clear()
    METHODS.update({**presets, name: entry, **rest})


def unregister(method_id: str) -> None:
    """Remove a method (tests that register a scorer of their own)."""
    METHODS.pop(method_id, None)


def method_ids(kind: str | None = None) -> list[str]:
    """Registered ids of one kind (None: every kind), in registration order."""
    return [m for m, info in METHODS.items() if kind is None or info.kind == kind]


def describe(method_id: str) -> tuple[str, bool]:
    """(family, own) of a method id: ``own`` is True for gradosr's own presets (and the
    ablation variants of a preset, ``<preset>-<change>``, which take its family)."""
    info = METHODS.get(method_id)
    if info is None:
        info = METHODS.get(method_id.split("-", 1)[0])
        if info is None or info.kind != "preset":
            return "", False
    return info.family, info.kind == "preset"


def family_order(method_ids_: list[str]) -> list[str]:
    """``method_ids_`` grouped by family (in :data:`FAMILIES` order), keeping their order
    within a family."""
    rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(method_ids_, key=lambda m: rank.get(describe(m)[0], len(rank)))


def select_methods(tokens: list[str]) -> list[str]:
    """Method ids of ``tokens``: ids, ``all`` (every preset and baseline), or
    ``family:<name>`` (every preset and baseline of that family)."""
    listed = method_ids("preset") + method_ids("baseline")
    out: list[str] = []
    for token in tokens:
        if token == "all":
            hits = listed
        elif token.startswith("family:"):
            fam = token.split(":", 1)[1]
            hits = [m for m in listed if METHODS[m].family == fam]
            if not hits:
                known = sorted({METHODS[m].family for m in listed})
                raise ConfigError(f"no method of family {fam!r}; families: {', '.join(known)}")
        elif token in listed:
            hits = [token]
        else:
            raise ConfigError(f"unknown method {token!r}; available: all, family:<name>, {', '.join(listed)}")
        out += [m for m in hits if m not in out]
    return out


def make_scorer(method_id: str):
    """A new scorer of ``method_id`` with its default hyperparameters."""
    info = METHODS.get(method_id)
    if info is None or info.kind == "preset":
        raise ConfigError(f"unknown scorer {method_id!r}; available: {', '.join(method_ids('baseline'))}")
    return info.factory()
