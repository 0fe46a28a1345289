"""Per-layer gradient rules, one file per layer family, and their registry.

- :mod:`.registry`: :class:`LayerRule`, :func:`register_rule`, the reductions
  (:data:`SQNORMS`, :data:`PROJECTION`, :func:`register_reduction`) and the lookup
  (:func:`match`, :func:`rule_for`);
- :mod:`.linear` (``nn.Linear``), :mod:`.conv` (``nn.Conv1d``, ``nn.Conv2d``),
  :mod:`.norm` (BatchNorm on running statistics, ``nn.LayerNorm``, ``nn.GroupNorm``),
  :mod:`.embedding` (``nn.Embedding``): importing this package registers them;
- :mod:`.per_sample`: the per-sample tensor helpers and memory budget they share.

To support a new layer type, write a :class:`LayerRule` subclass with one method per
reduction it can compute, decorated with ``@register_rule(TheModuleClass)``, in a new file
here imported below (or anywhere in user code, imported before the gradients are computed).
"""

from gradosr.gradients.rules import conv, embedding, linear, norm  # noqa: F401  (registers)
from gradosr.gradients.rules.registry import (
    PROJECTION,
    REDUCTIONS,
    SQNORMS,
    LayerRule,
    Match,
    MissingReduction,
    match,
    register_reduction,
    register_rule,
    rule_for,
)

__all__ = ["LayerRule", "Match", "MissingReduction", "PROJECTION", "REDUCTIONS", "SQNORMS",
           "match", "register_reduction", "register_rule", "rule_for"]
