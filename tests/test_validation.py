"""Bad input gets a clear TypeError/ValueError naming the argument, expected and actual."""

import numpy as np
import pytest

import fastlstm
from lstm_data import make_problem

T, B, D, H = 3, 2, 4, 5


@pytest.fixture
def args():
    return make_problem(T, B, D, H, dtype=np.float32)


def forward_raises(args, exc_type, *fragments, **overrides):
    with pytest.raises(exc_type) as info:
        fastlstm.lstm_forward(**{**args, **overrides})
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in message: {info.value}"


@pytest.mark.parametrize(
    "name, bad_shape",
    [("x", (T, B)), ("Wx", (D, 4 * H, 1)), ("Wh", (H,)), ("b", (1, 4 * H)),
     ("h0", (H,)), ("c0", (1, B, H))],
)
def test_wrong_ndim(args, name, bad_shape):
    forward_raises(args, ValueError, name, f"{len(bad_shape)}", str(bad_shape),
                   **{name: np.zeros(bad_shape, np.float32)})


@pytest.mark.parametrize(
    "name, bad_shape, expected",
    [
        ("Wx", (D + 1, 4 * H), str((D, 4 * H))),
        ("Wx", (D, 4 * H + 4), str((D, 4 * H))),
        ("Wh", (H, 3 * H), str((H, 4 * H))),
        ("b", (4 * H + 1,), str((4 * H,))),
        ("h0", (B + 1, H), str((B, H))),
        ("c0", (B, H + 1), str((B, H))),
    ],
)
def test_mismatched_sizes(args, name, bad_shape, expected):
    forward_raises(args, ValueError, name, expected, str(bad_shape),
                   **{name: np.zeros(bad_shape, np.float32)})


def test_empty_hidden_or_input_size_rejected(args):
    forward_raises(args, ValueError, "Wh", "H >= 1", Wh=np.zeros((0, 0), np.float32),
                   Wx=np.zeros((D, 0), np.float32), b=np.zeros(0, np.float32))
    forward_raises(args, ValueError, "x", "D >= 1", x=np.zeros((T, B, 0), np.float32),
                   Wx=np.zeros((0, 4 * H), np.float32))


@pytest.mark.parametrize("name", ["x", "Wx", "Wh", "b", "h0", "c0"])
def test_mixed_float_dtypes(args, name):
    forward_raises(args, TypeError, f"{name}: float64", "float32",
                   **{name: args[name].astype(np.float64)})


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.complex128, object, np.float16, bool])
@pytest.mark.parametrize("name", ["x", "Wh", "c0"])
def test_non_float_dtypes(args, name, dtype):
    forward_raises(args, TypeError, name, "float32 or float64", str(np.dtype(dtype)),
                   **{name: args[name].astype(dtype)})


@pytest.mark.parametrize("dtype", [">f4", ">f8"] if np.little_endian else ["<f4", "<f8"])
def test_byte_swapped_floats_rejected_with_a_conversion_hint(args, dtype):
    name = np.dtype(dtype).name
    overrides = {key: args[key].astype(dtype) for key in ("x", "Wx", "Wh", "b", "h0", "c0")}
    forward_raises(args, TypeError, "x", "float32 or float64", str(np.dtype(dtype)),
                   f".astype(np.{name})", **overrides)


def test_one_dimensional_argument_named_in_the_singular(args):
    forward_raises(args, ValueError, "b must have 1 dimension,", b=args["b"][None])


@pytest.mark.parametrize("bad", [[[1.0]], 3.0, "x", None])
@pytest.mark.parametrize("name", ["x", "Wx", "b"])
def test_non_array_input(args, name, bad):
    forward_raises(args, TypeError, name, "numpy.ndarray", type(bad).__name__, **{name: bad})


def test_non_array_initial_state(args):
    forward_raises(args, TypeError, "h0", "numpy.ndarray", "list", h0=[[0.0] * H] * B)


@pytest.mark.parametrize("name", ["nope", "NUMPY", ""])
def test_unknown_backend(args, name):
    forward_raises(args, ValueError, repr(name), "available backends", "'numpy'", backend=name)


def test_backend_of_wrong_type(args):
    forward_raises(args, TypeError, "backend", "int", backend=3)


@pytest.fixture
def cache(args):
    *_, cache = fastlstm.lstm_forward(**args, return_cache=True)
    return cache


def backward_raises(cache, exc_type, *fragments, dy=None, dh_T=None, dc_T=None):
    if dy is None:
        dy = np.zeros((T, B, H), np.float32)
    with pytest.raises(exc_type) as info:
        fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in message: {info.value}"


def test_backward_dy_shape(cache):
    backward_raises(cache, ValueError, "dy", str((T, B, H)), str((T + 1, B, H)),
                    dy=np.zeros((T + 1, B, H), np.float32))


def test_backward_dy_ndim(cache):
    backward_raises(cache, ValueError, "dy", "3 dimensions", dy=np.zeros((T, B * H), np.float32))


@pytest.mark.parametrize("name", ["dh_T", "dc_T"])
def test_backward_final_state_gradient_shape(cache, name):
    backward_raises(cache, ValueError, name, str((B, H)), str((B, H + 2)),
                    **{name: np.zeros((B, H + 2), np.float32)})


def test_backward_dtype_must_match_forward(cache):
    backward_raises(cache, TypeError, "dy", "float32", "float64", dy=np.zeros((T, B, H)))


def test_backward_mixed_dtypes(cache):
    backward_raises(cache, TypeError, "dh_T: float64", "dy: float32",
                    dh_T=np.zeros((B, H)))


def test_backward_integer_gradient(cache):
    backward_raises(cache, TypeError, "dy", "int64", dy=np.zeros((T, B, H), np.int64))


def test_backward_needs_a_cache():
    with pytest.raises(TypeError, match="cache must be the LSTMCache"):
        fastlstm.lstm_backward(np.zeros((T, B, H)), {"not": "a cache"})


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_set_num_threads_rejects(bad, exc):
    before = fastlstm.get_num_threads()
    with pytest.raises(exc, match="n must be an int >= 1"):
        fastlstm.set_num_threads(bad)
    assert fastlstm.get_num_threads() == before


def test_set_num_threads_roundtrip():
    before = fastlstm.get_num_threads()
    try:
        fastlstm.set_num_threads(np.int64(3))
        assert fastlstm.get_num_threads() == 3
        fastlstm.set_num_threads(None)
        assert fastlstm.get_num_threads() >= 1
    finally:
        fastlstm.set_num_threads(before)
