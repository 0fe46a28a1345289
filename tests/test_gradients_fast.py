"""Tests of the hook-based fast path (gradosr.gradients.capture with the "sqnorms" reduction
of gradosr.gradients.rules) against a naive per-sample autograd loop and the torch.func
path, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradosr.errors import ConfigError
from gradosr.gradients import capture, engine, select_parameters, squared_norms
from gradosr.gradients.rules import conv as conv_rule, per_sample
from gradosr.models import build_model

from gradient_reference import TARGETS, Scale, close, naive


def prime(model, x_shape, seed=0):
    """float64, random norm-layer affine parameters and non-trivial running statistics."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-0.2, 0.2, generator=gen)
        model.train()
        for _ in range(2):
            model(torch.randn(4, *x_shape, generator=gen, dtype=torch.float64) + 0.5)
    model.eval()
    return model


@pytest.fixture
def fallback_log(monkeypatch):
    """Record the parameter names given to the torch.func fallback."""
    calls: list[list[str]] = []
    real = engine._func_fn

    def spy(model, names, loss):
        calls.append(list(names))
        return real(model, names, loss)

    monkeypatch.setattr(engine, "_func_fn", spy)
    return calls


# ---- built-in models ---------------------------------------------------------------------

MODELS = {
    "lenet": (lambda: build_model("lenet", 4), (1, 16, 16)),
    "cnn32": (lambda: build_model("cnn32", 5, in_channels=3), (3, 16, 16)),
    "resnet18": (lambda: build_model("resnet18", 3, in_channels=3), (3, 16, 16)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def builtin(request):
    torch.manual_seed(0)
    factory, shape = MODELS[request.param]
    model = prime(factory(), shape)
    x = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return request.param, model, x


@pytest.mark.parametrize("tname", list(TARGETS))
def test_builtin_models_fast_equals_naive_and_func(builtin, tname, fallback_log):
    name, model, x = builtin
    kw = TARGETS[tname]
    feats, names = squared_norms(model, x, method="fast", **kw)
    assert fallback_log == []  # every parameter of the built-in models has a rule
    assert names == [n for n, _ in model.named_parameters()]
    close(feats, naive(model, x, names, **kw))
    if tname in ("confounding", "predicted"):  # the func path is slow: two targets suffice
        close(feats, squared_norms(model, x, method="func", **kw)[0])
    auto, _ = squared_norms(model, x, **kw)
    close(auto, feats, rtol=0, atol=0)  # auto = fast for a full selection
    assert (feats > 0).all()


def test_builtin_float32_close_to_float64():
    torch.manual_seed(0)
    model = prime(build_model("cnn32", 5, in_channels=3), (3, 16, 16))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    f64, _ = squared_norms(model, x, method="fast")
    f32, _ = squared_norms(model.float(), x.float(), method="fast")
    assert f32.dtype == torch.float32
    close(f32.double(), f64, rtol=1e-3, atol=0)


# ---- a user model mixing supported and unsupported layers --------------------------------


class Mixed(nn.Module):
    """Input (B, 21): 18 values as a (2, 9) sequence, 3 values cast to embedding indices."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, padding=1)  # -> (B, 4, 5)
        self.prelu = nn.PReLU(4)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm(4)
        self.emb = nn.Embedding(5, 4, padding_idx=0)
        self.lin3d = nn.Linear(4, 6)  # on (B, 8, 4)
        self.scale = Scale(6)
        self.shared = nn.Linear(6, 6)  # called twice
        self.tie_a = nn.Linear(6, 6, bias=False)
        self.tie_b = nn.Linear(6, 6, bias=False)
        self.tie_b.weight = self.tie_a.weight  # tied weights
        self.used_outside = nn.Linear(6, 6)  # its weight is also used directly below
        self.unused = nn.Linear(3, 3)  # never called: zero gradient
        self.fc = nn.Linear(48, 16)
        self.head = nn.Linear(16, 3)
        self.offset = nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))  # on the root module
        self.ln.bias.requires_grad_(False)  # a frozen parameter

    def forward(self, x):
        seq = x[:, :18].reshape(-1, 2, 9)
        idx = (x[:, 18:].abs() * 3).long().clamp(max=4)  # includes padding_idx 0
        h = self.bn(self.gn(self.prelu(self.conv(seq))))  # (B, 4, 5)
        t = self.ln(h.transpose(1, 2))  # (B, 5, 4)
        t = torch.cat([t, self.emb(idx)], dim=1)  # (B, 8, 4)
        u = self.scale(torch.tanh(self.lin3d(t)))  # (B, 8, 6)
        u = self.shared(torch.tanh(self.shared(u)))
        u = self.tie_b(torch.tanh(self.tie_a(u)))
        u = self.used_outside(u) + 0.1 * F.linear(u, self.used_outside.weight)
        v = F.relu(self.fc(u.flatten(1)), inplace=True)
        return self.head(v) + self.offset


MIXED_FALLBACK = ["prelu.weight", "scale.gain", "shared.weight", "shared.bias",
                  "tie_a.weight", "used_outside.weight", "offset"]


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(3)
    model = prime(Mixed(), (21,))
    x = torch.randn(3, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return model, x


@pytest.mark.parametrize("tname", list(TARGETS))
def test_mixed_model_fast_equals_naive_and_func(mixed, tname, fallback_log):
    model, x = mixed
    kw = TARGETS[tname]
    feats, names = squared_norms(model, x, method="fast", **kw)
    assert names == [n for n, _ in model.named_parameters()]
    assert fallback_log == [[n for n in names if n in MIXED_FALLBACK]]
    close(feats, naive(model, x, names, **kw))
    close(feats, squared_norms(model, x, method="func", **kw)[0])
    assert (feats[:, names.index("unused.weight")] == 0).all()


def test_plan_splits_supported_and_unsupported(mixed):
    model, _ = mixed
    names = select_parameters(model)
    layers, handled = engine._fast_plan(model, names)
    rest = [n for n in names if n not in handled]
    # tied weights and custom/PReLU parameters are sent to the fallback by the plan;
    # reuse and use outside the module are found while running (capture.verdict)
    assert rest == ["offset", "prelu.weight", "scale.gain", "tie_a.weight"]
    assert list(handled) == [n for n in names if n not in rest]
    assert all(layer in layers and attr in layer.params for layer, attr in handled.values())


def test_embedding_first_with_inplace_output(fallback_log):
    """An Embedding whose input does not require grad and whose output is then changed
    in place: the fast rule still gets the pre-in-place gradient."""

    class EmbFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5, padding_idx=2)
            self.head = nn.Linear(15, 3)

        def forward(self, x):
            e = self.emb((x.abs() * 4).long().clamp(max=6))
            return self.head(F.relu(e, inplace=True).flatten(1))

    torch.manual_seed(5)
    model = EmbFirst().double()
    model.emb.weight.requires_grad_(False)  # frozen, still selected
    x = torch.randn(4, 3, dtype=torch.float64)
    x[0] = 0.6  # repeated index in one sample
    feats, names = squared_norms(model, x)
    assert fallback_log == []
    close(feats, naive(model, x, names))
    assert not model.emb.weight.requires_grad


# ---- convolution and linear geometries ---------------------------------------------------

CONV2D = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "strided_padded": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=2),
    "dilated": dict(in_channels=3, out_channels=4, kernel_size=3, dilation=2, padding=1),
    "grouped": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=4, out_channels=8, kernel_size=3, groups=4, stride=2),
    "rect_kernel": dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 1),
                        padding=(1, 0), bias=False),
    "same_even": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),
    "reflect": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1,
                    padding_mode="reflect"),
    "circular": dict(in_channels=3, out_channels=4, kernel_size=3, padding=2,
                     padding_mode="circular", dilation=2),
    "gram": dict(in_channels=12, out_channels=16, kernel_size=3, padding=1, stride=3),
}
CONV1D = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "strided_dilated": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, dilation=2,
                            padding=3),
    "grouped": dict(in_channels=4, out_channels=4, kernel_size=2, groups=2),
    "same": dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"),
    "replicate": dict(in_channels=3, out_channels=4, kernel_size=3, padding=1,
                      padding_mode="replicate"),
}


class ConvNet(nn.Module):
    def __init__(self, conv, n_flat):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(n_flat, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _conv_model(conv, in_shape):
    with torch.no_grad():
        n_flat = conv(torch.zeros(1, *in_shape)).numel()
    torch.manual_seed(6)
    return ConvNet(conv, n_flat).double()


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("cfg", list(CONV2D))
def test_conv2d_geometries(cfg, fallback_log):
    conv = CONV2D[cfg]
    shape = (conv["in_channels"], 9, 8)
    torch.manual_seed(7)
    model = _conv_model(nn.Conv2d(**conv), shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    for kw in (TARGETS["confounding"], TARGETS["predicted"]):
        feats, names = squared_norms(model, x, method="fast", **kw)
        close(feats, naive(model, x, names, **kw))
    assert fallback_log == []


@pytest.mark.parametrize("cfg", list(CONV1D))
def test_conv1d_geometries(cfg, fallback_log):
    conv = CONV1D[cfg]
    shape = (conv["in_channels"], 11)
    torch.manual_seed(8)
    model = _conv_model(nn.Conv1d(**conv), shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    feats, names = squared_norms(model, x, method="fast")
    close(feats, naive(model, x, names))
    assert fallback_log == []


@pytest.mark.parametrize("cfg", ["strided_padded", "dilated", "grouped", "rect_kernel",
                                 "circular", "gram"])
@pytest.mark.parametrize("branch", ["gram", "unfold", "grouped"])
def test_conv_branches(cfg, branch, monkeypatch):
    """Each conv geometry through the Gram identity, the unfolded product and the
    per-sample weight gradients of one grouped convolution (sub-batches of 1, 2, 8)."""
    conv = CONV2D[cfg]
    shape = (conv["in_channels"], 9, 8)
    torch.manual_seed(9)
    model = _conv_model(nn.Conv2d(**conv), shape)
    x = torch.randn(5, *shape, dtype=torch.float64)
    names = select_parameters(model)
    expected = naive(model, x, names)
    monkeypatch.setattr(conv_rule, "_conv_branch", lambda *a: branch)
    for sub in (1, 2, 8):
        monkeypatch.setattr(conv_rule, "CONV_SUB", sub)
        close(squared_norms(model, x, method="fast")[0], expected)
    monkeypatch.setattr(per_sample, "FAST_BUDGET", 1)  # one sample per unfolded sub-batch
    close(squared_norms(model, x, method="fast")[0], expected)


@pytest.mark.parametrize("t,d,o", [(2, 8, 8), (8, 3, 4), (1, 5, 4)])
def test_linear_on_sequences(t, d, o, fallback_log):
    """Linear on (B, T, D) inputs: Gram identity (T (D + O) < D O) or explicit."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(d, o), nn.Tanh(), nn.Flatten(), nn.Linear(t * o, 3)).double()
    x = torch.randn(4, t, d, dtype=torch.float64)
    feats, names = squared_norms(model, x, method="fast")
    close(feats, naive(model, x, names))
    assert fallback_log == []


# ---- options, state and fallbacks --------------------------------------------------------


def test_chunk_sizes_and_budget_do_not_change_result(mixed, monkeypatch):
    model, x = mixed
    x = torch.cat([x, -x, 0.5 * x])  # 9 samples
    ref, _ = squared_norms(model, x, method="fast")
    for cs in (1, 2, 7, 100):
        close(squared_norms(model, x, method="fast", chunk_size=cs)[0], ref, rtol=1e-12, atol=0)
    monkeypatch.setattr(per_sample, "FAST_BUDGET", 7)
    close(squared_norms(model, x, method="fast", chunk_size=4)[0], ref, rtol=1e-12, atol=0)


def test_state_is_restored(mixed):
    model, x = mixed
    model.train()
    model.bn.eval()
    model.head.weight.requires_grad_(False)
    sentinel = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = sentinel
    flags = [m.training for m in model.modules()]
    req = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    try:
        feats, names = squared_norms(model, x, method="fast")
        assert [m.training for m in model.modules()] == flags
        assert [p.requires_grad for p in model.parameters()] == req
        assert all(a is b for a, b in zip((p.grad for p in model.parameters()), grads))
        assert (model.fc.weight.grad == 7.0).all()
        assert not feats.requires_grad
        close(feats, naive(model, x, names))
        with torch.no_grad():  # also under no_grad
            close(squared_norms(model, x, method="fast")[0], feats)
    finally:
        model.fc.weight.grad = None
        model.head.weight.requires_grad_(True)
        model.eval()


def test_parameter_subsets_and_head_selection(mixed, fallback_log):
    model, x = mixed
    full, names = squared_norms(model, x, method="fast")
    for sel in (["conv.weight", "emb.weight"], ["head.weight", "head.bias"], ["scale.gain"],
                ["bn.bias", "ln.weight", "offset"]):
        feats, got = squared_norms(model, x, params=sel, method="fast")
        assert got == [n for n in names if n in sel]
        close(feats, full[:, [names.index(n) for n in got]])


def test_batch_statistics_models_use_func():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False),
                          nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert capture.batch_coupled(model)
    with pytest.raises(ConfigError):
        squared_norms(model, x, method="fast")
    feats, names = squared_norms(model, x)  # auto: the func path (samples one at a time)
    close(feats, naive(model, x, names))


def test_auto_uses_fast_path_and_head(monkeypatch):
    torch.manual_seed(12)
    model = prime(build_model("lenet", 4), (1, 16, 16))
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    calls = []
    real = capture.run
    monkeypatch.setattr(capture, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    squared_norms(model, x)
    assert calls == [1]
    squared_norms(model, x, params=["head.weight", "head.bias"])  # closed form
    squared_norms(model, x, method="func")
    assert calls == [1]


def test_unbatched_conv_input_uses_func(fallback_log):
    """A Conv2d run on one unbatched (C, H, W) sample: its rule refuses the input
    (check_input), the torch.func path computes the conv's parameters exactly."""

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.head = nn.Linear(48, 3)

        def forward(self, x):  # a batch of one sample
            return self.head(torch.tanh(self.conv(x[0].reshape(2, 6, 6))).reshape(1, -1))

    torch.manual_seed(13)
    model = Unbatched().double()
    x = torch.randn(1, 72, dtype=torch.float64)
    feats, names = squared_norms(model, x, method="fast")
    assert fallback_log == [["conv.weight", "conv.bias"]]
    close(feats, naive(model, x, names))
