"""Tests for gradosr.preprocess against normalisation, luma and resizing computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradosr.errors import ConfigError, DataError
from gradosr.preprocess import Preprocessing

ATOL = 1e-6  # float32 output against float64 hand computations


def images(seed: int, n: int, h: int, w: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    x[0, 0, 0] = 0
    x[0, 0, 1] = 255
    return x


def by_hand(x: np.ndarray, mean, std) -> np.ndarray:
    """uint8 N×H×W×C -> float64 N×C×H×W, (x/255 - mean)/std."""
    y = x.astype(np.float64) / 255.0
    y = (y - np.asarray(mean)) / np.asarray(std)
    return y.transpose(0, 3, 1, 2)


def test_default_normalisation():
    x = images(0, 4, 28, 28, 1)
    p = Preprocessing.default((28, 28), 1)
    assert p.mean == (0.5,) and p.std == (0.5,)
    out = p(x)
    assert out.dtype == torch.float32 and tuple(out.shape) == (4, 1, 28, 28)
    assert out.is_contiguous()
    expected = ((x.astype(np.float64) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), expected, atol=ATOL, rtol=0)
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() == pytest.approx(1.0)


def test_custom_mean_std_per_channel():
    x = images(1, 3, 8, 9, 3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    p = Preprocessing((8, 9), 3, mean, std)
    np.testing.assert_allclose(p(x).numpy(), by_hand(x, mean, std), atol=1e-5, rtol=0)


def test_torch_tensor_input_equals_numpy_input():
    x = images(2, 2, 28, 28, 1)
    p = Preprocessing.default((28, 28), 1)
    torch.testing.assert_close(p(torch.from_numpy(x)), p(x), rtol=0, atol=0)


def test_nhw_input():
    x = images(3, 3, 28, 28, 1)
    p = Preprocessing.default((28, 28), 1)
    torch.testing.assert_close(p(x[..., 0]), p(x), rtol=0, atol=0)
    np.testing.assert_allclose(p(x[..., 0]).numpy(), by_hand(x, (0.5,), (0.5,)), atol=ATOL, rtol=0)


def test_rgb_to_grey_luma():
    x = images(4, 3, 10, 12, 3)
    p = Preprocessing.default((10, 12), 1)
    r, g, b = (x[..., i].astype(np.float64) for i in range(3))
    grey = (0.299 * r + 0.587 * g + 0.114 * b) / 255.0
    expected = ((grey - 0.5) / 0.5)[:, None]
    out = p(x)
    assert tuple(out.shape) == (3, 1, 10, 12)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=0)


def test_grey_to_rgb_repeats():
    x = images(5, 2, 7, 7, 1)
    p = Preprocessing((7, 7), 3, (0.1, 0.2, 0.3), (1.0, 2.0, 4.0))
    out = p(x).numpy()
    assert out.shape == (2, 3, 7, 7)
    expected = by_hand(np.repeat(x, 3, axis=-1), p.mean, p.std)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_rgba_drops_alpha(channels):
    x = images(6, 2, 9, 9, 4)
    p = Preprocessing.default((9, 9), channels)
    torch.testing.assert_close(p(x), p(np.ascontiguousarray(x[..., :3])), rtol=0, atol=0)
    # the alpha channel has no influence
    y = x.copy()
    y[..., 3] = 255 - y[..., 3]
    torch.testing.assert_close(p(x), p(y), rtol=0, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_resize_28_to_32(channels):
    x = images(7, 3, 28, 28, channels)
    p = Preprocessing.default((32, 32), channels)
    out = p(x)
    assert tuple(out.shape) == (3, channels, 32, 32)
    # normalise by hand, then interpolate: it commutes with the per-channel affine map
    normalised = torch.from_numpy(by_hand(x, p.mean, p.std))
    expected = F.interpolate(normalised, size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5, rtol=0)
    # and interpolating the raw [0, 1] image first gives the same
    raw = torch.from_numpy(x.astype(np.float64).transpose(0, 3, 1, 2) / 255.0)
    other = (F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False) - 0.5) / 0.5
    np.testing.assert_allclose(out.numpy(), other.numpy(), atol=1e-5, rtol=0)


def test_resize_non_square_and_down():
    x = images(8, 2, 32, 32, 3)
    p = Preprocessing.default((20, 24), 1)
    out = p(x)
    assert tuple(out.shape) == (2, 1, 20, 24)
    r, g, b = (x[..., i].astype(np.float64) for i in range(3))
    grey = torch.from_numpy(((0.299 * r + 0.587 * g + 0.114 * b) / 255.0)[:, None])
    expected = (F.interpolate(grey, size=(20, 24), mode="bilinear", align_corners=False) - 0.5) / 0.5
    np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5, rtol=0)


def test_resize_constant_image_stays_constant():
    x = np.full((1, 28, 28, 1), 51, np.uint8)  # 51/255 = 0.2
    out = Preprocessing.default((32, 32), 1)(x)
    np.testing.assert_allclose(out.numpy(), np.full((1, 1, 32, 32), (0.2 - 0.5) / 0.5), atol=ATOL, rtol=0)


@pytest.mark.parametrize("size, channels", [((28, 28), 1), ((32, 32), 3)])
def test_empty_batch(size, channels):
    out = Preprocessing.default(size, channels)(np.zeros((0, 28, 28, 1), np.uint8))
    assert tuple(out.shape) == (0, channels) + size


def test_batches_are_independent():
    x = images(9, 6, 28, 28, 3)
    p = Preprocessing.default((32, 32), 3)
    whole = p(x)
    parts = torch.cat([p(x[:2]), p(x[2:])])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16, np.int8])
def test_wrong_dtype(dtype):
    x = np.zeros((2, 28, 28, 1), dtype)
    with pytest.raises(DataError, match="uint8"):
        Preprocessing.default((28, 28), 1)(x)


@pytest.mark.parametrize("shape", [(28, 28), (784,), (1, 2, 28, 28, 1), ()])
def test_wrong_ndim(shape):
    with pytest.raises(DataError):
        Preprocessing.default((28, 28), 1)(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("c", [5, 8])
def test_wrong_channel_count(c):
    with pytest.raises(DataError, match="channels"):
        Preprocessing.default((28, 28), 1)(np.zeros((1, 28, 28, c), np.uint8))


def test_to_dict_from_dict_roundtrip():
    p = Preprocessing((32, 30), 3, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    d = p.to_dict()
    assert d == {"size": [32, 30], "channels": 3, "mean": [0.4914, 0.4822, 0.4465],
                 "std": [0.247, 0.243, 0.261]}
    q = Preprocessing.from_dict(json.loads(json.dumps(d)))
    assert q == p
    x = images(10, 2, 28, 28, 3)
    torch.testing.assert_close(q(x), p(x), rtol=0, atol=0)
    assert Preprocessing.from_dict(Preprocessing.default((28, 28), 1).to_dict()) == Preprocessing.default((28, 28), 1)


@pytest.mark.parametrize(
    "args",
    [
        ((28, 28), 2, (0.5, 0.5), (0.5, 0.5)),
        ((28, 28), 4, (0.5,) * 4, (0.5,) * 4),
        ((28, 28), 1, (0.5, 0.5), (0.5,)),
        ((28, 28), 3, (0.5,) * 3, (0.5,)),
        ((28, 28), 1, (0.5,), (0.0,)),
        ((28, 28), 1, (0.5,), (-1.0,)),
        ((0, 28), 1, (0.5,), (0.5,)),
        ((28,), 1, (0.5,), (0.5,)),
        ((28, 28, 28), 1, (0.5,), (0.5,)),
    ],
)
def test_invalid_config(args):
    with pytest.raises(ConfigError):
        Preprocessing(*args)


@pytest.mark.parametrize(
    "d",
    [
        {"size": [28, 28], "channels": 1, "mean": [0.5]},
        {"size": [28, 28], "channels": "x", "mean": [0.5], "std": [0.5]},
        {"size": 28, "channels": 1, "mean": [0.5], "std": [0.5]},
        {"size": ["a", "b"], "channels": 1, "mean": [0.5], "std": [0.5]},
        {"size": [28, 28], "channels": 3, "mean": [0.5], "std": [0.5]},
        {"size": [28, 28], "channels": 1, "mean": [0.5], "std": [0]},
    ],
)
def test_invalid_record(d):
    with pytest.raises(ConfigError):
        Preprocessing.from_dict(d)
