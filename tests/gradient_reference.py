"""Reference computations shared by the gradient-engine tests: the targets to check and
a naive per-sample autograd loop (the independent expectation), as squared norms and as
explicitly projected gradients."""

from __future__ import annotations

import torch
from torch import nn

from gradosr.gradients import per_sample_loss
from gradosr.gradients.projection import projection_matrices

TARGETS = {
    "confounding": dict(),
    "confounding_n2": dict(n_ones=2),
    "sigmoid": dict(output="sigmoid"),
    "predicted": dict(target="predicted"),
    "uniform": dict(target="uniform"),
}
RTOL, ATOL = 1e-10, 1e-30


class Scale(nn.Module):
    """``y = x * gain`` over the last dim: a custom module with its own parameter and no
    built-in rule (torch.func fallback, unless a test registers a rule for it)."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.gain


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def naive_gradients(model, x, params, **kw) -> list[tuple]:
    """Per-sample loop: forward x[i:i+1] in eval mode and autograd.grad of its own loss
    over the tensors ``params`` (None where the forward does not use one); one tuple per
    sample. The model's training flags and the params' requires_grad are restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    req = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        out = []
        for i in range(x.shape[0]):
            loss = per_sample_loss(model(x[i : i + 1]), **kw).sum()
            out.append(torch.autograd.grad(loss, params, allow_unused=True))
        return out
    finally:
        for p, r in zip(params, req):
            p.requires_grad_(r)
        for m, f in flags:
            m.training = f


def naive(model, x, names, **kw):
    """Per-sample squared gradient norms of the selected parameters, by
    :func:`naive_gradients` (a parameter the forward does not use has a zero gradient)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    grads = naive_gradients(model, x, params, **kw)
    return torch.stack([
        torch.stack([g.pow(2).sum() if g is not None else p.new_zeros(()) for g, p in zip(row, params)])
        for row in grads]).detach()


def naive_projected(model, x, dim, seed=0, **kw):
    """Per sample: autograd.grad of its own loss w.r.t. every layer weight
    (:func:`naive_gradients`), projected explicitly as
    vec(P_out^T dW P_in) with the module's projection matrices."""
    mats = projection_matrices(model, dim, seed)
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name, _, _ in mats]
    rows = []
    for grads in naive_gradients(model, x, weights, **kw):
        parts = []
        for (_, p_out, p_in), w, gw in zip(mats, weights, grads):
            gm = (torch.zeros_like(w) if gw is None else gw).reshape(w.shape[0], -1)
            if p_out is not None:
                gm = p_out.T @ gm
            if p_in is not None:
                gm = gm @ p_in
            parts.append(gm.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows).detach()
