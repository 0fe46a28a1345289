"""Fuzzing with hypothesis (issue 8): random bytes to every reader, random arrays of
random shapes and dtypes to the inference API and the metrics. Whatever the input, the
only exceptions that may escape are :class:`gradosr.errors.GradOSRError` subclasses;
anything else (ValueError, RuntimeError, TypeError, ...) fails the test. What is
returned is checked for shape, dtype and range.

Runs are derandomized (the same examples every run, so the suite is steady); the
example counts keep the file well under a minute on one CPU thread.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradosr.metrics as M
from gradosr.data.cifar import read_cifar_batch, restricted_load
from gradosr.data.idx import read_idx
from gradosr.data.svhn import read_svhn_mat
from gradosr.data.tiny_imagenet import _val_files, read_wnids
from gradosr.errors import GradOSRError
from gradosr.images import read_image
from gradosr.osr import GradientOSR
from gradosr.train import TrainConfig
from tiny_runs import PRE, K, FlatNet, build_run, crashing_mat, mat_bytes

FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=50)


def only_gradosr_errors(call, *args, **kwargs):
    """Call; return its result, or None when it raised a GradOSRError (anything else propagates)."""
    name = getattr(call, "__name__", "call")
    try:
        out = call(*args, **kwargs)
    except GradOSRError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)  # one clear line for the CLI
        event(f"{name}: {type(exc).__name__}")  # --hypothesis-show-statistics shows the mix
        return None
    event(f"{name}: answered")
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder reused by every example (hypothesis runs many examples per test call)."""
    return tmp_path_factory.mktemp("fuzz")


# ------------------------------------------------------------------------ readers


def idx_headers():
    """IDX files that start well: zero bytes, a type code (valid or not), up to 70 sizes."""
    return st.builds(
        lambda code, dims, tail, exact: (
            bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
            + (bytes(int(np.prod(dims, dtype=object)) * {8: 1, 9: 1, 11: 2, 12: 4, 13: 4, 14: 8}.get(code, 1))
               if exact and int(np.prod(dims, dtype=object)) < 5000 else tail)),
        st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07, 0xFF]),
        st.lists(st.sampled_from([0, 1, 2, 3, 2**31, 2**32 - 1]), min_size=0, max_size=70),
        st.binary(max_size=64),
        st.booleans(),
    )


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), idx_headers()), gz=st.booleans())
def test_read_idx(scratch, data, gz):
    path = scratch / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(data) if gz and data[:1] == b"\x00" else data)
    arr = only_gradosr_errors(read_idx, path)
    if arr is not None:
        assert isinstance(arr, np.ndarray) and arr.ndim == data[3]


def pickle_streams():
    """Random bytes; random bytes after a protocol header; pickles of random plain data."""
    plain = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=8)
                         | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
                         | st.tuples(inner, inner), max_leaves=12)
    return st.one_of(
        st.binary(max_size=200),
        st.builds(lambda p, b: bytes([0x80, p]) + b, st.integers(0, 5), st.binary(max_size=200)),
        st.builds(lambda obj, p: pickle.dumps(obj, protocol=p), plain, st.integers(0, 5)),
    )


@FUZZ
@given(data=pickle_streams())
def test_cifar_unpickler_random_streams(scratch, data):
    path = scratch / "data_batch_1"
    path.write_bytes(data)
    only_gradosr_errors(restricted_load, path)
    only_gradosr_errors(read_cifar_batch, path, "labels", 10)


small_arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int8, np.int64, np.float32, np.float64, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)


@FUZZ
@given(data=st.one_of(small_arrays, st.just(np.zeros((2, 3072), np.uint8)), st.binary(max_size=10)),
       labels=st.one_of(small_arrays, st.lists(st.integers(-(2**70), 2**70), max_size=3),
                        st.lists(st.integers(0, 9), min_size=2, max_size=2), st.text(max_size=3)),
       bytes_keys=st.booleans(), protocol=st.integers(2, 5), valid=st.booleans())
def test_cifar_batch_random_content(scratch, data, labels, bytes_keys, protocol, valid):
    if valid:  # a well-formed batch, but for one of the two fields
        if np.ndim(labels) == 1 and not isinstance(labels, str):
            data = np.full((len(labels), 3072), 7, np.uint8)
        else:
            labels = list(range(len(data))) if isinstance(data, np.ndarray) and np.ndim(data) else [1]
    keys = (b"data", b"labels") if bytes_keys else ("data", "labels")
    path = scratch / "test_batch"
    path.write_bytes(pickle.dumps({keys[0]: data, keys[1]: labels}, protocol=protocol))
    batch = only_gradosr_errors(read_cifar_batch, path, "labels", 10)
    if batch is not None:
        assert batch.images.shape[1:] == (32, 32, 3) and batch.labels.dtype == np.int64


