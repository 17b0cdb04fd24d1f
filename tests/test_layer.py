"""Tests of `fastlstm.LSTM`: forward against a composition of the reference `lstm_forward`,
variable lengths against per-sequence runs, cells, streaming steps, bad inputs, concurrency."""

import threading
import tracemalloc

import numpy as np
import pytest

import fastlstm
from fastlstm import LSTM, _step, lstm_forward

BACKENDS = fastlstm.available_backends()
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def reference_lstm(layer, x, h0=None, c0=None):
    """The layer's math spelled out: float64 reference `lstm_forward` per layer and direction.

    x : (T, B, D) time-major. Returns y (T, B, dirs·H), h_n, c_n (L·dirs, B, H), cells (T, B,
    dirs·H) of the last layer (c_t from steps of one-step calls).
    """
    dirs = layer.num_directions
    layer_input = x.astype(np.float64)
    h_n, c_n = [], []
    for l in range(layer.num_layers):
        outputs, cells = [], []
        for d in range(dirs):
            k = l * dirs + d
            Wx, Wh, b = (w.astype(np.float64) for w in layer.weights[k])
            reverse = d == 1 or layer.reverse
            seq = layer_input[::-1] if reverse else layer_input
            h = None if h0 is None else h0[k].astype(np.float64)
            c = None if c0 is None else c0[k].astype(np.float64)
            ys, cs = [], []
            for t in range(seq.shape[0]):
                y_t, h, c = lstm_forward(seq[t : t + 1], Wx, Wh, b, h, c, backend="numpy")
                ys.append(y_t[0])
                cs.append(c)
            H = Wh.shape[0]
            B = x.shape[1]
            y = np.stack(ys) if ys else np.zeros((0, B, H))
            cell = np.stack(cs) if cs else np.zeros((0, B, H))
            if h is None:
                h, c = np.zeros((B, H)), np.zeros((B, H))
            outputs.append(y[::-1] if reverse else y)
            cells.append(cell[::-1] if reverse else cell)
            h_n.append(h)
            c_n.append(c)
        layer_input = np.concatenate(outputs, axis=2)
    return layer_input, np.stack(h_n), np.stack(c_n), np.concatenate(cells, axis=2)


