"""Reference computations shared by the gradient-engine tests: the targets to check and
a naive per-sample autograd loop (the independent expectation)."""

from __future__ import annotations

import torch

from gradosr.gradients import per_sample_loss

TARGETS = {
    "confounding": dict(),
    "confounding_n2": dict(n_ones=2),
    "sigmoid": dict(output="sigmoid"),
    "predicted": dict(target="predicted"),
    "uniform": dict(target="uniform"),
}
RTOL, ATOL = 1e-10, 1e-30


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
