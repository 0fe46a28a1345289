"""The gradient-based competitors (NAC, GROOD, GAIA-Z/A, multi-layer Mahalanobis with and
without input perturbation), each against an independent computation of its formula on
a tiny float64 model: per-sample autograd loops, histograms counted by hand, NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradosr.detectors import METHODS, ScorerInputs, make_scorer
from gradosr.detectors.grood import prototype_gradient
from gradosr.detectors.intermediate import select_layers
from gradosr.models import LeNet, ResNet18

IDS = ["nac", "grood", "gaia_z", "gaia_a", "mahalanobis_ml", "mahalanobis_ml_pp"]
K = 3


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, pool, fc-ReLU, head; no in-place operations."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5), nn.ReLU())
        self.head = nn.Linear(5, K)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_model() -> Tiny:
    torch.manual_seed(0)
    m = Tiny().double()
    for bn in (m.body[1], m.body[4]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        m.body[8].bias.fill_(0.3)  # keep the fc ReLU alive on the random inputs
    return m.eval()


MODEL = tiny_model()
GEN = torch.Generator().manual_seed(1)
X_TRAIN = torch.randn(24, 1, 6, 6, generator=GEN, dtype=torch.float64)
Y_TRAIN = np.arange(24) % K
X_TEST = torch.randn(7, 1, 6, 6, generator=GEN, dtype=torch.float64)


def inputs(x: torch.Tensor) -> ScorerInputs:
    with torch.no_grad():
        z, h = MODEL(x), MODEL.body(x)
    return ScorerInputs(z, h, x, MODEL, MODEL.head.weight.detach(), MODEL.head.bias.detach())


TRAIN, TEST = inputs(X_TRAIN), inputs(X_TEST)


def per_sample(x: torch.Tensor, names: list[str], loss) -> list[tuple[dict, dict]]:
    """Naive loop: one forward per sample, the outputs of ``names`` and autograd.grad of
    ``loss(logits, outputs)`` w.r.t. them."""
    mods = dict(MODEL.named_modules())
    out = []
    for i in range(len(x)):
        seen = {}
        hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in names]
        z = MODEL(x[i:i + 1])
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss(z, seen), [seen[n] for n in names])
        out.append(({n: seen[n].detach()[0] for n in names}, dict(zip(names, [g[0] for g in grads]))))
    return out


def cmean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=(1, 2)) if t.dim() == 3 else t


# ----------------------------------------------------------------------------- NAC
@pytest.mark.parametrize("statistic", ["product", "activation"])
def test_nac_coverage_counted_by_hand(statistic):
    """The paper's state z̄ ⊙ ḡ and the non-gradient control z̄ alone (round 5)."""
    scorer = make_scorer("nac").set_params(bins=7, min_fraction=0.1, statistic=statistic).fit(TRAIN, Y_TRAIN)
    names = scorer.layers_
    assert names == select_layers(MODEL, X_TRAIN, "blocks") == ["body.5", "body.6", "body.8", "body.9"]

    def kl(z, seen):
        return -torch.log_softmax(z, dim=1).mean() - np.log(K)

    def raw(x):
        return [[(cmean(a[n]) * (cmean(g[n]) if statistic == "product" else 1.0)).numpy() for n in names]
                for a, g in per_sample(x, names, kl)]

    train = raw(X_TRAIN)
    sig = [np.sqrt(np.mean([r[l] ** 2 for r in train])) for l in range(len(names))]
    assert min(sig) > 0
    np.testing.assert_allclose(scorer.sigma_, sig, rtol=1e-12)
    m, n = 7, len(X_TRAIN)
    counts = [np.zeros((m, len(train[0][l]))) for l in range(len(names))]
    for r in train:  # the histogram, one state at a time
        for l in range(len(names)):
            for c, v in enumerate(r[l]):
                phi = 1 / (1 + np.exp(-v / sig[l]))
                counts[l][min(int(phi * m), m - 1), c] += 1
    expected = []
    for r in raw(X_TEST):
        per_layer = []
        for l in range(len(names)):
            cov = [min(counts[l][min(int(m / (1 + np.exp(-v / sig[l]))), m - 1), c] / (0.1 * n), 1.0)
                   for c, v in enumerate(r[l])]
            per_layer.append(np.mean(cov))
        expected.append(np.mean(per_layer))
    np.testing.assert_allclose(scorer.score_samples(TEST), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- GAIA
def test_gaia_z_from_a_per_sample_autograd_loop():
    names = select_layers(MODEL, X_TEST, "norms")
    assert names == ["body.1", "body.4"]
    loops = per_sample(X_TEST, names, lambda z, seen: z.max())
    expected = [-np.mean(np.concatenate([cmean((g[n] != 0).double()).numpy() for n in names]) ** 2)
                for _, g in loops]
    np.testing.assert_allclose(make_scorer("gaia_z").score_samples(TEST), expected, rtol=1e-12)


def test_gaia_a_from_a_per_sample_autograd_loop():
    names = select_layers(MODEL, X_TEST, "late_norms")
    assert names == ["body.4"]
    mods = dict(MODEL.named_modules())
    expected = []
    for i in range(len(X_TEST)):
        seen = {}
        hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o)) for n in names + ["body"]]
        z = MODEL(X_TEST[i:i + 1])
        for h in hooks:
            h.remove()
        (gh,) = torch.autograd.grad(torch.log_softmax(z, dim=1).sum(), seen["body"], retain_graph=True)
        (ga,) = torch.autograd.grad(seen["body"].sum(), seen["body.4"])
        out = np.sqrt(gh.abs().mean().item())
        expected.append(-np.mean((cmean(ga[0]).abs().numpy() / out) ** 2))
    np.testing.assert_allclose(make_scorer("gaia_a").score_samples(TEST), expected, rtol=1e-12)


