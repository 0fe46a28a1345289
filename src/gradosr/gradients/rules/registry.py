"""The registry of per-layer gradient rules and of the reductions they implement.

A *rule* knows one family of ``torch.nn`` layers: from a layer's captured input ``a``
(shape ``(B, ...)``, the module's first positional input) and the gradient ``g`` of the
summed per-sample losses at its output (shape of the output, ``(B, ...)``), it computes
per-sample quantities of the layer's parameter gradients without forming the per-sample
gradients of the whole model. One rule per layer family and one file per family
(``rules/linear.py``, ``rules/conv.py``, ...), registered with a class decorator, as
Opacus registers its per-sample gradient samplers (Yousefpour et al., "Opacus:
User-Friendly Differential Privacy Library in PyTorch", 2021;
``@register_grad_sampler(nn.Linear)`` in ``opacus.grad_sample``)::

    @register_rule(nn.Linear)
    class LinearRule(LayerRule):
        params = ("weight", "bias")

        def sqnorms(self, m, a, g, want): ...              # reduction SQNORMS
        def projection(self, m, a, g, p_out, p_in): ...    # reduction PROJECTION

A *reduction* is what a rule turns ``(a, g)`` into; each is a method of that name on the
rules that implement it (see :data:`REDUCTIONS` for the signatures):

- :data:`SQNORMS` ``"sqnorms"``: per-sample squared norms of the parameter gradients,
  ``(module, a, g, want) -> {attr: (B,)}`` for the attributes ``want``
  (:func:`gradosr.gradients.squared_norms`);
- :data:`PROJECTION` ``"projection"``: the Kronecker-factored map of the weight gradient
  of LoGra (Choe et al., "What is Your Data Worth to GPT?", 2024),
  ``(module, a, g, p_out, p_in) -> (B, r_out, r_in)`` = ``P_out^T (dJ/dW) P_in`` per
  sample, ``P_out`` ``(O, r_out)`` and ``P_in`` ``(I, r_in)`` or ``None`` for the identity
  (:mod:`gradosr.gradients.projection`).

Hook for later reductions. A reduction that takes *whitened* activations and gradients
(e.g. K-FAC / Fisher-whitened per-sample gradients ``G^{-1/2} (dJ/dW) A^{-1/2}`` with the
Kronecker factors ``A = E[a a^T]`` and ``G = E[g g^T]``, Martens & Grosse 2015, Grosse &
Martens 2016 for convolutions) needs no new capture code: :data:`PROJECTION` already
computes ``L^T (dJ/dW) R`` for ANY factor matrices, so passing ``p_out = G^{-1/2}`` and
``p_in = A^{-1/2}`` gives the whitened gradient. A reduction that needs something else is
declared with :func:`register_reduction` and written as ONE method of that name on each
rule that can do it; :meth:`LayerRule.reduction` raises :class:`MissingReduction` (a
:class:`~gradosr.errors.ConfigError` naming the layer, the rule and what it has) for the
others, and :func:`rule_for` returns ``None`` for them, so that
:func:`gradosr.gradients.squared_norms` sends their parameters to the ``torch.func`` path.

A new layer type is one :class:`LayerRule` subclass in one file of this package (imported
by ``rules/__init__.py``), or, for a user's own module, registered from the user's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from gradosr.errors import ConfigError

__all__ = ["LayerRule", "Match", "MissingReduction", "PROJECTION", "REDUCTIONS", "SQNORMS",
           "match", "register_reduction", "register_rule", "rule_for"]

#: reduction name -> its signature and meaning (what every implementing method returns)
REDUCTIONS: dict[str, str] = {}


def register_reduction(name: str, doc: str) -> str:
    """Declare reduction ``name`` (a method of that name on the rules implementing it)."""
    if not name.isidentifier() or name in vars(LayerRule):
        raise ConfigError(f"reduction name {name!r} must be an identifier that is not a "
                          "LayerRule attribute")
    REDUCTIONS[name] = doc
    return name


class MissingReduction(ConfigError):
    """A layer's rule does not implement the requested reduction."""


