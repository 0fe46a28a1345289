"""What a GradientOSR fit starts from: a protocol split (:class:`gradosr.data.OSRData`,
the classifier trained or reused) or arrays of known data with a classifier brought by
the user. Both end as :class:`gradosr.methods.base.FitData`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradosr.classifier import Classifier
from gradosr.data.protocols import OSRData
from gradosr.errors import ConfigError, DataError
from gradosr.methods.base import FitData
from gradosr.streams import SourceInputs, TensorInputs, as_model_inputs
from gradosr.train import TrainConfig


def protocol_classifier(data: OSRData, classifier: Classifier | None, train_config: TrainConfig | None, seed: int,
                        run_dir: Path | None, device, progress: bool) -> tuple[Classifier, TrainConfig]:
    """The protocol's final classifier (given, or trained / reused from
    ``<run_dir>/classifier``) and its training recipe."""
    if classifier is None:
        from gradosr.runs import ensure_classifier
        from gradosr.train import default_train_config

        train_config = train_config or default_train_config(data.spec.dataset, seed=seed)
        classifier, _ = ensure_classifier(data, train_config, run_dir / "classifier" if run_dir else None,
                                          device=device, progress=progress)
    if classifier.num_classes != data.num_known:
        raise ConfigError(f"the classifier has {classifier.num_classes} classes, the protocol "
                          f"{data.num_known} known classes")
    if train_config is None:
        train_config = TrainConfig.from_dict(classifier.meta.get("train", {}))
    return classifier, train_config


def protocol_data(data: OSRData, classifier: Classifier) -> FitData:
    """Known training and validation inputs of a protocol split (streamed from its image
    sources, :mod:`gradosr.streams`); proxy splits from its seed."""
    return FitData(SourceInputs(data.known_train, classifier.inputs), data.known_train.labels,
                   SourceInputs(data.val, classifier.inputs), data.val.labels, data.spec.seed,
                   {"protocol": data.spec.to_dict()})


def array_data(classifier: Classifier, x, y, x_val, y_val, seed: int) -> FitData:
    """Known training data (uint8 images or float inputs as arrays or tensors, an image
    source, or a torch Dataset / DataLoader: :func:`gradosr.streams.as_model_inputs`)
    with labels 0..K-1 (``y``, or those a Dataset yields); held-out knowns
    ``x_val``/``y_val``, or a stratified 20% of x drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    xt = as_model_inputs(x, classifier.inputs, y)
    if xt.labels is None:
        raise ConfigError("fit(x, y) needs the labels y (0..K-1) of x, or a Dataset/DataLoader of (image, label)")
    if classifier.input_shape is None:  # recorded, so that later inputs of another shape are refused
        first = next(iter(xt.chunks()), None)
        if first is not None:
            classifier.meta["input_shape"] = list(first.shape[1:])
    yt = xt.labels
    k = classifier.num_classes
    if len(yt) and (yt.min() < 0 or yt.max() >= k):
        raise DataError(f"labels must lie in 0..{k - 1}")
    if x_val is None:
        idx_t, idx_v = train_test_split(np.arange(len(yt)), test_size=0.2, stratify=yt, random_state=seed)
        if not isinstance(xt, TensorInputs):  # a streamed subset keeps the rows in their order
            idx_t, idx_v = np.sort(idx_t), np.sort(idx_v)
        return FitData(xt.subset(idx_t), yt[idx_t], xt.subset(idx_v), yt[idx_v], seed, {})
    xv = as_model_inputs(x_val, classifier.inputs, y_val)
    if xv.labels is None:
        raise ConfigError("x_val needs its labels y_val")
    return FitData(xt, yt, xv, xv.labels, seed, {})


def check_every_class(data: FitData, k: int) -> None:
    """DataError naming the known classes without training samples."""
    missing = sorted(set(range(k)) - set(np.unique(data.yt).tolist()))
    if missing:
        raise DataError(f"known classes {missing} have no training samples")
