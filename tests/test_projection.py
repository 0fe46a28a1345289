"""Tests of the LoGra projected per-sample gradients (gradosr.gradients.projection)
against a naive per-sample autograd loop projected explicitly, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradosr.errors import ConfigError, DataError
from gradosr.gradients import per_sample_loss
from gradosr.gradients.projection import (
    projected_gradients,
    projection_matrices,
    projection_size,
)
from gradosr.models import LeNet
from gradient_reference import TARGETS, naive_projected

def close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def tiny_cnn(seed=0):
    """1x8x8 inputs: conv (pad 1) -> ReLU -> conv (stride 2) -> Linear -> in-place ReLU
    -> Linear. With dim=4: conv1 3x9 and conv2 4x27 have an unprojected output side,
    fc1 5x36 both sides projected, fc2 3x5 only its input side."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(),
        nn.Linear(36, 5), nn.ReLU(inplace=True),
        nn.Linear(5, 3),
    ).double()


class Mixed(nn.Module):
    """Reflect padding, dilation, grouped convs (projected and identity output side),
    Conv1d, a Linear on 3-D input, a Linear on a constant buffer, one on a learned
    token, a layer whose output is discarded and a layer never called. Inputs 2x8x8."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(6, 6, 3, groups=3, dilation=2, padding=2)
        self.c3 = nn.Conv2d(6, 4, 3, groups=2, stride=2)
        self.c4 = nn.Conv1d(4, 5, 3, padding=1)
        self.seq = nn.Linear(5, 6)
        self.const = nn.Linear(7, 6)
        self.tok = nn.Linear(3, 6)
        self.token = nn.Parameter(torch.randn(1, 3))
        self.register_buffer("c", torch.randn(1, 7))
        self.discarded = nn.Linear(6, 2)
        self.unused = nn.Linear(7, 7)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))  # (B, 4, 3, 3)
        h = torch.tanh(self.c4(h.flatten(2)))  # (B, 5, 9)
        h = torch.tanh(self.seq(h.transpose(1, 2))).mean(dim=1)  # (B, 6)
        b = x.shape[0]
        h = h * self.const(self.c.expand(b, -1)) + self.tok(self.token.expand(b, -1))
        self.discarded(h)
        return self.head(h)


@pytest.mark.parametrize("kw", TARGETS.values(), ids=TARGETS.keys())
def test_tiny_cnn_matches_naive(kw):
    model = tiny_cnn()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mats = projection_matrices(model, 4, seed=3)
    sides = [(name, p_out is None, p_in is None) for name, p_out, p_in in mats]
    assert sides == [("0", True, False), ("2", True, False), ("4", False, False),
                     ("6", True, False)]
    got = projected_gradients(model, x, dim=4, seed=3, batch_size=3, **kw)
    assert got.dtype == torch.float64 and got.shape == (7, projection_size(model, 4))
    assert got.shape[1] == 3 * 4 + 4 * 4 + 4 * 4 + 3 * 4
    close(got, naive_projected(model, x, 4, seed=3, **kw))


@pytest.mark.parametrize("kw", [TARGETS["confounding"], TARGETS["predicted"]],
                         ids=["confounding", "predicted"])
def test_mixed_layers_match_naive(kw):
    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    mats = {name: (p_out, p_in) for name, p_out, p_in in projection_matrices(model, 4)}
    assert mats["c3"][0] is None and mats["c3"][1] is not None  # grouped, identity rows
    assert mats["c2"][0] is not None  # grouped, projected rows
    got = projected_gradients(model, x, dim=4, batch_size=2, **kw)
    close(got, naive_projected(model, x, 4, **kw))
    # the discarded and the never-called layers contribute zeros
    bounds, lo = {}, 0
    for name, (p_out, p_in) in mats.items():
        w = model.get_submodule(name).weight
        hi = lo + ((w.shape[0] if p_out is None else p_out.shape[1])
                   * (w[0].numel() if p_in is None else p_in.shape[1]))
        bounds[name], lo = (lo, hi), hi
    assert lo == got.shape[1]
    for name in ("discarded", "unused"):
        assert torch.count_nonzero(got[:, slice(*bounds[name])]) == 0
    for name in ("const", "tok", "head"):
        assert torch.count_nonzero(got[:, slice(*bounds[name])]) > 0


def test_no_projection_is_full_gradient():
    model = tiny_cnn(seed=2)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert all(p_out is None and p_in is None for _, p_out, p_in in projection_matrices(model, 64))
    got = projected_gradients(model, x, dim=64)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model.eval()
    rows = []
    for i in range(4):
        loss = per_sample_loss(model(x[i:i + 1])).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, weights)]))
    close(got, torch.stack(rows).detach())


def test_inner_products_preserved_in_expectation():
    """E[<Pg_a, Pg_b>] = <g_a, g_b> (E[P P^T] = Id): the mean over 20 seeds lies within 4
    standard errors of the exact value (deterministic seeds: not flaky)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 80), nn.Tanh(), nn.Linear(80, 3)).double()
    x = torch.randn(2, 100, dtype=torch.float64)
    x[1] = x[0] + 0.5 * x[1]  # correlated gradients: a clearly non-zero inner product
    full = projected_gradients(model, x, dim=1000)  # no projection: the full gradients
    exact = torch.stack([full[0] @ full[1], full[0] @ full[0]])
    cos = torch.cosine_similarity(full[0], full[1], dim=0)
    est, cosines = [], []
    for seed in range(20):
        g = projected_gradients(model, x, dim=64, seed=seed)
        assert g.shape[1] == 64 * 64 + 3 * 64
        est.append(torch.stack([g[0] @ g[1], g[0] @ g[0]]))
        cosines.append(torch.cosine_similarity(g[0], g[1], dim=0))
    est = torch.stack(est)
    se = est.std(dim=0) / math.sqrt(len(est))
    assert torch.all((est.mean(dim=0) - exact).abs() <= 4 * se)
    assert torch.all(se < 0.1 * exact.abs())  # the check is not vacuous
    assert (torch.stack(cosines).mean() - cos).abs() < 0.05


