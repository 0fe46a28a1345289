"""K-FAC whitened gradient norms (issue 21) against a naive per-sample computation in
float64: per-sample autograd gradients of the loss written out, factors from each
sample's own input and output gradient, inverse square roots by NumPy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gradosr.gradients.kfac import fit_factors, kfac_features
from gradosr.gradients.targets import per_sample_loss


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.relu(self.conv(x)).flatten(1))))


def per_sample(model, x):
    """For every sample: its conv/fc inputs u (T×I), output gradients δ (T×O) and weight
    gradients, from a backward of that sample's loss alone."""
    out = []
    for i in range(len(x)):
        store = {}

        def keep(name, unfold):
            def hook(m, inp, o):
                store[name + "_in"] = inp[0]
                o.register_hook(lambda g: store.__setitem__(name + "_g", g))
            return hook

        hs = [model.conv.register_forward_hook(keep("conv", True)), model.fc.register_forward_hook(keep("fc", False))]
        z = model(x[i:i + 1])
        loss = per_sample_loss(z, target="confounding").sum()
        gw = torch.autograd.grad(loss, [model.conv.weight, model.fc.weight])
        for h in hs:
            h.remove()
        u_conv = torch.nn.functional.unfold(store["conv_in"], 3, padding=1, stride=2)[0].T  # T×I
        d_conv = store["conv_g"][0].reshape(3, -1).T  # T×O
        out.append({"conv": (u_conv, d_conv, gw[0].reshape(3, -1)),
                    "fc": (store["fc_in"], store["fc_g"], gw[1])})
    return out


def inv_sqrt(m, damping):
    m = m.detach().numpy()
    gamma = damping * np.trace(m) / len(m)
    vals, vecs = np.linalg.eigh(m + gamma * np.eye(len(m)))
    return (vecs / np.sqrt(vals)) @ vecs.T