@settings(FUZZ, max_examples=20)  # each example starts a reader process (~0.25 s)
@example(data=crashing_mat())
@given(data=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda x, y: mat_bytes({"X": x, "y": y}),
              hnp.arrays(st.sampled_from([np.uint8, np.float64, np.int16]),
                         st.sampled_from([(32, 32, 3, 2), (32, 32, 3, 0), (2, 2), (32, 32, 3)])),
              hnp.arrays(st.sampled_from([np.uint8, np.float64, np.int64]), hnp.array_shapes(max_dims=2, max_side=3))),
    st.builds(lambda y: mat_bytes({"X": np.zeros((32, 32, 3, len(y)), np.uint8), "y": y}),
              hnp.arrays(st.sampled_from([np.uint8, np.float64, np.int16]), st.tuples(st.integers(0, 3), st.just(1)),
                         elements=st.integers(0, 11))),
    st.builds(lambda x: mat_bytes({"X": x}), hnp.arrays(np.uint8, (32, 32, 3, 1))),
    st.builds(lambda b, n: mat_bytes({"X": np.zeros((32, 32, 3, 1), np.uint8), "y": np.ones((1, 1))})[:n] + b,
              st.binary(max_size=20), st.integers(0, 400)),
))
def test_svhn_reader(scratch, data):
    path = scratch / "train_32x32.mat"
    path.write_bytes(data)
    images = only_gradosr_errors(read_svhn_mat, path)
    if images is not None:
        assert images.images.shape[1:] == (32, 32, 3) and set(images.labels.tolist()) <= set(range(10))


@FUZZ
@given(annotations=st.one_of(st.binary(max_size=200),
                             st.lists(st.tuples(st.text(max_size=12), st.sampled_from(["n01", "n02", "nX", ""]),
                                                st.text(max_size=6)), max_size=4)
                             .map(lambda rows: "\n".join("\t".join(r) for r in rows).encode("utf-8", "surrogatepass"))),
       wnids=st.binary(max_size=40))
def test_tiny_imagenet_annotations(scratch, annotations, wnids):
    folder = scratch / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "val" / "images" / "a.JPEG").write_bytes(b"")
    (folder / "val" / "val_annotations.txt").write_bytes(annotations)
    (folder / "wnids.txt").write_bytes(wnids)
    out = only_gradosr_errors(_val_files, folder, ["n01", "n02"])
    if out is not None:
        paths, labels = out
        assert len(paths) == len(labels) and set(labels.tolist()) <= {0, 1}
    names = only_gradosr_errors(read_wnids, folder)
    if names is not None:
        assert names == sorted(names) and all(names)


