"""Every backend against the float64 NumPy reference: forward, every gradient, both dtypes.

The tolerances are DESIGN.md §3. The reference is run in float64 on the same (cast) inputs, so a
float32 backend is held to float32 accuracy, not to agreement with a float32 reference.
"""

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastlstm
import fastlstm._kernels
from fastlstm._api import backward_grads, forward_padded
from fastlstm._backends import BACKEND_MODULES, PreparedWeights, unavailable_backends
from lstm_data import as_float64, make_problem, make_upstream

TOLERANCE = {  # dtype -> (forward abs, gradient relative to max abs)
    np.float64: (1e-10, 1e-10),
    np.float32: (1e-5, 1e-4),
}
GRID = [  # (T, B, D, H)
    (1, 1, 1, 1),
    (1, 3, 5, 4),
    (6, 1, 7, 13),
    (5, 3, 1, 17),
    (4, 2, 9, 1),
    (7, 5, 16, 32),
    (3, 4, 3, 33),
    (8, 9, 20, 24),
    (12, 1, 64, 128),
    (300, 2, 4, 6),
]
FIELDS = ("dx", "dh0", "dc0", "dWx", "dWh", "db")


def shape_id(shape):
    return "T{}B{}D{}H{}".format(*shape)


def reference(args, dy, dh_T, dc_T):
    """Outputs and gradients of the float64 reference on the same problem."""
    y, h_T, c_T, cache = fastlstm.lstm_forward(
        **as_float64(args), backend="numpy", return_cache=True
    )
    cast = lambda a: None if a is None else a.astype(np.float64)
    grads = fastlstm.lstm_backward(cast(dy), cache, cast(dh_T), cast(dc_T))
    return (y, h_T, c_T), grads


def run(backend, args, dy, dh_T, dc_T):
    y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend=backend, return_cache=True)
    return (y, h_T, c_T), fastlstm.lstm_backward(dy, cache, dh_T, dc_T)


def assert_matches_reference(outputs, grads, expected_outputs, expected_grads, dtype):
    forward_tol, grad_tol = TOLERANCE[dtype]
    for name, got, want in zip(("y", "h_T", "c_T"), outputs, expected_outputs):
        assert got.dtype == dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=forward_tol, err_msg=name)
    for name in FIELDS:
        got, want = getattr(grads, name), getattr(expected_grads, name)
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = max(np.max(np.abs(want)), 1e-30)
        error = np.max(np.abs(got - want)) / scale
        assert error <= grad_tol, f"{name}: error {error:.3e} relative to max abs {scale:.3e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0c0", "zero-state"])