# -------------------------------------------------------------------------- GROOD
def test_grood_gradient_of_the_written_loss_and_its_nearest_neighbour():
    scorer = make_scorer("grood").fit(TRAIN, Y_TRAIN)
    h = TEST.features.double()
    protos = torch.stack([TRAIN.features[torch.as_tensor(Y_TRAIN) == k].double().mean(0) for k in range(K)])
    torch.testing.assert_close(scorer.prototypes_, protos, rtol=1e-12, atol=1e-14)
    grads = []
    for row in h:
        p_o = scorer.ood_prototype_.clone().requires_grad_(True)
        d = torch.stack([torch.sqrt(((row - p) ** 2).sum()) for p in protos] + [torch.sqrt(((row - p_o) ** 2).sum())])
        target = int(d[:K].argmin())
        loss = -(-d[target] - torch.logsumexp(-d, dim=0))
        grads.append(torch.autograd.grad(loss, p_o)[0])
    grads = torch.stack(grads)
    torch.testing.assert_close(prototype_gradient(h, protos, scorer.ood_prototype_), grads, rtol=1e-10, atol=1e-14)
    bank = scorer.bank_.numpy()
    expected = [-min(np.linalg.norm(g - b) for b in bank) for g in grads.numpy()]
    np.testing.assert_allclose(scorer.score_samples(TEST), expected, rtol=1e-10)


# --------------------------------------------------------------- Mahalanobis (multi-layer)
def numpy_gaussians(feats: list[np.ndarray], y: np.ndarray):
    out = []
    for f in feats:
        mu = np.stack([f[y == k].mean(0) for k in range(K)])
        c = f - mu[y]
        cov = c.T @ c / len(f)
        out.append((mu, np.linalg.pinv(cov, rcond=f.shape[1] * np.finfo(float).eps, hermitian=True)))
    return out


def pooled_naive(x, names):
    return [np.stack([cmean(a[n]).numpy() for a, _ in per_sample(x, names, lambda z, s: z.sum())]) for n in names]


def conf(f, mu, prec):
    return -np.min([np.einsum("nd,de,ne->n", f - m, prec, f - m) for m in mu], axis=0)


@pytest.mark.parametrize("method_id", ["mahalanobis_ml", "mahalanobis_ml_pp"])
def test_multilayer_mahalanobis_against_numpy(method_id):
    eps = 0.0 if method_id == "mahalanobis_ml" else 0.0014
    scorer = make_scorer(method_id).fit(TRAIN, Y_TRAIN)
    names = scorer.layers_
    gauss = numpy_gaussians(pooled_naive(X_TRAIN, names), Y_TRAIN)

    def layer_scores(x):
        cols = []
        for (mu, prec), n in zip(gauss, names):
            if eps:
                xs = []
                for i in range(len(x)):  # per-sample gradient of the closest-class distance
                    xi = x[i:i + 1].clone().requires_grad_(True)
                    seen = {}
                    hook = dict(MODEL.named_modules())[n].register_forward_hook(lambda m, a, o: seen.update(a=o))
                    MODEL(xi)
                    hook.remove()
                    f = cmean(seen["a"][0])
                    dist = torch.stack([(f - torch.as_tensor(m)) @ torch.as_tensor(prec) @ (f - torch.as_tensor(m))
                                        for m in mu]).min()
                    xs.append(xi.detach() - eps * torch.sign(torch.autograd.grad(dist, xi)[0]))
                x_l = torch.cat(xs)
            else:
                x_l = x
            cols.append(conf(pooled_naive(x_l, [n])[0], mu, prec))
        return np.stack(cols, axis=1)

    train = layer_scores(X_TRAIN)
    expected = ((layer_scores(X_TEST) - train.mean(0)) / train.std(0)).sum(axis=1)
    np.testing.assert_allclose(scorer.score_samples(TEST), expected, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("method_id", IDS)
def test_chunked_and_unchunked_agree(method_id):
    one = make_scorer(method_id).set_params(batch_size=100).fit(TRAIN, Y_TRAIN)
    chunks = [(TRAIN.rows(slice(a, b)), Y_TRAIN[a:b]) for a, b in ((0, 5), (5, 17), (17, 24))]
    small = make_scorer(method_id).set_params(batch_size=3).fit(chunks)
    s1 = one.score_samples(TEST)
    np.testing.assert_allclose(small.score_samples(TEST), s1, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(small.score_samples(TEST.rows(slice(0, 4))), s1[:4],
                               rtol=1e-10, atol=1e-10)
    assert small.score_samples(TEST.rows(slice(0, 0))).shape == (0,)
    assert METHODS[method_id].family == "gradient"


def test_gradnorm_and_gradunc_are_gradient_methods():
    assert METHODS["gradnorm"].family == METHODS["gradunc"].family == "gradient"


def test_layer_rules_for_the_project_models():
    x = torch.randn(2, 1, 28, 28)
    assert select_layers(LeNet(6), x, "blocks") == ["features.2", "features.6", "features.11"]
    resnet = ResNet18(6)
    assert select_layers(resnet, x, "stages") == ["stem", "layer1", "layer2", "layer3", "layer4"]
    late = select_layers(resnet, x, "late_norms")
    assert len(late) == 10 and all(n.startswith(("layer3", "layer4")) for n in late)