def image_bytes(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [image_bytes(f, m, s) for f, m, s in [("PNG", "L", (5, 3)), ("PNG", "RGBA", (4, 4)), ("JPEG", "RGB", (8, 8)),
                                               ("GIF", "P", (3, 3)), ("BMP", "RGB", (2, 5)), ("TIFF", "I;16", (3, 2)),
                                               ("PNG", "1", (9, 1))]]


@st.composite
def mutated_images(draw):
    """A small valid image file with some bytes overwritten, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF tags it skips
@FUZZ
@given(data=st.one_of(st.binary(max_size=200), mutated_images()), grey=st.booleans())
def test_read_image(scratch, data, grey):
    path = scratch / "img"
    path.write_bytes(data)
    arr = only_gradosr_errors(read_image, path, PRE if grey else None)
    if arr is not None:
        assert arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == 1 and arr.shape[3] == (1 if grey else 3)


# -------------------------------------------------------------- inference inputs


@pytest.fixture(scope="module")
def lenet_osr(tmp_path_factory) -> GradientOSR:
    """The tiny fitted LeNet run (28×28 grey preprocessing), loaded back from disk."""
    run = tmp_path_factory.mktemp("fuzz-run") / "run"
    build_run(run)
    return GradientOSR.load(run)


@pytest.fixture(scope="module")
def flat_osr() -> GradientOSR:
    """A custom model without preprocessing (float 1×8×8 inputs), fitted on arrays."""
    x = np.random.default_rng(0).normal(size=(60, 1, 8, 8)).astype(np.float32)
    return GradientOSR.from_classifier(FlatNet(), preset="paper", train_config=TrainConfig(model="custom", epochs=1),
                                       max_epochs=3).fit(x, np.repeat(np.arange(K), 15))


DTYPES = [np.uint8, np.uint16, np.int8, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64]


@st.composite
def inputs(draw, model_shape: tuple[int, int, int] = (1, 28, 28)):
    """Arrays (or tensors): uint8 images of any size and channel count, float model inputs
    of the right shape (random or extreme values), or anything of a random dtype and shape."""
    kind = draw(st.sampled_from(["images", "model-inputs", "anything"]))
    n = draw(st.integers(0, 3))
    if kind == "images":
        dtype = np.uint8
        hw = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
        shape = draw(st.sampled_from([(n, *hw), (n, *hw, 1), (n, *hw, 3), (n, *hw, 4)]))
    elif kind == "model-inputs":
        dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
        shape = (n, *model_shape)
    else:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.one_of(
            hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
            st.tuples(st.just(n), st.sampled_from([1, 3, 4, 0, 2]), st.sampled_from([28, 8, 1, 0]),
                      st.sampled_from([28, 8, 33, 0])),
            st.tuples(st.just(n), st.sampled_from([28, 8, 1, 32, 0]), st.sampled_from([28, 8, 3, 32]),
                      st.sampled_from([1, 3, 4, 5])),
        ))
    fill = draw(st.sampled_from(["zeros", "random", "extreme"]))
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    if fill == "zeros" or 0 in shape:
        arr = np.zeros(shape, dtype)
    elif fill == "random":
        arr = (rng.integers(0, 256, shape) if np.dtype(dtype).kind in "biu" else rng.normal(0, 3, shape)).astype(dtype)
    else:
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e38, 3e38, 65504.0, 255, -1.0]))
        with np.errstate(all="ignore"):
            arr = np.full(shape, value).astype(dtype)
    if draw(st.booleans()) and arr.dtype != np.uint16:
        return torch.as_tensor(arr)
    return arr


def check_outputs(x, scores, labels) -> None:
    n = len(x) if np.ndim(x) else 0
    assert scores.dtype == np.float64 and scores.shape == (n,)
    assert np.all((scores >= 0) & (scores <= 1)), scores  # finite probabilities
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert np.all((labels >= -1) & (labels < K))


@FUZZ
@given(x=inputs())
def test_lenet_run_random_inputs(lenet_osr, x):
    xin = only_gradosr_errors(lenet_osr.classifier_.inputs, x)
    if xin is not None:
        assert xin.ndim == 4 and xin.shape[1:] == (1, 28, 28) and torch.isfinite(xin).all()
    scores = only_gradosr_errors(lenet_osr.score_samples, x)
    out = only_gradosr_errors(lenet_osr.predict, x, return_scores=True)
    assert (scores is None) == (out is None)
    if out is not None:
        check_outputs(x, scores, out[0])
        np.testing.assert_array_equal(out[1], scores)


@FEW
@given(x=inputs(model_shape=(1, 8, 8)))
def test_custom_model_random_inputs(flat_osr, x):
    out = only_gradosr_errors(flat_osr.predict, x, return_scores=True)
    if out is not None:
        check_outputs(x, out[1], out[0])


@FEW
@given(x=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=3),
                   st.lists(st.lists(st.floats(), max_size=3), max_size=3), st.dictionaries(st.text(), st.integers())))
def test_non_array_inputs(lenet_osr, x):
    out = only_gradosr_errors(lenet_osr.predict, x, return_scores=True)
    if out is not None:
        check_outputs(np.asarray(x), out[1], out[0])


# ------------------------------------------------------------------------ metrics


def metric_args():
    """Random 0- to 2-D arrays of many dtypes, lists, or None."""
    arrays = hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int64, np.int8, np.uint64, np.bool_, np.complex64, "U2",
                               object]),
        shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6),
        elements=None,
    )
    near_valid = st.integers(1, 6).flatmap(lambda n: st.one_of(
        hnp.arrays(np.float64, n, elements=st.floats(allow_nan=True, allow_infinity=True)),
        hnp.arrays(np.int64, n, elements=st.integers(-3, 3)),
        hnp.arrays(np.bool_, n),
    ))
    return st.one_of(arrays, near_valid, st.none(), st.lists(st.integers(-2, 2), max_size=4), st.text(max_size=3))


METRICS = [(M.auroc, 2), (M.aupr_in, 2), (M.aupr_out, 2), (M.fpr_at_tpr, 2), (M.threshold_at_tpr, 1),
           (M.macro_f1_open, 2), (M.closed_set_accuracy, 2), (M.oscr, 3), (M.roc_curve, 2), (M.oscr_curve, 3),
           (M.open_set_predictions, 2)]


@pytest.mark.parametrize("metric, n_args", METRICS, ids=[m.__name__ for m, _ in METRICS])
def test_metrics_random_inputs(metric, n_args):
    @settings(FUZZ, max_examples=50)
    @given(args=st.lists(metric_args(), min_size=n_args, max_size=n_args),
           extra=st.one_of(st.none(), st.floats(), st.integers(-2, 12), st.text(max_size=2)))
    def run(args, extra):
        if metric is M.open_set_predictions:
            args = [*args, 0.5 if extra is None else extra]
        elif extra is not None and metric in (M.fpr_at_tpr, M.threshold_at_tpr, M.macro_f1_open):
            args = [*args, extra]
        with np.errstate(all="ignore"):
            out = only_gradosr_errors(metric, *args)
        if out is None:
            return
        if isinstance(out, float):
            assert np.isfinite(out) and (metric is M.threshold_at_tpr or 0.0 <= out <= 1.0)
        elif isinstance(out, tuple):
            assert all(np.all((a >= 0) & (a <= 1)) for a in out)
        else:
            assert out.dtype == np.int64

    run()