@pytest.mark.parametrize("shape", GRID, ids=shape_id)
def test_matches_reference(backend, n_threads, shape, with_state, dtype):
    T, B, D, H = shape
    args = make_problem(T, B, D, H, dtype, seed=sum(shape), with_state=with_state)
    dy, dh_T, dc_T = make_upstream(T, B, H, dtype, final_grads=with_state)
    outputs, grads = run(backend, args, dy, dh_T, dc_T)
    assert_matches_reference(outputs, grads, *reference(args, dy, dh_T, dc_T), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_benchmark_shape_s3_scaled_down(backend, dtype):
    """A wide batch and hidden size, like the benchmark's S3, with a shorter sequence."""
    args = make_problem(10, 32, 128, 256, dtype, seed=3)
    dy, dh_T, dc_T = make_upstream(10, 32, 256, dtype)
    outputs, grads = run(backend, args, dy, dh_T, dc_T)
    assert_matches_reference(outputs, grads, *reference(args, dy, dh_T, dc_T), dtype)


def test_deterministic(backend, n_threads):
    args = make_problem(20, 6, 10, 24, np.float32, seed=7)
    dy, dh_T, dc_T = make_upstream(20, 6, 24, np.float32)
    first_outputs, first_grads = run(backend, args, dy, dh_T, dc_T)
    second_outputs, second_grads = run(backend, args, dy, dh_T, dc_T)
    for a, b in zip(first_outputs + tuple(first_grads), second_outputs + tuple(second_grads)):
        np.testing.assert_array_equal(a, b)


def test_concurrent_python_threads_agree_with_serial(backend):
    problems = [make_problem(15, B, 8, 16, np.float32, seed=B) for B in (1, 2, 3, 5)]
    upstream = [make_upstream(15, p["x"].shape[1], 16, np.float32) for p in problems]
    serial = [run(backend, p, *u) for p, u in zip(problems, upstream)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(run, backend, p, *u) for _ in range(3)
                   for p, u in zip(problems, upstream)]
        concurrent = [f.result() for f in futures]
    for index, (outputs, grads) in enumerate(concurrent):
        want_outputs, want_grads = serial[index % len(serial)]
        for a, b in zip(outputs + tuple(grads), want_outputs + tuple(want_grads)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_never_modified(backend, dtype):
    args = make_problem(5, 3, 4, 6, dtype)
    dy, dh_T, dc_T = make_upstream(5, 3, 6, dtype)
    before = {name: a.copy() for name, a in args.items()}
    upstream_before = [a.copy() for a in (dy, dh_T, dc_T)]
    run(backend, args, dy, dh_T, dc_T)
    for name, a in args.items():
        np.testing.assert_array_equal(a, before[name], err_msg=name)
    for a, b in zip((dy, dh_T, dc_T), upstream_before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("T", [0, 1, 3])
def test_outputs_do_not_alias_inputs(backend, T):
    args = make_problem(T, 2, 3, 4)
    _, h_T, c_T = fastlstm.lstm_forward(**args, backend=backend)
    assert not np.shares_memory(h_T, args["h0"]) and not np.shares_memory(c_T, args["c0"])


@pytest.mark.parametrize("T", [0, 4])
def test_outputs_a_cache_reads_cannot_change_its_gradients(backend, T):
    """y is the h_{t-1} history that backward reads (the compiled backends keep no copy), so
    it comes back read-only; h_T and c_T are the caller's own."""
    args = make_problem(T, 3, 4, 6, np.float32, seed=5)
    dy, dh_T, dc_T = make_upstream(T, 3, 6, np.float32)
    y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend=backend, return_cache=True)
    expected = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
    assert not y.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        y[...] = 0
    h_T[...] = 7.0
    c_T[...] = 7.0
    y.copy()[...] = 0
    for got, want in zip(fastlstm.lstm_backward(dy, cache, dh_T=dh_T, dc_T=dc_T), expected):
        np.testing.assert_array_equal(got, want)
    y_plain = fastlstm.lstm_forward(**args, backend=backend)[0]
    assert y_plain.flags.writeable


def test_read_only_and_non_contiguous_inputs(backend):
    T, B, D, H = 6, 3, 5, 7
    args = make_problem(T, B, D, H, np.float32, seed=11)
    dy, dh_T, dc_T = make_upstream(T, B, H, np.float32)
    want_outputs, want_grads = run(backend, args, dy, dh_T, dc_T)

    def strided_read_only(a):
        doubled = np.repeat(a, 2, axis=-1)[..., ::2]  # same values, not contiguous
        assert not doubled.flags.c_contiguous or a.ndim == 0
        doubled.flags.writeable = False
        return doubled

    odd_args = {name: strided_read_only(a) for name, a in args.items()}
    odd_args["x"] = np.asfortranarray(args["x"])
    odd_args["x"].flags.writeable = False
    outputs, grads = run(backend, odd_args, *(strided_read_only(a) for a in (dy, dh_T, dc_T)))
    for a, b in zip(outputs + tuple(grads), want_outputs + tuple(want_grads)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(5, 1, 3, 130), (6, 3, 5, 17), (7, 16, 3, 33)], ids=shape_id)
def test_backward_without_dx(backend, n_threads, shape):
    # The backends' need_dx=False (a first layer's input gradient is not needed): dx is None,
    # every other gradient as with it.
    T, B, D, H = shape
    args = make_problem(T, B, D, H, np.float32, seed=sum(shape))
    dy, dh_T, dc_T = make_upstream(T, B, H, np.float32)
    _, _, _, cache = fastlstm.lstm_forward(**args, backend=backend, return_cache=True)
    full = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
    without = backward_grads(dy, cache, dh_T, dc_T, need_dx=False)
    assert without.dx is None
    for name in FIELDS[1:]:
        np.testing.assert_array_equal(getattr(without, name), getattr(full, name), err_msg=name)


def lengths_for(T, B, seed):
    """Per-row lengths in [0, T] with both ends present when B allows."""
    lengths = np.random.default_rng(seed).integers(0, T + 1, B)
    lengths[: min(B, 2)] = [T, 0][: min(B, 2)]
    return lengths.astype(np.intp)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("need_cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (5, 1, 3, 130), (6, 3, 5, 17), (9, 9, 4, 40),
                                   (7, 16, 3, 33)],
                         ids=shape_id)
def test_lengths_give_each_rows_own_final_state(backend, n_threads, shape, need_cache, dtype):
    # The kernels' `lengths` option, for padded batches (B = 9 and 16 reach the batch loops on
    # two threads, B = 1 and 3 the matvec loops, B = 1 with H >= 128 numba's split kernel): y
    # is the padded run's, the final states each row's after its own length, as the reference
    # reaches them running the row alone.
    T, B, D, H = shape
    args = make_problem(T, B, D, H, dtype, seed=sum(shape))
    lengths = lengths_for(T, B, seed=T)
    padded = fastlstm.lstm_forward(**args, backend=backend)
    y, h_T, c_T, *cache = forward_padded(
        **args, backend=backend, return_cache=need_cache, lengths=lengths
    )
    np.testing.assert_array_equal(y, padded[0])
    forward_tol = TOLERANCE[dtype][0]
    wide = as_float64(args)
    for row, length in enumerate(lengths):
        alone = dict(wide, x=wide["x"][:length, row : row + 1], h0=wide["h0"][row : row + 1],
                     c0=wide["c0"][row : row + 1])
        _, h_want, c_want = fastlstm.lstm_forward(**alone, backend="numpy")
        np.testing.assert_allclose(h_T[row], h_want[0], rtol=0, atol=forward_tol)
        np.testing.assert_allclose(c_T[row], c_want[0], rtol=0, atol=forward_tol)
    if need_cache:  # the cache is the padded run's: its gradients are unchanged
        dy, dh_T, dc_T = make_upstream(T, B, H, dtype)
        grads = fastlstm.lstm_backward(dy, cache[0], dh_T, dc_T)
        _, expected_grads = run(backend, args, dy, dh_T, dc_T)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(grads, name), getattr(expected_grads, name))