def test_whitened_norms_match_a_naive_per_sample_loop():
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(13, 2, 6, 6, dtype=torch.float64)
    factors = fit_factors(model, x, damping=0.1, batch_size=4)
    samples = per_sample(model, x)
    want = {"whitened": [], "activation": [], "gradient": []}
    isq = {}
    for name in ("conv", "fc"):
        us = torch.cat([s[name][0] for s in samples])
        ds = torch.cat([s[name][1] for s in samples])
        isq[name] = (inv_sqrt(us.T @ us / len(us), 0.1), inv_sqrt(ds.T @ ds / len(ds), 0.1))
        np.testing.assert_allclose(factors.a_isqrt[name].numpy(), isq[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(factors.s_isqrt[name].numpy(), isq[name][1], rtol=1e-10, atol=1e-12)
    for s in samples:
        row = {k: [] for k in want}
        for name in ("conv", "fc"):
            u, d, gw = (t.detach().numpy() for t in s[name])
            a_is, s_is = isq[name]
            row["whitened"].append(np.log(((s_is @ gw @ a_is) ** 2).sum()))
            row["activation"].append(np.log(((u @ a_is) ** 2).sum(1).mean()))
            row["gradient"].append(np.log(((d @ s_is) ** 2).sum(1).mean()))
        for k in want:
            want[k].append(row[k])
    for batch in (1, 5, 100):
        got = kfac_features(model, x, factors, batch_size=batch)
        for k in want:
            np.testing.assert_allclose(got[k].numpy(), np.array(want[k]), rtol=1e-10, atol=1e-10)


def test_linear_whitened_norm_factorises():
    """For a 2-D Linear input, w = ‖S^-½δ‖² · ‖A^-½u‖²: log w = log a + log d."""
    torch.manual_seed(1)
    model = Tiny().double()
    x = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    got = kfac_features(model, x, fit_factors(model, x))
    np.testing.assert_allclose(got["whitened"][:, 1], got["activation"][:, 1] + got["gradient"][:, 1], atol=1e-10)


def test_plus_with_kfac_signal_round_trips(tmp_path):
    """The plus preset with the K-FAC gradient signal fits, saves (the factors beside the
    detector) and loads to the same scores; the activation control differs from it."""
    from gradosr.osr import GradientOSR
    from tiny_runs import TRAIN, TRAIN_CONFIG, VAL, quadrant_images
    from gradosr.train import train_classifier
    from tiny_runs import PRE, K, quiet

    clf = train_classifier(TRAIN, VAL, list(range(K)), TRAIN_CONFIG, PRE, progress=False, log=quiet)
    test = quadrant_images(5, seed=4).images
    scores = {}
    for feats in ("whitened", "activation"):
        osr = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG, gradient_rep="kfac",
                          gradient_metric="mahalanobis", kfac_features=feats)
        x, y = clf.inputs(np.concatenate([TRAIN.images, VAL.images])), np.concatenate([TRAIN.labels, VAL.labels])
        osr.fit(x, y)
        osr.save(tmp_path / feats)
        back = GradientOSR.load(tmp_path / feats)
        np.testing.assert_allclose(back.score_samples(test), osr.score_samples(test), rtol=1e-12, atol=1e-12)
        scores[feats] = osr.score_samples(test)
    assert not np.allclose(scores["whitened"], scores["activation"])


def _leverage_inputs(g, k=3):
    from gradosr.detectors.inputs import ScorerInputs

    out = ScorerInputs(torch.zeros(len(g), k, dtype=torch.float64), None)
    out.gradients["projection"] = torch.as_tensor(g)
    return out


def test_leverage_is_the_damped_self_influence_of_the_numpy_formula():
    """gᵀ(GᵀG/N + γI)⁻¹g with γ = 0.1·trace(GᵀG/N)/P, written out with np.linalg.inv; a
    chunked fit and chunked scoring agree to 1e-10, and the state round-trips."""
    from gradosr.detectors.leverage import Leverage

    rng = np.random.default_rng(3)
    g_train = rng.normal(size=(257, 12)) * rng.uniform(0.1, 3.0, size=12) + 0.5
    y = rng.integers(0, 3, 257)
    q = rng.normal(size=(40, 12))
    m = g_train.T @ g_train / len(g_train)
    want = np.einsum("nd,de,ne->n", q, np.linalg.inv(m + 0.1 * np.trace(m) / 12 * np.eye(12)), q)
    one = Leverage().fit(_leverage_inputs(g_train), y)
    np.testing.assert_allclose(one.score_samples(_leverage_inputs(q)), want, rtol=1e-10, atol=1e-10)
    chunked = Leverage(chunk_size=7).fit((_leverage_inputs(g_train[i:i + 50]), y[i:i + 50]) for i in range(0, 257, 50))
    np.testing.assert_allclose(chunked.score_samples(_leverage_inputs(q)), want, rtol=1e-10, atol=1e-10)
    tensors, meta = one.state()
    back = Leverage.from_state(tensors, meta)
    np.testing.assert_allclose(back.score_samples(_leverage_inputs(q)), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(Leverage(negate=True).fit(_leverage_inputs(g_train), y)
                               .score_samples(_leverage_inputs(q)), -want, rtol=1e-10, atol=1e-10)


def test_activation_and_leverage_signals_are_those_scorers_on_their_inputs():
    """The fused detector's ``activation`` signal is the Mahalanobis scorer on the
    per-layer log activation factors and its leverage gradient signal the Leverage
    scorer on the projected gradients, each fitted alone on the same rows."""
    from gradosr.detectors.fusion import FusedScorer, FusionConfig
    from gradosr.detectors.leverage import Leverage
    from gradosr.detectors.mahalanobis import Mahalanobis

    rng = np.random.default_rng(4)

    def inputs(n):
        out = _leverage_inputs(rng.normal(size=(n, 10)), k=3)
        out.logits = torch.as_tensor(rng.normal(size=(n, 3)))
        out.features = torch.as_tensor(rng.normal(size=(n, 6)))
        out.gradients["kfac_activation"] = torch.as_tensor(rng.normal(size=(n, 4)))
        return out

    train, y, test = inputs(120), rng.integers(0, 3, 120), inputs(30)
    cfg = FusionConfig(signals=("activation", "gradient", "features", "max_logit"), gradient_rep="projection",
                       gradient_metric="leverage", combine="fisher", k=5)
    fused = FusedScorer(cfg).fit(train, y).calibrate(inputs(40))
    got = fused.signal_scores(test)
    np.testing.assert_allclose(got["activation"], Mahalanobis(source="kfac_activation").fit(train, y)
                               .score_samples(test), rtol=1e-12)
    np.testing.assert_allclose(got["gradient"], Leverage().fit(train, y).score_samples(test), rtol=1e-12)


def test_plus_with_activation_and_gradient_signals_round_trips(tmp_path):
    """plus-kfac-act-leverage's configuration (activation signal + leverage of the
    projected gradient) fits, saves and loads to the same scores, and its activation
    signal is plus-kfac-act's gradient signal on the same classifier."""
    from gradosr.osr import GradientOSR
    from tiny_runs import TRAIN, TRAIN_CONFIG, VAL, quadrant_images
    from gradosr.train import train_classifier
    from tiny_runs import PRE, K, quiet

    clf = train_classifier(TRAIN, VAL, list(range(K)), TRAIN_CONFIG, PRE, progress=False, log=quiet)
    test = quadrant_images(5, seed=4).images
    x, y = clf.inputs(np.concatenate([TRAIN.images, VAL.images])), np.concatenate([TRAIN.labels, VAL.labels])
    both = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG,
                       signals=("activation", "gradient", "features", "max_logit"), gradient_rep="projection",
                       gradient_metric="leverage").fit(x, y)
    both.save(tmp_path / "both")
    back = GradientOSR.load(tmp_path / "both")
    np.testing.assert_allclose(back.score_samples(test), both.score_samples(test), rtol=1e-12, atol=1e-12)
    act = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG, gradient_rep="kfac",
                      gradient_metric="mahalanobis", kfac_features="activation").fit(x, y)
    xt = clf.inputs(test)
    sig_both = both.method_.detector_.signal_scores(both.method_.inputs(clf, xt))
    sig_act = act.method_.detector_.signal_scores(act.method_.inputs(clf, xt))
    np.testing.assert_allclose(sig_both["activation"], sig_act["gradient"], rtol=1e-10)