class LayerRule:
    """Base class of a layer rule; subclasses are registered with :func:`register_rule`.

    Class attributes:
        params: the parameter attributes of the module the rule handles.
        exact: methods the rule assumes to be the registered ``torch.nn`` class's own; a
            subclass overriding one of them gets no rule (its forward is unknown).
    """

    params: tuple[str, ...] = ("weight", "bias")
    exact: tuple[str, ...] = ("forward",)
    #: the registered classes (set by :func:`register_rule`)
    classes: tuple[type[nn.Module], ...] = ()

    def supports(self, module: nn.Module) -> bool:
        """Whether the rule applies to this module's configuration (default: always)."""
        return True

    def check_input(self, module: nn.Module, a: Tensor) -> str | None:
        """Why the captured input ``a`` cannot be used (a phrase after "layer X"), or None."""
        return None

    def has(self, reduction: str) -> bool:
        """Whether the rule implements ``reduction``."""
        return callable(getattr(self, reduction, None))

    def reduction(self, name: str, module: nn.Module | None = None) -> Callable:
        """The method computing reduction ``name``.

        Raises:
            ConfigError: ``name`` is not a registered reduction.
            MissingReduction: the rule does not implement it.
        """
        if name not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {name!r}; registered: {', '.join(REDUCTIONS)}")
        if not self.has(name):
            layer = type(module).__name__ if module is not None else "/".join(
                c.__name__ for c in self.classes)
            have = [r for r in REDUCTIONS if self.has(r)]
            raise MissingReduction(
                f"the gradient rule {type(self).__name__} of {layer} ({type(self).__module__}) "
                f"has no {name!r} reduction (it has: {', '.join(have) or 'none'}); add a method "
                f"{name}(...) to it: {REDUCTIONS[name]}")
        return getattr(self, name)


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_rule(*classes: type[nn.Module]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: register one instance of the decorated :class:`LayerRule` for the
    module ``classes`` (and their subclasses that keep the :attr:`LayerRule.exact`
    methods); a later registration for the same class replaces the earlier one."""
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise ConfigError(f"register_rule needs nn.Module classes, got {classes!r}")

    def decorate(rule_cls: type[LayerRule]) -> type[LayerRule]:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, LayerRule)):
            raise ConfigError(f"register_rule decorates a LayerRule subclass, got {rule_cls!r}")
        rule_cls.classes = classes
        rule = rule_cls()
        for cls in classes:
            _RULES[cls] = rule
        return rule_cls

    return decorate


@dataclass(frozen=True)
class Match:
    """The registered rule found for a module: ``cls`` is the registered class nearest in
    the module's MRO; ``overridden`` the first :attr:`LayerRule.exact` method the module's
    class overrides (None: the module runs ``cls``'s own forward)."""

    rule: LayerRule
    cls: type[nn.Module]
    overridden: str | None


def match(module: nn.Module) -> Match | None:
    """The registered rule of the nearest registered class in ``type(module).__mro__``."""
    kind = type(module)
    for cls in kind.__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            over = next((m for m in rule.exact if getattr(kind, m) is not getattr(cls, m)), None)
            return Match(rule, cls, over)
    return None


def rule_for(module: nn.Module, reduction: str) -> LayerRule | None:
    """The rule computing ``reduction`` for ``module`` exactly, or None (no rule, a forward
    overridden by a subclass, an unsupported configuration, or the reduction missing)."""
    found = match(module)
    if found is None or found.overridden is not None or not found.rule.supports(module):
        return None
    return found.rule if found.rule.has(reduction) else None


SQNORMS = register_reduction(
    "sqnorms", "sqnorms(module, a, g, want) -> {attr: (B,) per-sample squared norm of the "
    "gradient of parameter attr} for the attributes in want")
PROJECTION = register_reduction(
    "projection", "projection(module, a, g, p_out, p_in) -> (B, r_out, r_in) per-sample "
    "P_out^T (dJ/dW) P_in, with P_out (O, r_out) and P_in (I, r_in), None for the identity")
