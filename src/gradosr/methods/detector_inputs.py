"""The gradient features a method computes from a classifier for model inputs x.

- :func:`gradient_features`: the paper's representation (Eq. 1, log per-parameter
  squared gradient norms, :func:`gradosr.representation.extract`), followed by the
  configured projected gradients of the layers below the head and the logit statistics
  (``OSRConfig.projection_inputs`` / ``logit_inputs``): the MLP detector's inputs;
- :func:`logit_statistics`: max logit, logsumexp, max softmax;
- :func:`projection_columns`: which projected-gradient columns lie below the head.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from gradosr.classifier import batched_outputs
from gradosr.representation import extract, transform


def logit_statistics(logits: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """The statistics ``names`` (see ``OSRConfig.logit_inputs``) of logits N×K: float64 N×len(names)."""
    z = torch.as_tensor(logits).to(torch.float64)
    stats = {"max_logit": lambda: z.max(dim=1).values, "logsumexp": lambda: torch.logsumexp(z, dim=1),
             "max_softmax": lambda: torch.softmax(z, dim=1).max(dim=1).values}
    return torch.stack([stats[n]() for n in names], dim=1) if names else z.new_zeros((len(z), 0))


def gradient_features(model: nn.Module, x: torch.Tensor, config, param_names: list[str], seed: int,
                      progress: bool = False, desc: str = "gradients") -> torch.Tensor:
    """Transformed (log) representations of model inputs x (N×C×H×W) over the
    parameters ``param_names``, followed by the projected gradients and logit inputs of
    ``config`` (an OSRConfig) of the same model: float64 N×(P + R + L). The projection
    matrices are drawn from ``seed``."""
    rep = replace(config.representation, params=tuple(param_names))
    r, _ = extract(model, x, rep, config.extraction.batch_size, progress, desc)
    parts = [transform(r, rep.log)]
    if config.projection_inputs:
        from gradosr.gradients.projection import projected_gradients

        keep = projection_columns(model, config.projection_inputs)
        pg = projected_gradients(model, x, config.projection_inputs, rep.target, rep.n_ones, rep.output,
                                 seed=seed, batch_size=config.extraction.batch_size)
        parts.append(pg[:, keep])
    if config.logit_inputs:
        z = batched_outputs(model, x, config.extraction.batch_size)[0].to(torch.float64)
        parts.append(logit_statistics(z, config.logit_inputs))
    return torch.cat(parts, dim=1)


def projection_columns(model: nn.Module, dim: int) -> torch.Tensor:
    """Indices of the projected-gradient columns (``dim`` per side) of every layer but the head."""
    from gradosr.gradients.projection import layer_widths
    from gradosr.models import find_head_name

    head, cols, start = find_head_name(model), [], 0
    for name, width in layer_widths(model, dim):
        if name != head:
            cols.append(torch.arange(start, start + width))
        start += width
    return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
