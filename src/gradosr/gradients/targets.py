"""Per-sample losses whose gradients form the representation.

Every function maps logits ``z`` of shape ``(B, N)`` to a loss per sample, shape ``(B,)``,
computed in log space from the logits (never ``log(1 - softmax(z))``), so that it stays
finite and accurate in float32 when one class is near-certain.

Targets:

- ``"confounding"``: the confounding label of Lee & AlRegib, "Open-Set Recognition with
  Gradient-Based Representations" (ICIP 2021), Sec. 3.1;
- ``"predicted"``: cross-entropy against the predicted (argmax) label;
- ``"uniform"``: cross-entropy against the uniform target, as in GradNorm (Huang, Geng
  and Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
  Wild", NeurIPS 2021).

The positions of the confounding ones and the predicted label are chosen from the
detached logits: they are constants of the loss, not differentiated through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradosr.errors import ConfigError, DataError

TARGETS = ("confounding", "predicted", "uniform")
OUTPUTS = ("softmax", "sigmoid")


def _check_logits(z: Tensor) -> int:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] < 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise DataError(f"logits must be a (B, N) tensor with N >= 2 classes, got {shape}")
    if not z.is_floating_point():
        raise DataError(f"logits must be floating point, got {z.dtype}")
    return z.shape[1]


def check_n_ones(n_ones: object, num_classes: int | None = None) -> None:
    """Validate the number of ones of a confounding label (``None`` means N).

    Raises:
        ConfigError: ``n_ones`` is not an int, is 1 (an ordinary label), negative, or
            larger than ``num_classes`` (when given).
    """
    if n_ones is None:
        return
    if isinstance(n_ones, bool) or not isinstance(n_ones, int):
        raise ConfigError(f"n_ones must be an integer or None, got {n_ones!r}")
    if n_ones == 1:
        raise ConfigError("n_ones=1 is not a confounding label (it is an ordinary label); "
                          "use 0 or 2..N")
    if n_ones < 0 or (num_classes is not None and n_ones > num_classes):
        bound = "N" if num_classes is None else str(num_classes)
        raise ConfigError(f"n_ones must be in {{0, 2, ..., {bound}}}, got {n_ones}")


def check_target(target: object, output: object = "softmax") -> None:
    """Raise :class:`ConfigError` for an unknown ``target`` or ``output``."""
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if output not in OUTPUTS:
        raise ConfigError(f"unknown output {output!r}; expected one of {', '.join(OUTPUTS)}")


def _log_one_minus_softmax(z: Tensor) -> Tensor:
    """``log(1 - softmax(z))`` for ``z`` of shape ``(B, N)``, exactly, in log space.

    ``log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp_j z_j``, the first term computed on
    a ``(B, N, N)`` copy of ``z`` whose diagonal is masked with ``-inf``.
    """
    n = z.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    others = z.unsqueeze(1).expand(-1, n, n).masked_fill(eye, float("-inf"))
    return torch.logsumexp(others, dim=2) - torch.logsumexp(z, dim=1, keepdim=True)


def confounding_loss(z: Tensor, n_ones: int | None = None, output: str = "softmax") -> Tensor:
    """Binary cross-entropy against the confounding label (Lee & AlRegib, ICIP 2021).

    The confounding label ``y_c`` is a length-N vector with ``n`` ones, ``n`` in
    ``{0, 2, 3, ..., N}`` (``n = 1`` would be an ordinary label). For ``n < N`` the ones
    sit at the ``n`` largest logits of each sample (ties broken by the lower index). With
    ``p = softmax(z)`` or ``p = sigmoid(z)`` (``output``), the loss is summed over the N
    outputs::

        J(x) = -sum_k [ y_k log p_k + (1 - y_k) log(1 - p_k) ]

    computed in log space: softmax uses ``log p = log_softmax(z)`` and
    ``log(1 - p_k) = logsumexp_{j != k} z_j - logsumexp(z)``; sigmoid uses
    ``log p = logsigmoid(z)`` and ``log(1 - p) = logsigmoid(-z)``.

    With softmax and ``n = N`` the logit gradient is ``dJ/dz = N p - 1`` (N times the
    gradient of GradNorm's uniform target).

    Args:
        z: logits, shape ``(B, N)``, N >= 2.
        n_ones: number of ones ``n``; ``None`` means N.
        output: ``"softmax"`` (default) or ``"sigmoid"``.

    Returns:
        Loss per sample, shape ``(B,)``.

    Raises:
        DataError: ``z`` is not ``(B, N)`` with N >= 2.
        ConfigError: invalid ``n_ones`` or ``output``.
    """
    n = _check_logits(z)
    check_target("confounding", output)
    check_n_ones(n_ones, n)
    k = n if n_ones is None else n_ones
    if output == "softmax":
        log_p, log_q = F.log_softmax(z, dim=1), _log_one_minus_softmax(z)
    else:
        log_p, log_q = F.logsigmoid(z), F.logsigmoid(-z)
    if k == n:
        return -log_p.sum(dim=1)
    if k == 0:
        return -log_q.sum(dim=1)
    top = torch.argsort(z.detach(), dim=1, descending=True, stable=True)[:, :k]
    y = torch.zeros_like(z).scatter(1, top, 1.0)
    return -(y * log_p + (1 - y) * log_q).sum(dim=1)


def predicted_loss(z: Tensor) -> Tensor:
    """Cross-entropy against the predicted label: ``J = -log_softmax(z)[argmax z]``.

    Args:
        z: logits, shape ``(B, N)``, N >= 2.

    Returns:
        Loss per sample, shape ``(B,)``.
    """
    _check_logits(z)
    label = z.detach().argmax(dim=1, keepdim=True)
    return -F.log_softmax(z, dim=1).gather(1, label).squeeze(1)


def uniform_loss(z: Tensor) -> Tensor:
    """Cross-entropy against the uniform target (GradNorm, Huang et al., NeurIPS 2021).

    ``J = -(1/N) sum_k log_softmax(z)_k``; its logit gradient is ``p - 1/N``.

    Args:
        z: logits, shape ``(B, N)``, N >= 2.

    Returns:
        Loss per sample, shape ``(B,)``.
    """
    _check_logits(z)
    return -F.log_softmax(z, dim=1).mean(dim=1)


def per_sample_loss(
    z: Tensor, target: str = "confounding", n_ones: int | None = None, output: str = "softmax"
) -> Tensor:
    """Loss per sample for ``target`` in ``{"confounding", "predicted", "uniform"}``.

    ``n_ones`` and ``output`` apply to the confounding target only (see
    :func:`confounding_loss`). ``z``: ``(B, N)`` logits; returns shape ``(B,)``.

    Raises:
        ConfigError: unknown ``target`` or ``output``, invalid ``n_ones``.
        DataError: ``z`` is not ``(B, N)`` with N >= 2.
    """
    check_target(target, output)
    if target == "confounding":
        return confounding_loss(z, n_ones=n_ones, output=output)
    if target == "predicted":
        return predicted_loss(z)
    return uniform_loss(z)