def test_deterministic_and_batch_size_invariant():
    model = tiny_cnn()
    x = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    a = projected_gradients(model, x, dim=4, seed=5)
    assert torch.equal(a, projected_gradients(model, x, dim=4, seed=5))
    assert not torch.allclose(a, projected_gradients(model, x, dim=4, seed=6))
    close(a, projected_gradients(model, x, dim=4, seed=5, batch_size=2))
    close(a[3:4], projected_gradients(model, x[3:4], dim=4, seed=5))


def test_model_state_untouched():
    model = tiny_cnn()
    model.train()
    model[2].training = False
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    marker = torch.ones_like(model[6].weight)
    model[6].weight.grad = marker
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    flags = [m.training for m in model.modules()]
    with torch.no_grad():  # the caller's grad mode does not matter
        got = projected_gradients(model, x, dim=4)
    assert [m.training for m in model.modules()] == flags
    assert flags == [True, True, True, False, True, True, True, True]
    assert not model[0].weight.requires_grad and not model[4].bias.requires_grad
    assert model[4].weight.requires_grad
    assert model[6].weight.grad is marker and torch.equal(marker, torch.ones_like(marker))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "6.weight")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    close(got, naive_projected(model, x, 4))  # in eval mode (the naive loop sets it)


def test_empty_and_invalid_inputs():
    model = tiny_cnn()
    p = projection_size(model, 4)
    empty = projected_gradients(model, torch.zeros(0, 1, 8, 8, dtype=torch.float64), dim=4)
    assert empty.shape == (0, p) and empty.dtype == torch.float64
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        projected_gradients(model, x, dim=4)
    with pytest.raises(DataError):
        projected_gradients(model, torch.ones(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(DataError):
        projected_gradients(model, torch.ones(8))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="dim"):
            projected_gradients(model, x[:1], dim=bad)
    with pytest.raises(ConfigError, match="batch_size"):
        projected_gradients(model, x[:1], batch_size=0)
    with pytest.raises(ConfigError, match="target"):
        projected_gradients(model, x[:1], target="nope")
    with pytest.raises(ConfigError):
        projection_size(model, 0)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.other = nn.Linear(4, 3)
        self.other.weight = self.fc.weight

    def forward(self, x):
        return self.fc(x) + self.other(x)


class Outside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + x[:, :3] @ self.fc.weight[:, :3].T


class InputModified(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = x * 2
        z = self.fc(h)
        h.add_(1)
        return z + h[:, :3]


class Custom(nn.Linear):
    def forward(self, x):
        return super().forward(2 * x)


def test_refused_models():
    x = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="called more than once"):
        projected_gradients(Twice(), x)
    with pytest.raises(ConfigError, match="shared"):
        projected_gradients(Tied(), x)
    with pytest.raises(ConfigError, match="outside"):
        projected_gradients(Outside(), x)
    with pytest.raises(ConfigError, match="modified in place"):
        projected_gradients(InputModified(), x)
    with pytest.raises(ConfigError, match="overrides the forward"):
        projected_gradients(nn.Sequential(Custom(4, 3)), x)
    with pytest.raises(ConfigError, match="no nn.Linear"):
        projected_gradients(nn.Sequential(nn.Flatten()), x)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False),
                       nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="BatchNorm"):
        projected_gradients(bn, x)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(ConfigError, match="unbatched"):
        projected_gradients(conv, torch.randn(1, 3, 3))


def test_lenet_float32_matches_float64():
    torch.manual_seed(0)
    model = LeNet(4)
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        model(torch.randn(8, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    got32 = projected_gradients(model, x, dim=8)
    assert got32.shape == (3, projection_size(model, 8)) and got32.dtype == torch.float64
    model.double()
    got64 = projected_gradients(model, x, dim=8)
    close(got64, naive_projected(model, x.double(), 8))
    close(got32, got64, rtol=1e-3, atol=1e-3 * got64.abs().max().item())
    assert model.training
