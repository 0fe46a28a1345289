"""Tests of the layer-rule registry (gradosr.gradients.rules) and of the capture
(gradosr.gradients.capture) with rules registered here for new layer types, in float64
against the naive per-sample loop."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradosr.errors import ConfigError
from gradosr.gradients import capture, engine, per_sample_loss, squared_norms
from gradosr.gradients.projection import layer_widths, projected_gradients
from gradosr.gradients.rules import (
    LayerRule,
    MissingReduction,
    linear,
    match,
    register_reduction,
    register_rule,
    registry,
    rule_for,
)
from gradosr.models import eval_mode

from gradient_reference import TARGETS, Scale, close, naive, naive_gradients, naive_projected


class BareLinear(nn.Module):
    """A linear map without bias that is not an ``nn.Linear``."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


def gain_gradient(a, g):
    """Per-sample gradient of ``gain``: ``sum_t g_t * a_t`` over the leading positions."""
    return (g * a).reshape(a.shape[0], -1, a.shape[-1]).sum(dim=1)


class MeanPositions(nn.Module):
    """``(B, ..., D)`` -> ``(B, D)``: the mean over the positions between."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


def register_gain_grad() -> str:
    """Declare a new reduction "gain_grad" and a rule for Scale that has only it."""
    name = register_reduction("gain_grad", "gain_grad(module, a, g) -> (B, n)")

    @register_rule(Scale)
    class ScaleGradRule(LayerRule):
        params = ("gain",)

        def gain_grad(self, m, a, g):
            return gain_gradient(a, g)

    return name


def model_with(layer_cls, seed=0):
    """Linear -> tanh -> the layer -> tanh -> mean over positions -> Linear head."""
    torch.manual_seed(seed)
    mid = Scale(4) if layer_cls is Scale else BareLinear(4, 4)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), mid, nn.Tanh(), MeanPositions(),
                         nn.Linear(4, 3)).double()


@pytest.fixture
def isolated(monkeypatch):
    """Rules and reductions registered in a test are dropped after it."""
    monkeypatch.setattr(registry, "_RULES", dict(registry._RULES))
    monkeypatch.setattr(registry, "REDUCTIONS", dict(registry.REDUCTIONS))


@pytest.fixture
def fallback_log(monkeypatch):
    """The parameter names given to the torch.func fallback of squared_norms."""
    calls: list[list[str]] = []
    real = engine._func_fn
    monkeypatch.setattr(engine, "_func_fn",
                        lambda model, names, loss: calls.append(list(names)) or real(model, names, loss))
    return calls


def test_builtin_registry():
    assert isinstance(match(nn.Linear(2, 3)).rule, linear.LinearRule)
    assert match(nn.Conv1d(2, 3, 1)).rule is match(nn.Conv2d(2, 3, 1)).rule
    assert match(nn.PReLU()) is None and match(nn.Conv3d(1, 1, 1)) is None
    assert rule_for(nn.LayerNorm(3), "sqnorms") is not None
    assert rule_for(nn.LayerNorm(3), "projection") is None  # no such reduction
    assert rule_for(nn.BatchNorm1d(3, track_running_stats=False), "sqnorms") is None
    assert rule_for(nn.Embedding(5, 2, max_norm=1.0), "sqnorms") is None

    class Keeps(nn.Linear):
        pass

    class Overrides(nn.Linear):
        def forward(self, x):
            return super().forward(2 * x)

    assert rule_for(Keeps(2, 3), "sqnorms") is match(nn.Linear(2, 3)).rule
    found = match(Overrides(2, 3))
    assert found.cls is nn.Linear and found.overridden == "forward"
    assert rule_for(Overrides(2, 3), "sqnorms") is None


def test_missing_and_unknown_reduction_errors():
    ln = nn.LayerNorm(3)
    with pytest.raises(MissingReduction, match=r"LayerNormRule of LayerNorm .*no 'projection' "
                                               r"reduction \(it has: sqnorms\)"):
        match(ln).rule.reduction("projection", ln)
    with pytest.raises(ConfigError, match="unknown reduction 'nope'"):
        match(ln).rule.reduction("nope", ln)
    assert issubclass(MissingReduction, ConfigError)


def test_register_rule_validation(isolated):
    with pytest.raises(ConfigError, match="nn.Module classes"):
        register_rule(int)
    with pytest.raises(ConfigError, match="LayerRule subclass"):
        register_rule(Scale)(object)
    with pytest.raises(ConfigError, match="identifier"):
        register_reduction("reduction", "shadows LayerRule.reduction")


@pytest.mark.parametrize("tname", ["confounding", "predicted", "sigmoid"])
def test_rule_registered_for_new_layer_is_used(isolated, fallback_log, tname):
    """One rule in one place makes a new layer type part of the fast path."""

    @register_rule(Scale)
    class ScaleRule(LayerRule):
        params = ("gain",)

        def sqnorms(self, m, a, g, want):
            return {"gain": gain_gradient(a, g).square().sum(dim=1)}

    model = model_with(Scale)
    x = torch.randn(4, 3, 5, dtype=torch.float64)  # Scale on (B, 3, 4): several positions
    feats, names = squared_norms(model, x, method="fast", **TARGETS[tname])
    assert fallback_log == []
    close(feats, naive(model, x, names, **TARGETS[tname]))


def test_rule_registered_for_new_layer_is_projected(isolated, fallback_log):
    """A new layer type with both reductions: in the squared norms and in the projection."""
    before = [name for name, _ in layer_widths(model_with(BareLinear), 3)]

    @register_rule(BareLinear)
    class BareLinearRule(LayerRule):
        params = ("weight",)
        sqnorms = linear.LinearRule.sqnorms
        projection = linear.LinearRule.projection

    model = model_with(BareLinear)
    assert before == ["0", "5"] and [n for n, _ in layer_widths(model, 3)] == ["0", "2", "5"]
    x = torch.randn(5, 2, 5, dtype=torch.float64)
    for kw in (TARGETS["confounding"], TARGETS["uniform"]):
        close(projected_gradients(model, x, dim=3, batch_size=2, **kw),
              naive_projected(model, x, 3, **kw))
        feats, names = squared_norms(model, x, method="fast", **kw)
        close(feats, naive(model, x, names, **kw))
    assert fallback_log == []


def test_layer_without_reduction_falls_back_to_func(isolated, fallback_log):
    """A rule that lacks "sqnorms": a clear error if asked for it, and squared_norms
    computes that layer's parameters by torch.func, still exactly."""
    gain_grad = register_gain_grad()
    model = model_with(Scale)
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(MissingReduction, match="ScaleGradRule of Scale .*no 'sqnorms'"):
        match(model[2]).rule.reduction("sqnorms", model[2])
    assert rule_for(model[2], "sqnorms") is None and rule_for(model[2], gain_grad) is not None
    feats, names = squared_norms(model, x, method="fast")
    assert fallback_log == [["2.gain"]]
    close(feats, naive(model, x, names))
    # the built-in rules lack the new reduction: a clear error naming it
    with pytest.raises(MissingReduction, match="LinearRule of Linear .*no 'gain_grad'"):
        match(model[0]).rule.reduction(gain_grad, model[0])


