"""Fisher-whitened (K-FAC) per-layer gradient norms of the layers below the head.

For a classifier and the per-sample loss J(x) of :func:`gradosr.gradients.targets.per_sample_loss`
(the ``plus`` preset's confounding label), every Linear/Conv2d layer l below the head has
a per-sample weight gradient ``∇W_l J = Σ_t δ_t u_tᵀ`` (``u_t`` its input, for a
convolution the unfolded patch at output position t; ``δ_t`` the gradient at its output;
one position for a 2-D Linear input). K-FAC (Martens & Grosse, "Optimizing Neural
Networks with Kronecker-factored Approximate Curvature", ICML 2015; Grosse & Martens, "A
Kronecker-factored approximate Fisher matrix for convolution layers", ICML 2016)
approximates the layer's Fisher information by ``S_l ⊗ A_l`` with

    A_l = E[u uᵀ]  (I×I),      S_l = E[δ δᵀ]  (O×O),

expectations over the known training samples and positions, here of the gradients of J
(an empirical Fisher of the confounding loss). Each factor is damped by ``γ = damping ×``
its mean eigenvalue (trace / dimension). The natural-gradient (self-influence) size of a
sample's gradient, "how much the model would have to change" in the Fisher metric, is

    w_l = ‖(S_l+γI)^-½ ∇W_l J (A_l+γI)^-½‖²_F,

computed per sample as ``(δ L)ᵀ (u R)`` (O×I, the positions summed) from the whitened
output gradients ``δ L`` (T×O) and whitened inputs ``u R`` (T×I), with
``L = (S_l+γI)^-½`` and ``R = (A_l+γI)^-½``, the same ``L (dJ/dW) R`` as the layer rules'
projection reduction (:data:`gradosr.gradients.rules.PROJECTION`); both whitened
products also give the two controls below. One batched forward and backward
(:func:`gradosr.gradients.capture.run`): no per-sample gradient of the model is formed.
For a 2-D Linear input it factorises as ``‖S^-½δ‖² · ‖A^-½u‖²``; the second factor is
an activation (Mahalanobis-type) norm that carries no gradient information, so the two
factors are also returned, averaged over positions, as controls:

    a_l = mean_t ‖(A_l+γI)^-½ u_t‖²,      d_l = mean_t ‖(S_l+γI)^-½ δ_t‖².

:func:`kfac_features` returns ``log`` of the three (float64 N×L each; a zero becomes
log 1e-30). Biases are not included; grouped convolutions are refused.

Both functions keep their last few results for the process, keyed by the content of the
model's parameters and buffers, of the inputs and of the options (an ablation fits
several variants on the same classifier and data: they share one pass).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradosr.errors import ConfigError, DataError
from gradosr.gradients import capture, rules
from gradosr.gradients.projection import _batch, _layers
from gradosr.gradients.targets import per_sample_loss
from gradosr.models import eval_mode, find_head_name

__all__ = ["KFACFactors", "fit_factors", "kfac_features", "kfac_layers", "FEATURES"]

#: what :func:`kfac_features` returns per layer
FEATURES = ("whitened", "activation", "gradient")
_FLOOR = 1e-30
_MEMO: OrderedDict = OrderedDict()
_MEMO_SIZE = 64


def _digest(*tensors: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _memo(key: tuple, compute):
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    value = _MEMO[key] = compute()
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return value


def _model_key(model: nn.Module) -> str:
    return _digest(*model.state_dict().values())


def kfac_layers(model: nn.Module) -> list[tuple[str, nn.Module, rules.LayerRule]]:
    """``(name, module, rule)`` of the Linear/Conv2d layers below the head, in module order."""
    head = find_head_name(model)
    found = [(n, m, r) for n, m, r in _layers(model) if n != head and isinstance(m, (nn.Linear, nn.Conv2d))]
    for name, m, _ in found:
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ConfigError(f"layer {name}: K-FAC factors of grouped convolutions are not supported")
    if not found:
        raise ConfigError("the model has no Linear/Conv2d layer below its head: no K-FAC gradient features")
    return found


def _positions(m: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's inputs ``u`` as (B, T, I) and output gradients ``δ`` as (B, T, O)."""
    b = a.shape[0]
    if isinstance(m, nn.Conv2d):
        u = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, I, T)
        return u.transpose(1, 2), g.reshape(b, g.shape[1], -1).transpose(1, 2)
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


