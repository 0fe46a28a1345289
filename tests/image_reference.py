"""Image conversions written out in NumPy: the independent expectation of the
preprocessing tests and of the folder/array readers' conversions."""

from __future__ import annotations

import numpy as np


def luma(images: np.ndarray) -> np.ndarray:
    """N×H×W×C uint8 (C = 1, 3 or 4) -> N×H×W float64 grey in [0, 1] (ITU-R BT.601, alpha dropped)."""
    x = images.astype(np.float64) / 255.0
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of H×W with half-pixel centres (align_corners=False), written out."""
    h, w = img.shape

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(h, out_h)
    x0, x1, wx = axis(w, out_w)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]