def test_new_reduction_runs_through_the_capture(isolated):
    """A new reduction needs one method per rule; the capture runs it unchanged."""
    gain_grad = register_gain_grad()
    model = model_with(Scale)
    mod = model[2]
    x = torch.randn(5, 5, dtype=torch.float64)
    layer = capture.Layer("2", mod, ("gain",), partial(rule_for(mod, gain_grad).gain_grad, mod))
    mod.gain.requires_grad_(False)  # frozen: the capture sets the flag and restores it
    with capture.requiring_grad([mod.gain]), eval_mode(model):
        uses = capture.run(model, [layer], x, per_sample_loss)
    assert not mod.gain.requires_grad and mod.gain.grad is None
    assert capture.verdict(layer, mod.gain, uses) == capture.OK
    expected = torch.stack([grads[0] for grads in naive_gradients(model, x, [mod.gain])])
    close(layer.result, expected)
    assert layer.a is None and layer.out is None  # nothing held after the pass


def test_capture_verdicts_for_reuse_and_outside_use():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)
            self.off = nn.Linear(3, 3)  # run under no_grad: no gradient reaches it

        def forward(self, x):
            with torch.no_grad():
                self.off(x)
            h = self.a(self.a(x))
            return self.b(h) + F.linear(h, self.b.weight) + self.c(h)

    torch.manual_seed(1)
    model = Reuse().double().eval()
    layers = {n: capture.Layer(n, getattr(model, n), ("weight",),
                               partial(linear.LinearRule().sqnorms, getattr(model, n), want=("weight",)))
              for n in ("a", "b", "c", "off")}
    with capture.requiring_grad(m.weight for m in model.children()):
        uses = capture.run(model, list(layers.values()), torch.randn(2, 3, dtype=torch.float64),
                           per_sample_loss)
    verdicts = {n: capture.verdict(layer, layer.module.weight, uses) for n, layer in layers.items()}
    assert verdicts == {"a": capture.CALLED_TWICE, "b": capture.USED_OUTSIDE, "c": capture.OK,
                        "off": capture.ZERO}