#: rows (samples × positions) per slice of :func:`_gram` (its product in the data's dtype)
GRAM_ROWS = 8192
#: samples per slice of the per-sample K-FAC features (their values do not depend on it)
REDUCE_SAMPLES = 32


def _gram(x: Tensor) -> Tensor:
    """Σ over samples and positions of x xᵀ for x (B, T, F): F×F float64. The product of
    each slice of about :data:`GRAM_ROWS` rows is taken in x's dtype and the slices are
    summed in float64: a whole batch's unfolded patches copied to float64 were most of the
    ``plus`` preset's peak memory, and a float64 product of float32 data is 2.5× slower
    for no more information than float32 products over 8,192 rows keep (relative 1e-7)."""
    per = max(1, GRAM_ROWS // max(1, x.shape[1]))
    out = x.new_zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
    for start in range(0, x.shape[0], per):
        rows = x[start:start + per].reshape(-1, x.shape[-1])
        out += (rows.T @ rows).to(torch.float64)
    return out


@dataclass
class KFACFactors:
    """The damped inverse square roots of every layer's factors:
    ``a_isqrt[name]`` = (A+γI)^-½ (I×I), ``s_isqrt[name]`` = (S+γI)^-½ (O×O), float64."""

    names: list[str]
    a_isqrt: dict[str, Tensor] = field(default_factory=dict)
    s_isqrt: dict[str, Tensor] = field(default_factory=dict)
    key: tuple | None = None

    def state(self) -> dict[str, Tensor]:
        out = {}
        for n in self.names:
            out[f"{n}.a_isqrt"], out[f"{n}.s_isqrt"] = self.a_isqrt[n], self.s_isqrt[n]
        return out

    @classmethod
    def from_state(cls, names: list[str], tensors: dict[str, Tensor]) -> "KFACFactors":
        return cls(list(names), {n: tensors[f"{n}.a_isqrt"] for n in names},
                   {n: tensors[f"{n}.s_isqrt"] for n in names})


def damped_inv_sqrt(m: Tensor, damping: float) -> Tensor:
    """(M + γI)^-½ of a symmetric PSD M, γ = damping × trace(M)/dim (``damping`` when the
    trace is 0; eigh, float64)."""
    m = (m + m.T) / 2
    gamma = damping * float(torch.trace(m)) / m.shape[0]
    gamma = gamma if gamma > 0 else damping
    vals, vecs = torch.linalg.eigh(m + gamma * torch.eye(m.shape[0], dtype=m.dtype))
    return (vecs * vals.clamp_min(gamma).rsqrt()) @ vecs.T


def _loss(target: str, n_ones, output: str):
    return lambda z: per_sample_loss(z, target=target, n_ones=n_ones, output=output)


def _check_x(x) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise DataError("K-FAC features need float model inputs (N, ...)")
    if not bool(torch.isfinite(x).all()):
        raise DataError("x contains NaN or Inf values")


def fit_factors(model: nn.Module, x, target: str = "confounding", n_ones: int | None = None,
                output: str = "softmax", damping: float = 0.1, batch_size: int = 256) -> KFACFactors:
    """A and S of every layer below the head, from model inputs ``x`` (the known training
    samples: a tensor, or a callable returning an iterator of tensor chunks, read twice:
    once for the memo's key, once for the factors), in one pass of batches; returns their
    damped inverse square roots."""
    chunks = (lambda: [x]) if isinstance(x, Tensor) else x
    if not damping > 0:
        raise ConfigError(f"damping must be > 0, got {damping!r}")
    digests = []
    for chunk in chunks():
        _check_x(chunk)
        digests.append(_digest(chunk))
    key = ("fit", _model_key(model), tuple(digests), target, n_ones, output, float(damping), batch_size)
    factors = _memo(key, lambda: _fit_factors(model, chunks, target, n_ones, output, damping, batch_size))
    factors.key = key
    return factors


def _fit_factors(model, chunks, target, n_ones, output, damping, batch_size) -> KFACFactors:
    found = kfac_layers(model)
    sums = {n: [0.0, 0.0, 0] for n, _, _ in found}  # Σ u uᵀ, Σ δ δᵀ, positions

    def accumulate(name, m, a, g):
        u, d = _positions(m, a, g)
        s = sums[name]
        s[0] = s[0] + _gram(u)
        s[1] = s[1] + _gram(d)
        s[2] += u.shape[0] * u.shape[1]
        return a.new_zeros(a.shape[0], 0)

    layers = [capture.Layer(n, m, ("weight",), lambda a, g, n=n, m=m: accumulate(n, m, a, g),
                            lambda a, m=m, r=r: r.check_input(m, a)) for n, m, r in found]
    ref = next(model.parameters())
    with capture.requiring_grad(layer.module.weight for layer in layers), eval_mode(model):
        for x in chunks():
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].to(device=ref.device, dtype=ref.dtype)
                _batch(model, layers, [0] * len(layers), xb, _loss(target, n_ones, output))
    factors = KFACFactors([n for n, _, _ in found])
    for n, (uu, dd, count) in sums.items():
        if not count:
            raise DataError("K-FAC factors need at least one training sample")
        factors.a_isqrt[n] = damped_inv_sqrt(uu / count, damping)
        factors.s_isqrt[n] = damped_inv_sqrt(dd / count, damping)
    return factors


