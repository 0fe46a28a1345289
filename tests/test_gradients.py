"""Tests of the per-sample gradient engine (gradosr.gradients) against naive autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradosr.errors import ConfigError, DataError
from gradosr.gradients import engine, per_sample_loss, select_parameters, squared_norms
from gradosr.gradients.targets import confounding_loss, predicted_loss, uniform_loss
from gradosr.models import build_model

from gradient_reference import TARGETS, close, naive


class Tiny(nn.Module):
    """Conv-BN-ReLU-Dropout-MLP with a frozen conv bias; input (B, 2, 6, 6), 3 classes."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(64, 8)
        self.head = nn.Linear(8, num_classes)
        self.conv.bias.requires_grad_(False)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))).flatten(1))
        return self.head(torch.tanh(self.fc(h)))


def prime(model, x_shape, seed=0):
    """float64, random BN affine parameters and non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
        model.train()
        for _ in range(2):
            model(torch.randn(4, *x_shape, generator=gen, dtype=torch.float64) + 0.5)
    return model


MODELS = {
    "lenet": (lambda: build_model("lenet", 4), (1, 28, 28)),
    "cnn32": (lambda: build_model("cnn32", 5), (1, 16, 16)),
    "resnet18": (lambda: build_model("resnet18", 3, in_channels=3), (3, 16, 16)),
    "tiny": (lambda: Tiny(), (2, 6, 6)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def primed(request):
    torch.manual_seed(0)
    factory, shape = MODELS[request.param]
    model = prime(factory(), shape)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return request.param, model, x


def training_flags(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("tname", list(TARGETS))
def test_models_match_naive_loop(primed, tname):
    name, model, x = primed
    kw = TARGETS[tname]
    model.train()
    next(iter(model.children())).eval()  # a mixed state, to be restored exactly
    flags = training_flags(model)
    grads_before = [p.grad for p in model.parameters()]
    req_before = [p.requires_grad for p in model.parameters()]

    feats, names = squared_norms(model, x, **kw)

    assert training_flags(model) == flags
    assert [p.grad for p in model.parameters()] == grads_before
    assert [p.requires_grad for p in model.parameters()] == req_before
    assert names == [n for n, _ in model.named_parameters()]
    assert feats.shape == (3, len(names)) and feats.dtype == torch.float64
    close(feats, naive(model, x, names, **kw))
    assert (feats > 0).any()


# ---- losses ----------------------------------------------------------------------------


def bce_reference(z, n, output):
    p = torch.softmax(z, 1) if output == "softmax" else torch.sigmoid(z)
    order = torch.argsort(z, dim=1, descending=True, stable=True)[:, :n]
    y = torch.zeros_like(z).scatter(1, order, 1.0)
    return -(y * p.log() + (1 - y) * (1 - p).log()).sum(1)


@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n", [None, 0, 2, 3, 5])
def test_confounding_loss_matches_probability_formula(output, n):
    z = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    expected = bce_reference(z, 5 if n is None else n, output)
    close(confounding_loss(z, n_ones=n, output=output), expected)
    close(per_sample_loss(z, n_ones=n, output=output), expected)


def test_confounding_ties_take_lowest_indices():
    z = torch.tensor([[1.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(z, 1)
    expected = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1)
    close(confounding_loss(z, n_ones=2), expected)


def test_predicted_and_uniform_losses():
    z = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    p = torch.softmax(z, 1)
    close(predicted_loss(z), -p.gather(1, z.argmax(1, keepdim=True)).log().squeeze(1))
    close(per_sample_loss(z, "predicted"), predicted_loss(z))
    close(uniform_loss(z), -(p.log()).mean(1))
    close(per_sample_loss(z, "uniform"), uniform_loss(z))


def test_softmax_full_confounding_gradient_is_n_p_minus_one():
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(confounding_loss(z).sum(), z)
    close(g, 5 * torch.softmax(z.detach(), 1) - 1)


@pytest.mark.parametrize("kw", [TARGETS[t] for t in ("confounding", "confounding_n2",
                                                     "sigmoid", "uniform")])
def test_float32_large_logit_gap_loss(kw):
    z64 = torch.tensor([[50.0, 0.0, -1.0], [-3.0, 47.0, 0.5]], dtype=torch.float64)
    z32 = z64.float().requires_grad_(True)
    loss32 = per_sample_loss(z32, **kw)
    (g32,) = torch.autograd.grad(loss32.sum(), z32)
    z64.requires_grad_(True)
    loss64 = per_sample_loss(z64, **kw)
    (g64,) = torch.autograd.grad(loss64.sum(), z64)
    assert torch.isfinite(loss32).all() and torch.isfinite(g32).all()
    close(loss32.double(), loss64.detach(), rtol=1e-5, atol=0)
    close(g32.double(), g64, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kw", [TARGETS[t] for t in ("confounding", "confounding_n2",
                                                     "sigmoid", "uniform")])
def test_float32_large_logit_gap_features(kw):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([50.0, 0.0, -1.0]))
    x = torch.randn(5, 4)
    model64 = copy.deepcopy(model).double()
    for method in ("func", "head"):
        params = None if method == "func" else ["2.weight", "2.bias"]
        f32, _ = squared_norms(model, x, params=params, method=method, **kw)
        f64, _ = squared_norms(model64, x.double(), params=params, method=method, **kw)
        assert f32.dtype == torch.float32 and torch.isfinite(f32).all()
        close(f32.double(), f64, rtol=1e-5, atol=0)


# ---- the closed-form head path -----------------------------------------------------------


@pytest.mark.parametrize("tname", list(TARGETS))
def test_head_path_equals_func_path_and_naive(tname):
    kw = TARGETS[tname]
    model = prime(build_model("lenet", 4), (1, 28, 28))
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    for params in (["head.weight", "head.bias"], ["head.weight"], ["head.bias"]):
        head, names = squared_norms(model, x, params=params, method="head", **kw)
        func, _ = squared_norms(model, x, params=params, method="func", **kw)
        assert names == params
        close(head, func)
        close(head, naive(model, x, names, **kw))


def test_auto_uses_head_path_for_head_only(monkeypatch):
    model = prime(Tiny(), (2, 6, 6))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    expected = naive(model, x, ["head.weight", "head.bias"])

    def no_func(*a, **k):
        raise AssertionError("general path used")

    monkeypatch.setattr(engine, "_func_fn", no_func)
    feats, _ = squared_norms(model, x, params=lambda n, p: n.startswith("head."))
    close(feats, expected)


def test_head_path_falls_back_when_logits_are_not_head_output():
    class Scaled(Tiny):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = prime(Scaled(), (2, 6, 6))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    names = ["head.weight", "head.bias"]
    feats, _ = squared_norms(model, x, params=names)
    close(feats, naive(model, x, names))
    with pytest.raises(ConfigError):
        squared_norms(model, x, params=names, method="head")
    with pytest.raises(ConfigError):
        squared_norms(model, x, params=["fc.weight"], method="head")


def test_batch_statistics_model_uses_general_path():
    model = Tiny().double()
    model.bn = nn.BatchNorm2d(4, track_running_stats=False).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    names = ["head.weight", "head.bias"]
    feats, _ = squared_norms(model, x, params=names)
    close(feats, naive(model, x, names))
    with pytest.raises(ConfigError):
        squared_norms(model, x, params=names, method="head")


@pytest.mark.parametrize("method", ["func", "head"])
def test_chunk_size_does_not_change_result(method):
    model = prime(Tiny(), (2, 6, 6))
    x = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    params = None if method == "func" else ["head.weight", "head.bias"]
    ref, _ = squared_norms(model, x, params=params, method=method)
    for cs in (1, 2, 7):
        feats, _ = squared_norms(model, x, params=params, method=method, chunk_size=cs)
        close(feats, ref, rtol=1e-13, atol=0)


def test_default_chunk_bounds_memory():
    assert engine._func_chunk(Tiny(), select_parameters(Tiny())) == 32
    big = nn.Linear(4096, 4096)  # 16.8M elements: 3 samples per chunk
    assert engine._func_chunk(big, ["weight", "bias"]) == engine.FUNC_BUDGET // (4096 * 4097)


# ---- selection, shapes, dtypes, errors ---------------------------------------------------


def test_parameter_selection():
    model = prime(Tiny(), (2, 6, 6))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    full, all_names = squared_norms(model, x)
    assert all_names == select_parameters(model) == [n for n, _ in model.named_parameters()]
    assert "conv.bias" in all_names  # frozen parameters are included

    names = select_parameters(model, ["head.bias", "conv.weight"])
    assert names == ["conv.weight", "head.bias"]  # named_parameters() order
    feats, got = squared_norms(model, x, params=["head.bias", "conv.weight"])
    assert got == names
    close(feats, full[:, [all_names.index(n) for n in names]])

    pred = lambda n, p: not p.requires_grad or n.startswith("bn.")  # noqa: E731
    feats, got = squared_norms(model, x, params=pred)
    assert got == ["conv.bias", "bn.weight", "bn.bias"]
    close(feats, full[:, [all_names.index(n) for n in got]])

    with pytest.raises(ConfigError, match="conv.weight"):
        select_parameters(model, ["nope"])
    with pytest.raises(ConfigError):
        squared_norms(model, x, params=lambda n, p: False)
    with pytest.raises(ConfigError):
        squared_norms(model, x, params=[])


def test_empty_batch_and_dtype_device():
    model = prime(Tiny(), (2, 6, 6))
    feats, names = squared_norms(model, torch.empty(0, 2, 6, 6))
    assert feats.shape == (0, len(names)) and feats.dtype == torch.float64
    x = torch.randn(2, 2, 6, 6)  # float32 input into a float64 model
    feats, names = squared_norms(model, x)
    assert feats.dtype == torch.float64
    close(feats, naive(model, x.double(), names))
    with torch.no_grad():  # works under no_grad too, on both paths
        close(squared_norms(model, x)[0], feats)
        head = ["head.weight", "head.bias"]
        close(squared_norms(model, x, params=head)[0], feats[:, [names.index(n) for n in head]])


def test_invalid_options_raise_config_error():
    model = Tiny()
    x = torch.randn(2, 2, 6, 6)
    z = torch.randn(2, 3)
    for n in (1, -1, 4, 2.0, True):
        with pytest.raises(ConfigError):
            confounding_loss(z, n_ones=n)
        with pytest.raises(ConfigError):
            squared_norms(model, x, n_ones=n)
    bad = [dict(target="nope"), dict(output="tanh"), dict(method="nope"), dict(chunk_size=0)]
    for kw in bad:
        with pytest.raises(ConfigError):
            squared_norms(model, x, **kw)
    with pytest.raises(ConfigError):
        per_sample_loss(z, target="nope")


def test_invalid_inputs_raise_data_error():
    model = Tiny()
    for x in (torch.zeros(2, 2, 6, 6, dtype=torch.long), torch.zeros(2),
              torch.full((2, 2, 6, 6), float("nan")), torch.full((2, 2, 6, 6), float("inf"))):
        with pytest.raises(DataError):
            squared_norms(model, x)
    for z in (torch.zeros(3), torch.zeros(3, 1), torch.zeros(2, 3, 4)):
        with pytest.raises(DataError):
            per_sample_loss(z)
    one_logit = nn.Sequential(nn.Linear(4, 1))
    flat = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))
    for m in (one_logit, flat):
        for method in ("auto", "func"):
            with pytest.raises(DataError):
                squared_norms(m, torch.randn(2, 4), method=method)
