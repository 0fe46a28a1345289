"""What a scorer reads of one trained classifier, for N samples: :class:`ScorerInputs`.

One typed object for every method (baselines, the paper's MLP detector, the fused
``plus`` detector and its signals). It says what was computed and what was not: a
scorer asks for a field with :meth:`ScorerInputs.get`, and a field that was not
computed raises one clear :class:`gradosr.errors.DataError` naming it, never an
``AttributeError`` or a ``None`` from deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from gradosr.errors import DataError

#: the tensor fields with one row per sample
_ROW_FIELDS = ("logits", "features", "inputs")
#: the dicts of named per-sample tensors
_DICT_FIELDS = ("activations", "activation_grads", "gradients")


@dataclass
class ScorerInputs:
    """What a classifier computes for N samples (every tensor on the CPU unless noted).

    Attributes:
        logits: float N×K.
        features: float N×D, the input of the classification head (penultimate features).
        inputs: float N×C×H×W model inputs (any device), for the methods that run the
            model themselves (ODIN, GradUnc); None when no method needs them.
        model: the classifier (an ``nn.Module`` mapping inputs to logits), or None.
        head_weight, head_bias: the head's weight K×D and bias K (None: not read).
        activations: named intermediate activations, name -> N×… tensor.
        activation_grads: gradients of a loss with respect to those activations.
        gradients: named gradient representations, name -> N×P tensor (for example
            ``logit_grad``, the logit gradient g N×K of the confounding loss, ``norms``,
            the paper's per-parameter squared norms, ``projection``, a projected full
            gradient).
    """

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    model: nn.Module | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        for name in _ROW_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return len(value)
        for name in _DICT_FIELDS:
            for value in getattr(self, name).values():
                return len(value)
        return 0

    def computed(self) -> list[str]:
        """The names :meth:`get` answers: set fields, then ``gradients`` keys, then
        ``activations:<name>`` and ``activation_grads:<name>``."""
        names = [f.name for f in fields(self) if f.name not in _DICT_FIELDS and getattr(self, f.name) is not None]
        names += list(self.gradients)
        names += [f"{d}:{k}" for d in ("activations", "activation_grads") for k in getattr(self, d)]
        return names

    def get(self, name: str, what: str = "this method") -> object:
        """The field ``name`` (a field name, a ``gradients`` key, or
        ``activations:<layer>`` / ``activation_grads:<layer>``); DataError when it was
        not computed."""
        if ":" in name:
            group, key = name.split(":", 1)
            value = getattr(self, group, {}).get(key) if group in _DICT_FIELDS else None
        elif name in _DICT_FIELDS:
            value = getattr(self, name) or None
        elif name in {f.name for f in fields(self)}:
            value = getattr(self, name)
        else:
            value = self.gradients.get(name)
        if value is None:
            raise DataError(f"{what} needs {name!r}, which was not computed (computed: "
                            f"{', '.join(self.computed()) or 'nothing'})")
        return value

    def rows(self, rows: slice) -> "ScorerInputs":
        """The samples ``rows`` (the model and the head are shared)."""
        def cut(v):
            return v[rows] if v is not None else None

        return ScorerInputs(cut(self.logits), cut(self.features), cut(self.inputs), self.model, self.head_weight,
                            self.head_bias, *({k: v[rows] for k, v in getattr(self, d).items()} for d in _DICT_FIELDS))

    @classmethod
    def concat(cls, parts: list["ScorerInputs"]) -> "ScorerInputs":
        """The rows of ``parts`` one after another (model and head of the first)."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat([torch.as_tensor(v) for v in values])

        dicts = [{k: torch.cat([torch.as_tensor(getattr(p, d)[k]) for p in parts]) for k in getattr(first, d)}
                 for d in _DICT_FIELDS]
        return cls(cat("logits"), cat("features"), cat("inputs"), first.model, first.head_weight, first.head_bias,
                   *dicts)