def test_lengths_with_zero_state_and_every_length_equal(backend):
    args = make_problem(5, 4, 3, 6, np.float32, seed=3, with_state=False)
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend=backend)
    for lengths, h_want, c_want in [
        (np.full(4, 5), h_T, c_T),
        (np.zeros(4, np.intp), np.zeros_like(h_T), np.zeros_like(c_T)),
    ]:
        _, h_got, c_got = forward_padded(**args, backend=backend, lengths=lengths)
        np.testing.assert_array_equal(h_got, h_want)
        np.testing.assert_array_equal(c_got, c_want)


@pytest.mark.parametrize("T, B", [(0, 3), (4, 0), (0, 0)])
def test_empty_sequence_or_batch(backend, T, B):
    D, H = 3, 4
    args = make_problem(T, B, D, H, np.float32)
    dy, dh_T, dc_T = make_upstream(T, B, H, np.float32)
    (y, h_T, c_T), grads = run(backend, args, dy, dh_T, dc_T)
    assert y.shape == (T, B, H) and y.dtype == np.float32
    np.testing.assert_array_equal(h_T, args["h0"])
    np.testing.assert_array_equal(c_T, args["c0"])
    assert grads.dx.shape == (T, B, D)
    np.testing.assert_array_equal(grads.dWx, 0)
    np.testing.assert_array_equal(grads.dWh, 0)
    np.testing.assert_array_equal(grads.db, 0)
    if T == 0:
        np.testing.assert_array_equal(grads.dh0, dh_T)
        np.testing.assert_array_equal(grads.dc0, dc_T)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nan_inf_and_extreme_values_propagate_like_the_reference(backend, dtype):
    T, B, D, H = 6, 5, 3, 9
    args = make_problem(T, B, D, H, dtype, seed=5)
    args["x"][2, 0, 1] = np.nan
    args["x"][1, 1, 0] = np.inf
    args["x"][3, 2, 2] = -np.inf
    args["x"][:, 3, :] = 1e4
    args["x"][:, 4, :] = -1e4
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend=backend)
    want_y, want_h, want_c = fastlstm.lstm_forward(**as_float64(args), backend="numpy")
    forward_tol = TOLERANCE[dtype][0]
    for got, want in ((y, want_y), (h_T, want_h), (c_T, want_c)):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=0, atol=forward_tol, equal_nan=True)
    assert np.isnan(y[2:, 0]).all(), "a NaN input poisons its own sequence from then on"
    assert np.isfinite(y[:, 3:]).all()


def required_backends():
    """Backends whose module ships with the package must load, unless the environment says
    otherwise (FASTLSTM_REQUIRE_BACKENDS=numpy,numba for a deliberately partial build). The
    numba backend is required where Numba is installed (the optional ``numba`` extra)."""
    override = os.environ.get("FASTLSTM_REQUIRE_BACKENDS")
    if override is not None:
        return [name for name in override.split(",") if name]
    kernels_dir = os.path.dirname(fastlstm._kernels.__file__)
    shipped = [name for name, module in BACKEND_MODULES.items()
               if os.path.exists(os.path.join(kernels_dir, module.rsplit(".", 1)[1] + ".py"))]
    numba_installed = importlib.util.find_spec("numba") is not None
    return [name for name in shipped if name != "numba" or numba_installed]


def test_shipped_backends_are_available():
    """A backend that ships but fails to load (missing dependency or extension) must fail here."""
    missing = [name for name in required_backends() if name not in fastlstm.available_backends()]
    assert not missing, f"backends failed to load: {unavailable_backends()}"


def test_default_backend_is_a_real_backend():
    args = make_problem(3, 2, 4, 5)
    y, *_ = fastlstm.lstm_forward(**args)
    want, *_ = fastlstm.lstm_forward(**args, backend="numpy")
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-10)
    *_, cache = fastlstm.lstm_forward(**args, return_cache=True)
    assert cache.backend in fastlstm.available_backends()


def test_prepared_weights_must_be_the_call_weights(backend):
    """Packed weights kept for other arrays would silently compute with those: refused."""
    args = make_problem(3, 1, 4, 5, np.float32)
    other = PreparedWeights(args["Wx"].copy(), args["Wh"], args["b"])
    with pytest.raises(ValueError, match="same Wx, Wh and b"):
        forward_padded(**args, backend=backend, prepared=other)
    same = PreparedWeights(args["Wx"], args["Wh"], args["b"])
    y = forward_padded(**args, backend=backend, prepared=same)[0]
    np.testing.assert_array_equal(y, fastlstm.lstm_forward(**args, backend=backend)[0])