def kfac_features(model: nn.Module, x: Tensor, factors: KFACFactors, target: str = "confounding",
                  n_ones: int | None = None, output: str = "softmax", batch_size: int = 256) -> dict[str, Tensor]:
    """``{"whitened": log w, "activation": log a, "gradient": log d}``, each float64 N×L
    (the layers of ``factors`` in order; see the module docstring)."""
    _check_x(x)
    factors_key = getattr(factors, "key", None) or _digest(*factors.state().values())
    key = ("features", _model_key(model), _digest(x), factors_key, target, n_ones, output, batch_size)
    return _memo(key, lambda: _features(model, x, factors, target, n_ones, output, batch_size))


def _features(model, x, factors, target, n_ones, output, batch_size) -> dict[str, Tensor]:
    found = {n: (m, r) for n, m, r in kfac_layers(model)}
    missing = [n for n in factors.names if n not in found]
    if missing:
        raise ConfigError(f"the K-FAC factors name layers the model does not have: {missing}")

    def reduce(name, a, g):
        m = found[name][0]
        dev = dict(device=a.device, dtype=a.dtype)
        s_is, a_is = factors.s_isqrt[name].to(**dev), factors.a_isqrt[name].to(**dev)
        out = []
        # per sample, so in slices of REDUCE_SAMPLES: a batch's (B, O, I) whitened gradients
        # and (B, T, I) whitened patches at once were most of the plus preset's peak memory
        for s in range(0, a.shape[0], REDUCE_SAMPLES):
            u, d = _positions(m, a[s:s + REDUCE_SAMPLES], g[s:s + REDUCE_SAMPLES])
            u, d = u @ a_is, d @ s_is  # (b, T, I) whitened inputs, (b, T, O) whitened output gradients
            whitened = d.transpose(1, 2) @ u  # (b, O, I): L (dJ/dW) R, L and R symmetric
            out.append(torch.stack([whitened.square().sum((1, 2)), u.square().sum(-1).mean(1),
                                    d.square().sum(-1).mean(1)], 1))
        return torch.cat(out)

    layers = [capture.Layer(n, found[n][0], ("weight",), lambda a, g, n=n: reduce(n, a, g),
                            lambda a, n=n: found[n][1].check_input(found[n][0], a)) for n in factors.names]
    ref = next(model.parameters())
    rows = []
    with capture.requiring_grad(layer.module.weight for layer in layers), eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device=ref.device, dtype=ref.dtype)
            rows.append(_batch(model, layers, [3] * len(layers), xb, _loss(target, n_ones, output))
                        .to("cpu", torch.float64))
    n_layers = len(factors.names)
    values = (torch.cat(rows) if rows else torch.zeros(0, 3 * n_layers, dtype=torch.float64))
    values = values.reshape(-1, n_layers, 3).clamp_min(_FLOOR).log()
    return {name: values[:, :, i].contiguous() for i, name in enumerate(FEATURES)}