def random_input(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=1, bidirectional=True),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, reverse=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_forward_matches_reference_composition(backend, dtype, config):
    T, B, D, H = 6, 3, 5, 7
    layer = LSTM(D, H, seed=1, dtype=dtype, backend=backend, **config)
    x = random_input((T, B, D), dtype)
    rows = layer.num_layers * layer.num_directions
    h0 = random_input((rows, B, H), dtype, seed=2) * 0.5
    c0 = random_input((rows, B, H), dtype, seed=3) * 0.5
    y, (h_n, c_n), cells = layer(x, (h0, c0), return_cells=True)
    y_ref, h_ref, c_ref, cells_ref = reference_lstm(layer, x, h0, c0)
    assert y.shape == (T, B, layer.num_directions * H) and y.dtype == dtype
    assert h_n.shape == c_n.shape == (rows, B, H) and h_n.dtype == dtype
    tol = TOL[np.dtype(dtype)]
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(h_n, h_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(c_n, c_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(cells, cells_ref, rtol=0, atol=tol)
    y_plain, (h_plain, _) = layer(x, (h0, c0))
    np.testing.assert_array_equal(y_plain, y)
    np.testing.assert_array_equal(h_plain, h_n)


def test_batch_first_is_a_transpose():
    layer = LSTM(4, 3, 2, bidirectional=True, seed=0)
    twin = LSTM.from_weights(layer.weights, bidirectional=True, batch_first=True)
    x = random_input((5, 2, 4), np.float32)
    y, (h, c) = layer(x)
    y_bf, (h_bf, c_bf) = twin(np.ascontiguousarray(x.swapaxes(0, 1)))
    assert y_bf.shape == (2, 5, 6) and y_bf.flags.c_contiguous
    np.testing.assert_array_equal(y_bf, y.swapaxes(0, 1))
    np.testing.assert_array_equal(h_bf, h)


def test_initialisation_like_torch():
    H = 16
    layer = LSTM(8, H, 2, bidirectional=True, forget_bias=1.5, seed=3, dtype=np.float64)
    bound = 1 / np.sqrt(H)
    for Wx, Wh, b in layer.weights:
        for array in (Wx, Wh, b[:H], b[2 * H :]):
            assert np.all(np.abs(array) <= bound)
        np.testing.assert_array_equal(b[H : 2 * H], 1.5)
        assert not Wx.flags.writeable
    same = LSTM(8, H, 2, bidirectional=True, forget_bias=1.5, seed=3, dtype=np.float64)
    np.testing.assert_array_equal(same.weights[3][0], layer.weights[3][0])
    assert [w[0].shape for w in layer.weights] == [(8, 64), (8, 64), (32, 64), (32, 64)]


def test_pickle_round_trip():
    import pickle

    layer = LSTM(3, 4, 2, bidirectional=True, batch_first=True, seed=0, backend="numpy")
    clone = pickle.loads(pickle.dumps(layer))
    assert repr(clone) == repr(layer)
    x = random_input((2, 5, 3), np.float32)
    np.testing.assert_array_equal(clone(x)[0], layer(x)[0])


def test_empty_sequence_and_batch():
    layer = LSTM(3, 4, 2, bidirectional=True, seed=0)
    h0 = random_input((4, 2, 4), np.float32)
    y, (h, c) = layer(np.zeros((0, 2, 3), np.float32), (h0, h0))
    assert y.shape == (0, 2, 8)
    np.testing.assert_array_equal(h, h0)
    y, (h, c) = layer(np.zeros((5, 0, 3), np.float32))
    assert y.shape == (5, 0, 8) and h.shape == (4, 0, 4)


# ------------------------------------------------------------------------- variable lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_match_per_sequence_runs(backend, config, batch_first):
    T, D, H = 9, 4, 5
    lengths = np.array([4, 9, 0, 1, 9, 6, 4])
    B = len(lengths)
    layer = LSTM(D, H, seed=2, dtype=np.float64, backend=backend, batch_first=batch_first, **config)
    rows = layer.num_layers * layer.num_directions
    x = random_input((T, B, D), np.float64)
    h0 = random_input((rows, B, H), np.float64, seed=5)
    c0 = random_input((rows, B, H), np.float64, seed=6)
    x_in = np.ascontiguousarray(x.swapaxes(0, 1)) if batch_first else x
    y, (h_n, c_n), cells = layer(x_in, (h0, c0), lengths=lengths, return_cells=True)
    # Without cells the kernels read each final state at its step themselves (no cache).
    y_plain, (h_plain, c_plain) = layer(x_in, (h0, c0), lengths=lengths)
    np.testing.assert_allclose(y_plain, y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h_plain, h_n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(c_plain, c_n, rtol=0, atol=1e-12)
    if batch_first:
        y, cells = y.swapaxes(0, 1), cells.swapaxes(0, 1)
    for j, length in enumerate(lengths):
        alone = x[:length, j : j + 1]
        if batch_first:
            alone = np.ascontiguousarray(alone.swapaxes(0, 1))
        y_j, (h_j, c_j), cells_j = layer(
            alone, (h0[:, j : j + 1], c0[:, j : j + 1]), return_cells=True
        )
        if batch_first:
            y_j, cells_j = y_j.swapaxes(0, 1), cells_j.swapaxes(0, 1)
        np.testing.assert_allclose(y[:length, j], y_j[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(cells[:length, j], cells_j[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(y[length:, j], 0)
        np.testing.assert_array_equal(cells[length:, j], 0)
        np.testing.assert_allclose(h_n[:, j], h_j[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(c_n[:, j], c_j[:, 0], rtol=0, atol=1e-12)


def test_full_lengths_equal_no_lengths():
    layer = LSTM(3, 4, bidirectional=True, seed=0)
    x = random_input((5, 3, 3), np.float32)
    y, (h, c) = layer(x)
    y_l, (h_l, c_l) = layer(x, lengths=[5, 5, 5])
    np.testing.assert_array_equal(y, y_l)
    np.testing.assert_array_equal(h, h_l)


def test_lengths_accept_lists_and_any_int_dtype():
    layer = LSTM(3, 4, seed=0)
    x = random_input((5, 2, 3), np.float32)
    expected = layer(x, lengths=[2, 5])[0]
    for lengths in (np.array([2, 5], np.uint8), np.array([2, 5], np.int64), (2, 5)):
        np.testing.assert_array_equal(layer(x, lengths=lengths)[0], expected)


# ------------------------------------------------------------------------- bad inputs


@pytest.fixture
def small_layer():
    return LSTM(3, 4, 2, bidirectional=True, seed=0)


@pytest.mark.parametrize(
    "lengths, error, pieces",
    [
        (np.array([1.0, 2.0]), TypeError, ["lengths", "integers", "float64"]),
        (np.array([True, False]), TypeError, ["lengths", "integers", "bool"]),
        (np.array([1, 2, 3]), ValueError, ["lengths", "(B,) = (2,)", "(3,)"]),
        (np.array([[1, 2]]), ValueError, ["lengths", "(B,) = (2,)", "(1, 2)"]),
        (np.array([1, 6]), ValueError, ["lengths", "[0, T] = [0, 5]", "6"]),
        (np.array([-1, 2]), ValueError, ["lengths", "[0, T] = [0, 5]", "-1"]),
        (["a", "b"], TypeError, ["lengths", "integers"]),
    ],
)
def test_bad_lengths(small_layer, lengths, error, pieces):
    x = random_input((5, 2, 3), np.float32)
    with pytest.raises(error) as info:
        small_layer(x, lengths=lengths)
    for piece in pieces:
        assert piece in str(info.value)


def test_bad_state(small_layer):
    x = random_input((5, 2, 3), np.float32)
    good = np.zeros((4, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"state\[0\] \(h0\).*\(4, 2, 4\), got \(2, 2, 4\)"):
        small_layer(x, (np.zeros((2, 2, 4), np.float32), good))
    with pytest.raises(ValueError, match=r"state\[1\] \(c0\).*\(4, 2, 4\), got \(4, 2\)"):
        small_layer(x, (good, np.zeros((4, 2), np.float32)))
    with pytest.raises(TypeError, match=r"state\[1\] \(c0\).*float32, got float64"):
        small_layer(x, (good, good.astype(np.float64)))
    with pytest.raises(TypeError, match=r"state must be a tuple \(h0, c0\)"):
        small_layer(x, good)


def test_bad_x(small_layer):
    with pytest.raises(TypeError, match=r"x must have the layer's dtype float32, got float64"):
        small_layer(np.zeros((5, 2, 3)))
    swapped = np.zeros((5, 2, 3), np.dtype(np.float32).newbyteorder("S"))
    with pytest.raises(TypeError, match=r"float32, got .f4 \(byte-swapped; .*\(np\.float32\)"):
        small_layer(swapped)
    with pytest.raises(
        ValueError, match=r"x must have shape \(T, B, input_size\) = \(\?, \?, 3\), got \(5, 2, 4\)"
    ):
        small_layer(np.zeros((5, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"x must have shape .*got \(5, 3\)"):
        small_layer(np.zeros((5, 3), np.float32))
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray, got list"):
        small_layer([[[0.0, 0.0, 0.0]]])
    batch_first = LSTM(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, input_size\)"):
        batch_first(np.zeros((5, 2, 4), np.float32))


def test_bad_construction():
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        LSTM(3, 0)
    with pytest.raises(TypeError, match="input_size must be an int >= 1, got float"):
        LSTM(3.0, 4)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got float16"):
        LSTM(3, 4, dtype=np.float16)
    with pytest.raises(ValueError, match="available backends"):
        LSTM(3, 4, backend="no-such-backend")
    with pytest.raises(ValueError, match="cannot be bidirectional"):
        LSTM(3, 4, bidirectional=True, reverse=True)
    layer = LSTM(3, 4, 2)
    with pytest.raises(
        ValueError, match=r"weights\[2\] Wx must have shape \(D_l, 4H\) = \(4, 16\)"
    ):
        LSTM.from_weights(layer.weights + (layer.weights[0],))
    with pytest.raises(
        TypeError, match=r"weights\[1\] Wh must have the layer's dtype float32, got float64"
    ):
        LSTM.from_weights(
            [
                layer.weights[0],
                (layer.weights[1][0], layer.weights[1][1].astype(float), layer.weights[1][2]),
            ]
        )


def test_inputs_are_not_modified_and_read_only_inputs_work():
    layer = LSTM(3, 4, bidirectional=True, seed=0)
    x = random_input((5, 2, 3), np.float32)
    h0 = random_input((2, 2, 4), np.float32)
    copies = x.copy(), h0.copy()
    for array in (x, h0):
        array.setflags(write=False)
    layer(x, (h0, h0), lengths=[3, 5])
    np.testing.assert_array_equal(x, copies[0])
    np.testing.assert_array_equal(h0, copies[1])


def test_nan_propagates():
    layer = LSTM(3, 4, seed=0)
    x = random_input((4, 2, 3), np.float32)
    x[1, 0, 0] = np.nan
    y, (h, _) = layer(x)
    assert np.all(np.isnan(y[1:, 0])) and np.all(np.isfinite(y[:, 1]))


# ------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_match_the_sequence_call(dtype, num_layers, backend):
    """Each backend's step kernel (or the NumPy one it falls back to) against the layer's call."""
    T, B, D, H = 7, 3, 5, 6
    layer = LSTM(D, H, num_layers, seed=4, dtype=dtype, backend=backend)
    x = random_input((T, B, D), dtype)
    h0 = random_input((num_layers, B, H), dtype, seed=1)
    c0 = random_input((num_layers, B, H), dtype, seed=2)
    y, (h_n, c_n) = layer(x, (h0, c0))
    state = layer.initial_state(B, h0, c0)
    tol = TOL[np.dtype(dtype)]
    for t in range(T):
        y_t, state = layer.step(x[t], state)
        assert y_t.shape == (B, H) and y_t.dtype == dtype
        np.testing.assert_allclose(y_t, y[t], rtol=0, atol=tol)
    np.testing.assert_allclose(state.h, h_n, rtol=0, atol=tol)
    np.testing.assert_allclose(state.c, c_n, rtol=0, atol=tol)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_output_is_a_read_only_view_of_the_state(num_layers, backend):
    # y_t is the h_{t-1} of the next step: a write through it would change the stream.
    layer = LSTM(3, 5, num_layers, seed=4, backend=backend)
    state = layer.initial_state(2)
    x = random_input((2, 2, 3), np.float32)
    y_t, state = layer.step(x[0], state)
    assert not y_t.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        y_t[...] = 100.0
    np.testing.assert_array_equal(y_t, state.h[-1])
    y_next, _ = layer.step(x[1], state)
    np.testing.assert_allclose(y_next, layer(x, None)[0][1], rtol=0, atol=TOL[np.dtype(np.float32)])


def traced_steps(layer, steps, warm_up_steps=5, batch_size=1):
    """(bytes kept, peak bytes above the start) of tracemalloc over ``steps`` warm steps."""
    inputs = list(random_input((steps + warm_up_steps, batch_size, layer.input_size), np.float32))
    state = layer.initial_state(batch_size)
    warm_up, steady = inputs[:warm_up_steps], inputs[warm_up_steps:]
    for x_t in warm_up:
        layer.step(x_t, state)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for x_t in steady:
            layer.step(x_t, state)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, peak - before


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_allocates_nothing_in_steady_state(backend):
    layer = LSTM(64, 128, 2, seed=0, backend=backend)
    kernel, prepared = layer._prepared_step_weights()
    if kernel is _step.NUMPY_STEP_KERNEL:  # small enough to leave BLAS's threads alone
        assert all(w.size < _step.ONE_BLAS_THREAD_FROM for w in prepared)
    # more warm-up steps than CPython caches small ints for: counters of calls must stay bounded
    kept, peak = traced_steps(layer, 45, warm_up_steps=300)
    assert kept == 0, f"steps kept {kept} bytes"
    # The interpreter's own transient objects (the loop's zip iterator: ~200 bytes) remain, and
    # a Numba dispatcher's while it types a call's arguments (~430 bytes a call); the smallest
    # array a step could allocate, one hidden vector, is 4·H = 512 B of data plus its ~100-byte
    # header, on top of those.
    dispatch = 512 if kernel.step.__module__.endswith("numba_backend") else 0
    assert peak < 512 + dispatch, f"steps allocated up to {peak} bytes on the way"


def test_large_steps_allocate_no_arrays():
    # Large weights pin BLAS to one thread through threadpoolctl, whose ctypes calls create
    # small Python objects (transient; ~30 KB of them stay cached during the first ~1000
    # calls, then none); no array is ever allocated.
    layer = LSTM(64, 512, seed=0, backend="numpy")
    assert layer._prepared_step_weights()[1][0].size >= _step.ONE_BLAS_THREAD_FROM
    kept, peak = traced_steps(layer, 200, warm_up_steps=1500)
    assert kept < 4096, f"steps kept {kept} bytes"
    assert peak < 4 * 4 * 512, f"steps allocated up to {peak} bytes (a gates buffer is 8 KiB)"


@pytest.mark.skipif("cython" not in BACKENDS, reason="the cython backend is not available")
def test_threaded_cython_steps_allocate_nothing():
    # Steps this large run on fastlstm's threads (an OpenMP region per step).
    from fastlstm._kernels import cython_backend

    layer = LSTM(64, 512, seed=0, backend="cython")
    state = layer.initial_state(4)
    assert all(buffers.threaded for buffers in state._buffers)
    before = fastlstm.get_num_threads()
    fastlstm.set_num_threads(2)
    try:
        kept, peak = traced_steps(layer, 45, batch_size=4)
    finally:
        fastlstm.set_num_threads(before)
    assert cython_backend.STEP_KERNEL is layer._prepared_step_weights()[0]
    assert kept == 0, f"steps kept {kept} bytes"
    assert peak < 512, f"steps allocated up to {peak} bytes on the way"


def test_streams_are_independent_and_step_checks_inputs():
    layer = LSTM(3, 4, seed=0)
    x = random_input((2, 3), np.float32)
    first, second = layer.initial_state(2), layer.initial_state(2)
    y_first = layer.step(x, first)[0].copy()
    np.testing.assert_array_equal(second.h, 0)
    np.testing.assert_array_equal(layer.step(x, second)[0], y_first)
    with pytest.raises(
        ValueError, match=r"x_t must have shape \(batch_size, input_size\) = \(2, 3\), got \(1, 3\)"
    ):
        layer.step(x[:1], first)
    with pytest.raises(TypeError, match=r"x_t must have the layer's dtype float32, got float64"):
        layer.step(x.astype(np.float64), first)
    with pytest.raises(TypeError, match="LSTMState made by this layer"):
        LSTM(3, 4).step(x, first)
    with pytest.raises(
        ValueError,
        match=r"h0 must have shape \(num_layers, batch_size, hidden_size\) = \(1, 2, 4\)",
    ):
        layer.initial_state(2, h0=np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="bidirectional|reverse"):
        LSTM(3, 4, bidirectional=True).initial_state(1)


# ------------------------------------------------------------------------- concurrency


def test_one_layer_serves_many_threads():
    layer = LSTM(8, 16, 2, bidirectional=True, seed=0)
    inputs = [random_input((6, 3, 8), np.float32, seed=s) for s in range(8)]
    lengths = [np.array([6, 2, 4]), None]
    serial = [layer(x, lengths=lengths[k % 2]) for k, x in enumerate(inputs)]
    stream_layer = LSTM(8, 16, 2, seed=1)
    serial_steps = []
    for x in inputs:
        state = stream_layer.initial_state(3)
        serial_steps.append([stream_layer.step(x_t, state)[0].copy() for x_t in x])
    mismatches = []
    barrier = threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for call in range(200):
            y, (h, c) = layer(inputs[k], lengths=lengths[k % 2])
            if not (np.array_equal(y, serial[k][0]) and np.array_equal(h, serial[k][1][0])):
                mismatches.append((k, call))
            if call % 20 == 0:
                state = stream_layer.initial_state(3)
                for t, x_t in enumerate(inputs[k]):
                    if not np.array_equal(stream_layer.step(x_t, state)[0], serial_steps[k][t]):
                        mismatches.append((k, call, t))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


@pytest.mark.parametrize("B", [1, 9])  # the backends' small-batch and batch kernels
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_weights_are_kept_until_parameters_are_handed_out(backend, B):
    """While its weights are read-only, a layer keeps the weights its backend packed at the first
    call; `parameters` drops them, so updates in place are seen by the next call."""
    layer = LSTM(5, 130, seed=3, backend=backend)
    x = random_input((7, B, 5), np.float32, seed=B)

    def expected():
        return lstm_forward(x, *(w.copy() for w in layer.weights[0]), backend=backend)[0]

    before = expected()
    np.testing.assert_array_equal(layer(x)[0], before)
    np.testing.assert_array_equal(layer(x)[0], before)
    layer.parameters()["l0_forward_Wh"] *= 0.5
    after = expected()
    assert not np.array_equal(after, before)
    np.testing.assert_array_equal(layer(x)[0], after)
    layer.parameters()["l0_forward_Wx"] *= 0.5
    np.testing.assert_array_equal(layer(x)[0], expected())


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_calls_from_many_threads_agree(backend):
    """Threads whose first calls on a new layer pack its weights at once all get the serial
    results (each packs or finds them packed; a layer keeps one set)."""
    inputs = [random_input((6, 1 + 8 * (k % 2), 5), np.float32, seed=k) for k in range(8)]
    serial_layer = LSTM(5, 130, seed=4, backend=backend)
    serial = [serial_layer(x)[0] for x in inputs]
    for _ in range(3):
        layer = LSTM.from_weights(serial_layer.weights, backend=backend)
        results = [None] * len(inputs)
        barrier = threading.Barrier(len(inputs))

        def worker(k):
            barrier.wait()
            results[k] = layer(inputs[k])[0]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for got, want in zip(results, serial):
            np.testing.assert_array_equal(got, want)
