"""``GradientOSR``: the open-set recognizer of Lee & AlRegib, "Open-Set Recognition with
Gradient-Based Representations", ICIP 2021, as a thin scikit-learn-style estimator.

1. A closed-set classifier is trained on the K known classes (or brought by the user).
2. A method strategy (:mod:`gradosr.methods`) is fitted on it: ``proxy`` (the paper,
   §3.2: an MLP on a proxy classifier's gradient representations, Eq. 1) or ``fusion``
   (the ``plus`` preset: the Fisher-whitened gradient norms and the activation norms of
   the layers below the head, kNN on features and the max logit, calibrated on held-out
   knowns; docs/ablation.md).
3. An input is accepted as known when its score reaches the threshold (the paper:
   P(known) >= 0.95), else labelled -1 (unknown); accepted inputs get the argmax.

Every option is a field of :class:`gradosr.methods.config.OSRConfig`, set by name
(``detector__hidden=32``, or a flat ``hidden=32``) and recorded in ``osr.json``.
Conventions of scikit-learn: constructor parameters stored as given, ``get_params`` /
``set_params`` (so ``sklearn.base.clone`` works), fitted attributes with a trailing
underscore (``classifier_``, ``config_``, ``method_``, ``threshold_``), and
:class:`gradosr.errors.NotFittedError` before ``fit`` or ``load``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData
from gradosr.errors import ConfigError, NotFittedError
from gradosr.methods import STRATEGIES, FitContext, ProxyStore, persistence
from gradosr.methods.config import DEFAULT_PRESET, OSRConfig, make_config, nested_params
from gradosr.methods.fit_data import array_data, check_every_class, protocol_classifier, protocol_data
from gradosr.metrics import open_set_predictions, threshold_at_tpr
from gradosr.models import find_head
from gradosr.streams import as_model_inputs, chunk_rows, map_chunks
from gradosr.train import TrainConfig

_PARAMS = ("preset", "classifier", "train_config", "proxy_factory", "device", "progress", "seed", "proxy_store")


class GradientOSR:
    """Open-set recognizer with gradient-based representations.

    Build it with ``GradientOSR(preset, **options)`` and fit it on a protocol
    (:class:`gradosr.data.OSRData`), or wrap a trained classifier with
    :meth:`from_classifier` and fit it on arrays of known-class data. After fitting:
    ``score_samples(x)`` float64 N (higher = known), ``predict(x)`` int64 N (class
    0..K-1 or -1), ``save(dir)`` / ``GradientOSR.load(dir)`` (safetensors + JSON, no
    pickle). ``x``: uint8 images N×H×W×C (the classifier's preprocessing is applied) or
    float model inputs N×C×H×W.

    Parameters: ``classifier`` (a :class:`Classifier`; None: trained on the protocol),
    ``train_config`` (the closed-set and proxy training recipe), ``proxy_factory(n)``
    (a fresh proxy model with n outputs, for custom architectures), ``seed`` (the
    method's seed: the detector, the random projections and the array validation
    split; the training seed is ``train_config.seed``), ``proxy_store``
    (a :class:`gradosr.methods.ProxyStore` shared between estimators), ``device``,
    ``progress``.
    """

    def __init__(self, preset: str = DEFAULT_PRESET, classifier: Classifier | None = None,
                 train_config: TrainConfig | None = None, proxy_factory: Callable[[int], nn.Module] | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, seed: int = 0,
                 proxy_store: ProxyStore | None = None, **options):
        self.preset, self.classifier, self.train_config = preset, classifier, train_config
        self.proxy_factory, self.device, self.progress, self.seed = proxy_factory, device, progress, seed
        self.proxy_store = proxy_store
        self.options = options
        self.resolved_config()  # a bad option fails here, before anything is trained

    @classmethod
    def from_classifier(cls, model: nn.Module, preprocessing=None, class_ids: list[int] | None = None,
                        class_names: list[str] | None = None, train_config: TrainConfig | None = None,
                        proxy_factory: Callable[[int], nn.Module] | None = None, preset: str = DEFAULT_PRESET,
                        **kwargs) -> "GradientOSR":
        """Wrap a user's trained ``nn.Module`` (N×C×H×W inputs -> N×K logits). Proxies come
        from ``proxy_factory(n)``, or the model deep-copied, re-initialised and its head
        (last ``nn.Linear``) resized, trained with ``train_config`` (default: Adam lr 1e-3,
        batch 128, 15 epochs)."""
        k = find_head(model).out_features
        ids = list(range(k)) if class_ids is None else [int(c) for c in class_ids]
        if len(ids) != k:
            raise ConfigError(f"class_ids has {len(ids)} entries but the model's head has {k} outputs")
        clf = Classifier(model, "custom", preprocessing, ids, class_names, {"complete": True})
        return cls(preset=preset, classifier=clf, train_config=train_config or TrainConfig(model="custom"),
                   proxy_factory=proxy_factory, **kwargs)

    # -------------------------------------------------------------- parameters
    def resolved_config(self) -> OSRConfig:
        """The config that the preset and options give (what ``fit`` will use)."""
        return make_config(self.preset, seed=self.seed, **self.options)

    def get_params(self, deep: bool = True) -> dict:
        """Constructor parameters and options as given; with ``deep``, also every config
        field under its nested name (``detector__hidden``, …)."""
        params = {**{n: getattr(self, n) for n in _PARAMS}, **self.options}
        if deep:
            params.update({k: v for k, v in nested_params(self.resolved_config()).items() if k not in params})
        return params

    def set_params(self, **params) -> "GradientOSR":
        """Change parameters or options (nested names such as ``detector__hidden``); the
        next ``fit`` uses them."""
        options = {**self.options, **{k: v for k, v in params.items() if k not in _PARAMS}}
        make_config(params.get("preset", self.preset), seed=params.get("seed", self.seed), **options)  # refuse first
        for k, v in params.items():
            if k in _PARAMS:
                setattr(self, k, v)
        self.options = options
        return self

    @property
    def num_known(self) -> int:
        return (self.classifier_ if hasattr(self, "classifier_") else self.classifier).num_classes

    # --------------------------------------------------------------------- fit
    def fit(self, x, y=None, x_val=None, y_val=None, run_dir: str | os.PathLike | None = None) -> "GradientOSR":
        """Fit on a protocol (``x`` an :class:`OSRData`: the classifier is trained or reused
        from ``<run_dir>/classifier`` unless given) or on arrays of known data (``y``
        labels 0..K-1 of the classifier; ``x_val``/``y_val`` held-out knowns, default a
        stratified 20% of x). Arrays may also be an image source or a torch Dataset /
        DataLoader of ``(image, label)`` (``y`` then optional), streamed chunk by chunk
        (:mod:`gradosr.streams`). With ``run_dir`` the fitted method is saved there."""
        run_dir = Path(run_dir) if run_dir is not None else None
        config = self.resolved_config()
        method = STRATEGIES[config.method](config, self.seed, self.progress)
        device = torch.device(self.device)
        if isinstance(x, OSRData):
            method.check(x.num_known)
            clf, tc = protocol_classifier(x, self.classifier, self.train_config, self.seed, run_dir, device,
                                          self.progress)
            data = protocol_data(x, clf)
        else:
            if self.classifier is None:
                raise ConfigError("fitting on arrays needs a trained classifier: use GradientOSR.from_classifier, "
                                  "or pass a protocol (OSRData)")
            clf, tc = self.classifier, self.train_config
            method.check(clf.num_classes)
            data = array_data(clf, x, y, x_val, y_val, self.seed)
        check_every_class(data, clf.num_classes)
        store = self.proxy_store if self.proxy_store is not None else ProxyStore()
        method.fit(FitContext(clf, tc, self.proxy_factory, store, device, self.progress, run_dir), data)
        self.classifier_, self.train_config_, self.config_, self.method_ = clf, tc, config, method
        self.threshold_ = (float(config.threshold) if config.threshold_rule == "fixed"
                           else threshold_at_tpr(self._scores(method, clf, data.xv, config), config.target_tpr))
        if run_dir is not None:
            self.save(run_dir)
        return self

    # --------------------------------------------------------------- inference
    def check_fitted(self) -> None:
        if not hasattr(self, "method_"):
            raise NotFittedError("this GradientOSR is not fitted: call fit() or load() first")

    def representations(self, x) -> torch.Tensor:
        """The ``proxy`` method's detector inputs of ``x`` from the final classifier,
        standardised for the first proxy split (float64 N×P)."""
        self.check_fitted()
        if not hasattr(self.method_, "representations"):
            raise ConfigError("representations() are the proxy method's detector inputs; "
                              f"the {self.config_.method} method has none")
        return self.method_.representations(self.classifier_, self.classifier_.inputs(x))

    @staticmethod
    def _scores(method, clf, inputs, config) -> np.ndarray:
        rows = chunk_rows(config.extraction.batch_size)
        return map_chunks(lambda xb: method.score_samples(clf, xb), inputs, rows)

    def score_samples(self, x) -> np.ndarray:
        """Score of each input (float64 N), higher = more likely known: P(known) for
        ``proxy`` (the mean over an ensemble's splits), the combined signals for ``fusion``.
        ``x``: uint8 images or float model inputs (array or tensor), an image source, or a
        torch Dataset / DataLoader (:func:`gradosr.streams.as_model_inputs`), scored chunk
        by chunk."""
        self.check_fitted()
        return self._scores(self.method_, self.classifier_, as_model_inputs(x, self.classifier_.inputs),
                            self.config_)

    def predict(self, x, return_scores: bool = False):
        """Open-set labels (int64 N): the classifier's argmax, or -1 where the score is
        below the threshold. With ``return_scores``: (labels, scores). ``x`` as for
        :meth:`score_samples`."""
        self.check_fitted()
        inputs = as_model_inputs(x, self.classifier_.inputs)
        scores, closed = [], []
        for xb in inputs.chunks(chunk_rows(self.config_.extraction.batch_size)):
            scores.append(np.asarray(self.method_.score_samples(self.classifier_, xb), dtype=np.float64))
            closed.append(self.classifier_.logits(xb).argmax(1).numpy())
        if not scores:
            return (np.zeros(0, np.int64), np.zeros(0)) if return_scores else np.zeros(0, np.int64)
        scores = np.concatenate(scores)
        labels = open_set_predictions(np.concatenate(closed), scores, self.threshold_)
        return (labels, scores) if return_scores else labels

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write the run folder's method files (:mod:`gradosr.methods.persistence`)."""
        persistence.save(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, model: nn.Module | None = None,
             device: str | torch.device = "cpu", model_ref: str | None = None) -> "GradientOSR":
        """Load what :meth:`save` wrote. ``model``: an instance of a custom architecture;
        ``model_ref``: the ``package.module:factory`` of a user model, given again (a run
        folder never makes gradosr import a module)."""
        return persistence.load(cls, directory, model, device, model_ref)
