"""The proxy classifiers of the paper's method (Lee & AlRegib, ICIP 2021, §3.2): trained
on the proxy-known classes, kept in memory by proxy split and on disk in a folder.

A :class:`ProxyStore` is an explicit collaborator of :class:`gradosr.osr.GradientOSR`
(its ``proxy_store`` parameter): share one store between estimators on the same
classifier and each proxy is trained once (``gradosr ablate`` does this). Folders:
``<run_dir>/proxy``, ``<run_dir>/proxy2``, … when the fit has a run folder (the i-th
split of an ensemble), otherwise ``<root>/proxy-<labels>`` when the store has a root,
otherwise nothing is written.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradosr.classifier import Classifier
from gradosr.errors import CheckpointError, ConfigError
from gradosr.models import find_head, reset_parameters, resize_head
from gradosr.runs import RunLayout, identity_mismatch
from gradosr.train import TrainConfig, train_classifier


class ProxyStore:
    """Trained proxy classifiers by proxy-unknown labels (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = root
        self.trained: dict[tuple[int, ...], Classifier] = {}

    def folder(self, proxy_unknown: list[int], index: int, run_dir: Path | None) -> Path | None:
        if run_dir is not None:
            return RunLayout(run_dir).proxy(index)
        if self.root is not None:
            return Path(self.root) / ("proxy-" + "-".join(str(c) for c in proxy_unknown))
        return None

    def get(self, classifier: Classifier, train_config: TrainConfig, proxy_factory: Callable[[int], nn.Module] | None,
            xt: torch.Tensor, yt: np.ndarray, xv: torch.Tensor, yv: np.ndarray, proxy_unknown: list[int],
            index: int, identity: dict, run_dir: Path | None, device: torch.device, progress: bool) -> Classifier:
        """Train (or reuse) the proxy classifier of ``proxy_unknown`` on the proxy knowns
        of the known training data ``xt``/``yt`` (labels 0..K-1; ``xv``/``yv`` held out)."""
        if tuple(proxy_unknown) in self.trained:
            return self.trained[tuple(proxy_unknown)]
        k = classifier.num_classes
        keep = [c for c in range(k) if c not in proxy_unknown]
        remap = np.full(k, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        ids = [classifier.class_ids[c] for c in keep]
        names = [classifier.class_names[c] for c in keep]
        wanted = {**identity, "train": train_config.to_dict(), "proxy_of": keep}
        out = self.folder(proxy_unknown, index, run_dir)
        custom = classifier.arch == "custom"

        def new_model():
            return _proxy_model(classifier, train_config, proxy_factory, len(keep), device) if custom else None

        if out is not None and (out / "model.json").is_file():
            stored = Classifier.load(out, model=new_model(), device=device, model_ref=train_config.model)
            reason = identity_mismatch(stored.meta, wanted)
            if reason is None and stored.meta.get("complete"):
                return stored
            if reason is not None:
                raise CheckpointError(f"{out} holds another proxy classifier: {reason}. Use another run folder")
        u_train, u_val = np.isin(yt, proxy_unknown), np.isin(yv, proxy_unknown)
        proxy = train_classifier((xt[~u_train], remap[yt[~u_train]]), (xv[~u_val], remap[yv[~u_val]]), ids,
                                 train_config, classifier.preprocessing, out_dir=out, progress=progress,
                                 device=device, class_names=names, meta={**identity, "proxy_of": keep},
                                 model=new_model(), resume=out is not None and (out / "model.json").is_file())
        self.trained[tuple(proxy_unknown)] = proxy
        return proxy


def _proxy_model(classifier: Classifier, train_config: TrainConfig, proxy_factory, n: int,
                 device: torch.device) -> nn.Module:
    """A fresh model with ``n`` outputs for a custom architecture: ``proxy_factory(n)``, or
    the classifier deep-copied, its head resized and every parameter re-initialised from
    the training seed."""
    if proxy_factory is not None:
        model = proxy_factory(n)
    else:
        model = copy.deepcopy(classifier.model)
        resize_head(model, n)  # before the seeded reset: the new head is initialised from the seed too
        reset_parameters(model, seed=train_config.seed)
    if find_head(model).out_features != n:
        raise ConfigError(f"the proxy model must have {n} outputs")
    return model.to(device)