def test_plus_preset_is_the_chosen_round3_variant(tmp_path):
    """The shipped ``plus`` preset scores as plus-kfac-act-whitened, the variant the
    round-3 rule chose (docs/ablation.md), and as the activation and whitened-gradient
    Mahalanobis scorers combined by hand; it fits, saves and loads to the same scores."""
    from gradosr.evaluation.ablation import VARIANTS
    from gradosr.osr import GradientOSR
    from tiny_runs import TRAIN, TRAIN_CONFIG, VAL, quadrant_images
    from gradosr.train import train_classifier
    from tiny_runs import PRE, K, quiet

    clf = train_classifier(TRAIN, VAL, list(range(K)), TRAIN_CONFIG, PRE, progress=False, log=quiet)
    test = quadrant_images(6, seed=5).images
    x, y = clf.inputs(np.concatenate([TRAIN.images, VAL.images])), np.concatenate([TRAIN.labels, VAL.labels])
    plus = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG).fit(x, y)
    variant = next(v for v in VARIANTS if v.name == "plus-kfac-act-whitened")
    chosen = GradientOSR(variant.preset, classifier=clf, train_config=TRAIN_CONFIG, **variant.options).fit(x, y)
    np.testing.assert_array_equal(plus.score_samples(test), chosen.score_samples(test))
    assert plus.config_.fusion.signals == ("activation", "gradient", "features", "max_logit")
    # its two layer signals are plus-kfac-act's and plus-kfac's Mahalanobis signals
    xt = clf.inputs(test)
    sig = plus.method_.detector_.signal_scores(plus.method_.inputs(clf, xt))
    for name, feats in (("activation", "activation"), ("gradient", "whitened")):
        one = GradientOSR("plus", classifier=clf, train_config=TRAIN_CONFIG, signals=("gradient", "features", "max_logit"),
                          gradient_rep="kfac", gradient_metric="mahalanobis", kfac_features=feats).fit(x, y)
        np.testing.assert_allclose(sig[name], one.method_.detector_.signal_scores(one.method_.inputs(clf, xt))["gradient"],
                                   rtol=1e-10)
    plus.save(tmp_path / "plus")
    np.testing.assert_array_equal(GradientOSR.load(tmp_path / "plus").score_samples(test), plus.score_samples(test))
