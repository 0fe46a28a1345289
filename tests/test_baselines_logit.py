"""Logit/gradient baselines (MSP, MLS, Energy, ODIN, GradNorm, GradUnc), each checked
against an independent computation (numpy formulas or naive per-sample autograd loops)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradosr.detectors.registry import make_scorer, method_ids
from gradosr.detectors import (
    MLS,
    MSP,
    ODIN,
    ScorerInputs,
    Energy,
    GradNorm,
    GradUnc,
)
from gradosr.errors import DataError

K = 4


def tiny_model(dtype=torch.float64, dropout=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(8, K))
    return nn.Sequential(*layers).to(dtype)


def outputs_of(model, x):
    """ScorerInputs with the head's input captured by a hook."""
    head = model[-1]
    feats = []
    handle = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    try:
        with torch.no_grad():
            model.eval()
            z = model(x)
    finally:
        handle.remove()
    return ScorerInputs(logits=z, features=feats[0], inputs=x, model=model)


def random_logits(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(20, K)).astype(np.float32)
    z[0] = [1000.0, 0.0, -1000.0, 5.0]  # large gap
    z[1] = [-500.0, -400.0, -450.0, -300.0]
    z[2] = 0.0  # uniform
    return z


def np_softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_logsumexp(z):
    z = z.astype(np.float64)
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def logit_outputs(z):
    z = torch.from_numpy(z)
    return ScorerInputs(logits=z, features=torch.zeros(len(z), 3))


def test_registry_order_and_ids():
    ours = ["msp", "mls", "energy", "odin", "gradnorm", "gradunc"]
    assert [m for m in method_ids("baseline") if m in ours] == ours
    for m in ours:
        scorer = make_scorer(m)
        assert scorer.method_id == m
        assert isinstance(scorer.params, dict)
    assert make_scorer("odin").needs_model and make_scorer("gradunc").needs_model
    assert not make_scorer("gradnorm").needs_model
    assert Energy().params == {"temperature": 1.0}
    assert GradNorm().params == {"temperature": 1.0}
    assert ODIN().params == {"temperature": 1000.0, "epsilon": 0.0014}
    assert GradUnc().params == {"target": "confounding", "n_ones": "N", "output": "softmax",
                                "params": "all"}


def test_msp_mls_energy_match_numpy():
    z = random_logits()
    out = logit_outputs(z)
    for scorer, expected in [
        (MSP(), np_softmax(z).max(axis=1)),
        (MLS(), z.astype(np.float64).max(axis=1)),
        (Energy(), np_logsumexp(z)),
        (Energy(temperature=2.0), 2.0 * np_logsumexp(z / 2.0)),
    ]:
        s = scorer.score_samples(out)
        assert s.dtype == np.float64 and s.shape == (len(z),)
        assert np.all(np.isfinite(s))
        np.testing.assert_allclose(s, expected, rtol=1e-12, atol=0)
    assert Energy().score_samples(out)[2] == pytest.approx(math.log(K), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_matches_naive_autograd(temperature):
    model = tiny_model()
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64) * 3
    s = GradNorm(temperature).score_samples(outputs_of(model, x))
    u = torch.full((1, K), 1.0 / K, dtype=torch.float64)
    expected = []
    for i in range(len(x)):
        z = model(x[i : i + 1])
        log_p = F.log_softmax(z / temperature, dim=1)
        kl = F.kl_div(log_p, u, reduction="sum")  # KL(u || softmax(z/T))
        (g,) = torch.autograd.grad(kl, model[-1].weight)
        expected.append(g.abs().sum().item())
    assert model[-1].weight.grad is None
    np.testing.assert_allclose(s, expected, rtol=1e-10, atol=0)


def naive_odin(model, x, t, eps):
    model.eval()
    scores = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        z = model(xi)
        y = z.argmax(dim=1).item()
        loss = -torch.log_softmax(z / t, dim=1)[0, y]  # = -log S_ŷ
        (g,) = torch.autograd.grad(loss, xi)
        xt = xi.detach() - eps * torch.sign(g)  # x - eps * sign(-grad log S_ŷ)
        with torch.no_grad():
            scores.append(torch.softmax(model(xt) / t, dim=1).max().item())
    return np.array(scores)


@pytest.mark.parametrize("t,eps", [(1000.0, 0.0014), (1.0, 0.05)])
def test_odin_matches_naive_loop(t, eps):
    model = tiny_model(dropout=True)
    x = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    out = outputs_of(model, x)
    model.train()  # the scorer must switch to eval (Dropout) and restore the flags
    s = ODIN(temperature=t, epsilon=eps, batch_size=4).score_samples(out)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert s.dtype == np.float64 and s.shape == (9,)
    expected = naive_odin(model, x, t, eps)
    np.testing.assert_allclose(s, expected, rtol=1e-10, atol=0)
    if eps > 0:  # the perturbation does change the scores
        plain = torch.softmax(model(x) / t, dim=1).max(dim=1).values.detach().numpy()
        assert not np.allclose(s, plain, rtol=1e-12, atol=0)


def test_odin_moves_inputs_to_model_dtype():
    model = tiny_model(dtype=torch.float32)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    s = ODIN().score_samples(ScorerInputs(torch.zeros(5, K), torch.zeros(5, 8), x, model))
    assert s.dtype == np.float64 and np.all(np.isfinite(s))


def test_gradunc_matches_naive_loop():
    model = tiny_model()
    x = torch.randn(7, 1, 4, 4, dtype=torch.float64) * 2
    out = outputs_of(model, x)
    model.train()
    s = GradUnc(batch_size=3).score_samples(out)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    params = list(model.parameters())
    model.eval()
    expected = []
    for i in range(len(x)):
        p = torch.softmax(model(x[i : i + 1]), dim=1)
        bce = F.binary_cross_entropy(p, torch.ones_like(p), reduction="sum")
        grads = torch.autograd.grad(bce, params)
        expected.append(sum(g.pow(2).sum().item() for g in grads))
    np.testing.assert_allclose(s, expected, rtol=1e-10, atol=0)


def confident_and_uniform_model():
    """Zero-bias model: x = 0 gives uniform logits, x = 5·e_0 a gap of 50."""
    model = tiny_model()
    with torch.no_grad():
        for lin in (model[1], model[3]):
            lin.bias.zero_()
        model[1].weight.zero_()
        model[1].weight[:K, :K] = torch.eye(K, dtype=torch.float64)
        model[3].weight.zero_()
        model[3].weight[:, :K] = 10 * torch.eye(K, dtype=torch.float64)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = 5.0
    return model, x


@pytest.mark.parametrize("method", ["msp", "mls", "energy", "gradnorm", "gradunc", "odin"])
def test_orientation_confident_scores_higher(method):
    model, x = confident_and_uniform_model()
    out = outputs_of(model, x)
    assert out.logits[0, 0] - out.logits[0, 1] == pytest.approx(50.0)
    assert torch.all(out.logits[1] == 0)
    s = make_scorer(method).score_samples(out)
    assert np.all(np.isfinite(s))
    assert s[0] > s[1]


@pytest.mark.parametrize("method", ["odin", "gradunc"])
def test_missing_model_or_inputs_is_data_error(method):
    model = tiny_model()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = outputs_of(model, x)
    for bad in (ScorerInputs(out.logits, out.features, None, model),
                ScorerInputs(out.logits, out.features, x, None),
                ScorerInputs(out.logits, out.features)):
        with pytest.raises(DataError, match=f"{method} needs the model and its inputs"):
            make_scorer(method).score_samples(bad)
