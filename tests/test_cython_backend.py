"""Checks specific to the Cython backend: its portable (non-SIMD) kernels, the activations, the
packing of the recurrent weights, the row-major BLAS helper and the floating-point state.

The backend-parametrized suite (test_backends.py) runs the default (the best build the CPU has)
kernels; here every build (portable, AVX2, AVX-512) runs through the same comparison with the
reference.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import fastlstm
from fastlstm import _threads
from fresh_python import run_python
from lstm_data import as_float64, make_problem, make_upstream

if "cython" not in fastlstm.available_backends():
    pytest.skip("the cython backend is not built here", allow_module_level=True)

from fastlstm._kernels import _blas, _lstm_cython, cython_backend  # noqa: E402
from fastlstm._api import forward_padded  # noqa: E402
from fastlstm._backends import PreparedWeights  # noqa: E402

DTYPES = [np.float32, np.float64]
TOLERANCE = {np.float64: (1e-10, 1e-10), np.float32: (1e-5, 1e-4)}  # DESIGN.md §3
#: Largest abs error of the kernels' sigmoid and tanh against float64 NumPy on the same input.
ACTIVATION_TOLERANCE = {np.float32: 2.5e-7, np.float64: 1e-14}


@pytest.fixture(params=_lstm_cython.ISAS)
def simd(request):
    """Run under each kernel build (skipped where the CPU lacks its instructions)."""
    if _lstm_cython.ISAS.index(request.param) > _lstm_cython.ISAS.index(_lstm_cython.cpu_isa()):
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    before = _lstm_cython.isa()
    assert _lstm_cython._set_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        _lstm_cython._set_isa(before)


@pytest.fixture(params=[0, 10**6], ids=["loop-tiles", "loop-matvec"])
def min_rows_per_thread(request, monkeypatch):
    """Both kinds of time loop, whatever the batch size of the problem."""
    monkeypatch.setattr(cython_backend, "MIN_ROWS_PER_THREAD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (6, 1, 7, 13), (5, 3, 1, 17), (4, 2, 9, 1), (7, 5, 16, 33), (12, 1, 64, 128),
     (300, 2, 4, 6), (3, 5, 7, 200), (3, 12, 5, 19), (4, 14, 6, 37), (31, 1, 22, 21),
     (5, 1, 3, 260),  # one row at H >= 256: shorter passes over k, the last one partial
     # T·B > 2048: the weight gradients on the AVX-512 tiles in two chunks of rows, the second
     # starting within a step; on the other builds, on BLAS (products split by rows). Whole
     # panels (db summed in registers) and a part: 4H = 28 has one of 16 doubles but none of 32
     # floats, 4H = 48 has them in both.
     (683, 3, 5, 7), (683, 3, 5, 12)],
    ids=lambda s: "T{}B{}D{}H{}".format(*s),
)
def test_kernels_match_reference(shape, dtype, simd, n_threads, min_rows_per_thread):
    """Forward outputs and every gradient of both kernel builds against the float64 reference."""
    args = make_problem(*shape, dtype=dtype)
    dy, dh_T, dc_T = make_upstream(shape[0], shape[1], shape[3], dtype=dtype)
    y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="cython", return_cache=True)
    grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
    ref_y, ref_h, ref_c, ref_cache = fastlstm.lstm_forward(
        **as_float64(args), backend="numpy", return_cache=True
    )
    cast = lambda a: a.astype(np.float64)  # noqa: E731
    ref_grads = fastlstm.lstm_backward(cast(dy), ref_cache, cast(dh_T), cast(dc_T))
    forward_tol, grad_tol = TOLERANCE[dtype]
    for got, want in zip((y, h_T, c_T), (ref_y, ref_h, ref_c)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=0, atol=forward_tol)
    for name, got, want in zip(grads._fields, grads, ref_grads):
        scale = max(np.abs(want).max(), 1e-30)
        assert np.abs(got - want).max() / scale <= grad_tol, name
    # without a cache the forward call takes its no-history path
    for got, want in zip(fastlstm.lstm_forward(**args, backend="cython"), (y, h_T, c_T)):
        np.testing.assert_allclose(got, want, rtol=0, atol=forward_tol)


@pytest.mark.parametrize("chunk_steps", [1, 3, 7])
def test_inference_in_chunks_of_time_steps(chunk_steps, n_threads, min_rows_per_thread,
                                           monkeypatch):
    """A long no-cache forward runs in chunks of steps: the same outputs as one pass."""
    T, B, D, H = 8, 3, 5, 11
    args = make_problem(T, B, D, H, dtype=np.float32)
    whole = fastlstm.lstm_forward(**args, backend="cython")
    monkeypatch.setattr(cython_backend, "INFERENCE_GATES_BYTES", chunk_steps * B * 4 * H * 4)
    chunked = fastlstm.lstm_forward(**args, backend="cython")
    for got, want in zip(chunked, whole):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # with lengths, each row's final states are read in whichever chunk holds its last step
    lengths = np.array([8, 0, 5], np.intp)
    _, h_T, c_T = forward_padded(**args, backend="cython", lengths=lengths)
    for row, length in enumerate(lengths):
        alone = dict(args, x=args["x"][:length, row : row + 1], h0=args["h0"][row : row + 1],
                     c0=args["c0"][row : row + 1])
        _, h_want, c_want = fastlstm.lstm_forward(**alone, backend="cython")
        np.testing.assert_allclose(h_T[row], h_want[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(c_T[row], c_want[0], rtol=0, atol=1e-6)


def always_threads():
    """A `SoloBackoff` that runs every call on the threads it asks for: no back-off (length 0),
    and threads that ran a moment ago on a stopped clock (no idle rule)."""
    backoff = _threads.SoloBackoff(0, 0, clock=lambda: 0.0)
    backoff.note(2, False)
    return backoff


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 1, 5, 40), (30, 1, 16, 128), (6, 3, 4, 70)],
                         ids=lambda s: "T{}B{}D{}H{}".format(*s))
def test_time_loops_going_on_alone_give_the_same_bits(shape, dtype, monkeypatch):
    """When a barrier wait has to sleep (the partner thread descheduled), the small-batch time
    loops go on with thread 0 alone while the others wait for it. With no spinning every wait
    sleeps, so every call does that after its first step: the same bits as lockstep threads."""
    monkeypatch.setattr(cython_backend, "MIN_ROWS_PER_THREAD", 10**6)  # the matvec loops
    monkeypatch.setattr(cython_backend, "_backoff", always_threads())
    args = make_problem(*shape, dtype=dtype)
    dy, dh_T, dc_T = make_upstream(shape[0], shape[1], shape[3], dtype=dtype)
    lengths = np.arange(shape[1], dtype=np.intp) % shape[0] + 1
    fastlstm.set_num_threads(2)
    try:
        runs = []
        for spins in (None, 0):
            before = _lstm_cython._set_barrier_spins(0) if spins == 0 else None
            try:
                y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="cython",
                                                           return_cache=True)
                grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
                inference = fastlstm.lstm_forward(**args, backend="cython")
                padded = forward_padded(**args, backend="cython", lengths=lengths)
            finally:
                if before is not None:
                    _lstm_cython._set_barrier_spins(before)
            runs.append((y, h_T, c_T, *grads, *inference, *padded))
    finally:
        fastlstm.set_num_threads(None)
    for lockstep, alone in zip(*runs):
        np.testing.assert_array_equal(alone, lockstep)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 1, 5, 40), (30, 1, 16, 128), (6, 3, 4, 70),
                                   (31, 1, 64, 100),
                                   (683, 3, 5, 7)],  # T·B > 2048: chunks or BLAS
                         ids=lambda s: "T{}B{}D{}H{}".format(*s))
def test_small_batch_loops_give_the_same_bits_on_any_threads(shape, dtype, monkeypatch):
    """The back-off (`SoloBackoff`) may run a small-batch call on one thread instead of the
    threads asked for: the results must not depend on it. (At B = 1 in float32 on the AVX-512
    build, the one-thread steps carry the input projection, forced here whatever the CPU, and
    the two-thread ones do not, `steps_carry_projection`.)"""
    monkeypatch.setattr(cython_backend, "MIN_ROWS_PER_THREAD", 10**6)  # the matvec loops
    monkeypatch.setattr(cython_backend, "_backoff", always_threads())
    args = make_problem(*shape, dtype=dtype)
    dy, dh_T, dc_T = make_upstream(shape[0], shape[1], shape[3], dtype=dtype)
    runs = []
    for n_threads in (1, 2):
        fastlstm.set_num_threads(n_threads)
        before = _lstm_cython._set_projection_in_steps("always")
        try:
            y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="cython",
                                                       return_cache=True)
            grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
            inference = fastlstm.lstm_forward(**args, backend="cython")
        finally:
            fastlstm.set_num_threads(None)
            _lstm_cython._set_projection_in_steps(before)
        runs.append((y, h_T, c_T, *grads, *inference))
    for one, two in zip(*runs):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize(
    "shape",
    [(12, 128, 128),  # one tile carried
     (31, 22, 21), (13, 10, 9),  # a partial block of units; thirds of D of unequal size
     (25, 300, 20),  # more projection k values a step than pairs of step k values
     (100, 256, 256)],
    ids=lambda s: "T{}D{}H{}".format(*s),
)
def test_steps_carrying_the_projection_give_the_same_bits(shape, monkeypatch):
    """At B = 1 on one thread and the AVX-512 build, float32 steps may compute slices of the
    input projection of later steps: the same bits as projecting every row before the time loop
    (on one thread, on two, and two going on alone). Forced on, whatever the CPU."""
    if _lstm_cython.isa() != "avx512":
        pytest.skip("the steps carry the projection on the AVX-512 build only")
    T, D, H = shape
    before = _lstm_cython._set_projection_in_steps("always")
    try:
        assert _lstm_cython.steps_carry_projection(4, 1, D, H, 1)
    finally:
        _lstm_cython._set_projection_in_steps(before)
    monkeypatch.setattr(cython_backend, "_backoff", always_threads())
    args = make_problem(T, 1, D, H, dtype=np.float32)
    dy, dh_T, dc_T = make_upstream(T, 1, H, dtype=np.float32)
    lengths = np.array([T - 5], np.intp)

    def outputs():
        y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="cython", return_cache=True)
        grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
        inference = fastlstm.lstm_forward(**args, backend="cython")
        padded = forward_padded(**args, backend="cython", lengths=lengths)
        return (y, h_T, c_T, *grads, *inference, *padded)

    runs = []
    for carried, n_threads, spins in [("never", 1, None), ("always", 1, None),
                                      ("always", 2, None), ("always", 2, 0)]:
        before = _lstm_cython._set_projection_in_steps(carried)
        spins_before = _lstm_cython._set_barrier_spins(spins) if spins is not None else None
        fastlstm.set_num_threads(n_threads)
        try:
            runs.append(outputs())
        finally:
            fastlstm.set_num_threads(None)
            _lstm_cython._set_projection_in_steps(before)
            if spins_before is not None:
                _lstm_cython._set_barrier_spins(spins_before)
    for other in runs[1:]:
        for want, got in zip(runs[0], other):
            np.testing.assert_array_equal(got, want)


def test_cpu_family_agrees_with_the_kernel():
    """The kernel's CPUID reading (AMD family 19h) against what Linux read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or _lstm_cython.cpu_isa() == "portable":
        pytest.skip("needs Linux's /proc/cpuinfo on an x86-64 CPU")
    fields = {}
    for line in cpuinfo.read_text().splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())  # the first CPU's
    family_19h = fields["vendor_id"] == "AuthenticAMD" and int(fields["cpu family"]) == 0x19
    assert _lstm_cython.CPU_AMD_FAMILY_19H == family_19h


def test_steps_carry_the_projection_only_where_measured_faster():
    """Float32, B = 1, one thread, D >= H / 2, the AVX-512 build, on Zen 4 (AMD family 19h):
    not float64, batches, two threads, a smaller D, other builds, other CPUs unless forced, or
    with the switch off."""
    if _lstm_cython.isa() != "avx512":
        pytest.skip("the steps carry the projection on the AVX-512 build only")
    carry = _lstm_cython.steps_carry_projection
    assert carry(4, 1, 64, 128, 1) == _lstm_cython.CPU_AMD_FAMILY_19H
    before = _lstm_cython._set_projection_in_steps("always")
    try:
        assert carry(4, 1, 64, 128, 1)
        assert not carry(4, 1, 64, 128, 2)
        assert not carry(4, 1, 63, 128, 1)
        assert not carry(8, 1, 64, 128, 1)
        assert not carry(4, 2, 64, 128, 1)
        isa_before = _lstm_cython.isa()
        try:
            _lstm_cython._set_isa("avx2")
            assert not carry(4, 1, 64, 128, 1)
        finally:
            _lstm_cython._set_isa(isa_before)
        _lstm_cython._set_projection_in_steps("never")
        assert not carry(4, 1, 64, 128, 1)
    finally:
        _lstm_cython._set_projection_in_steps(before)


@pytest.mark.parametrize("shape", [(32, 128, 256), (1, 40, 300)],
                         ids=lambda s: "B{}D{}H{}".format(*s))
def test_threaded_steps_give_the_same_bits_as_one_thread(shape, monkeypatch):
    """`SoloBackoff` may run a threaded streaming step on one thread: the same bits."""
    B, D, H = shape
    monkeypatch.setattr(cython_backend, "STEP_THREADS_FROM", 0)
    monkeypatch.setattr(cython_backend, "_backoff", always_threads())
    layer = fastlstm.LSTM(D, H, backend="cython", dtype=np.float32)
    inputs = np.random.default_rng(5).standard_normal((5, B, D)).astype(np.float32)
    runs = []
    for n_threads in (1, 2):
        fastlstm.set_num_threads(n_threads)
        try:
            state = layer.initial_state(B)
            runs.append(np.array([layer.step(x_t, state)[0].copy() for x_t in inputs]))
        finally:
            fastlstm.set_num_threads(None)
    np.testing.assert_array_equal(runs[0], runs[1])


def activation_inputs():
    dense = np.linspace(-50, 50, 100_001)
    near_zero = np.linspace(-1e-3, 1e-3, 2_001)
    # exp overflows early to +inf from x = 88.4 (float) and 709.4 (double), see vexp_saturating
    special = [0.0, -0.0, 1e4, -1e4, 88, -88, 88.5, -88.5, 90, -90, 709.9, -709.9, 800, -800,
               5e-324, np.inf, -np.inf]
    return np.concatenate([dense, near_zero, special])


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_error_bounds(dtype, simd):
    x = activation_inputs().astype(dtype)
    exact = x.astype(np.float64)
    with np.errstate(over="ignore"):
        expected = {"sigmoid": 1 / (1 + np.exp(-exact)), "tanh": np.tanh(exact)}
    for name, function in (("sigmoid", _lstm_cython.sigmoid), ("tanh", _lstm_cython.tanh)):
        out = np.empty_like(x)
        function(x, out)
        assert np.abs(out - expected[name]).max() <= ACTIVATION_TOLERANCE[dtype], name
    saturating = np.array([np.inf, -np.inf, 1e4, -1e4], dtype)
    out = np.empty_like(saturating)
    _lstm_cython.sigmoid(saturating, out)
    assert out.tolist() == [1, 0, 1, 0]
    _lstm_cython.tanh(saturating, out)
    assert out.tolist() == [1, -1, 1, -1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_propagate_nan(dtype, simd):
    # NaN in every lane position of a vector and in the scalar tail
    x = np.zeros(19, dtype)
    x[[0, 5, 11, 18]] = np.nan
    for function in (_lstm_cython.sigmoid, _lstm_cython.tanh):
        out = np.empty_like(x)
        function(x, out)
        assert np.array_equal(np.isnan(out), np.isnan(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_nan_and_inf_inputs_propagate(dtype, simd):
    args = make_problem(4, 2, 3, 9, dtype=dtype)
    args["x"][1, 0, 2] = np.nan
    args["x"][2, 1, 0] = np.inf
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend="cython")
    ref_y, _, _ = fastlstm.lstm_forward(**as_float64(args), backend="numpy")
    assert np.array_equal(np.isnan(y), np.isnan(ref_y))
    finite = np.isfinite(ref_y)
    np.testing.assert_allclose(y[finite], ref_y[finite], rtol=0, atol=TOLERANCE[dtype][0])


def expected_panels(stacked, H, units):
    """packed[blk, half, k, q2, j] = stacked[k, (2*half + q2)*H + blk*U + j], zero past H (U units
    per block; half 0 holds gates i, f and half 1 gates o, g)."""
    K = stacked.shape[0]
    n_blocks = -(-H // units)
    padded = np.zeros((K, 4, n_blocks * units), stacked.dtype)
    padded[:, :, :H] = stacked.reshape(K, 4, H)
    return padded.reshape(K, 2, 2, n_blocks, units).transpose(3, 1, 0, 2, 4).ravel()


# (D, H): partial blocks under every build, and passes of 64 rows (PACK_ROWS) that start or end
# inside Wx, inside Wh, or at b
PACK_SHAPES = [(1, 1), (2, 3), (5, 8), (3, 13), (4, 16), (50, 37), (70, 3), (5, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, H", PACK_SHAPES)
def test_pack_layout(D, H, dtype, simd, n_threads):
    """Wx and Wh packed for the small-batch kernels, [Wx; Wh; b] for the batch kernels, in
    panels."""
    rng = np.random.default_rng(H)
    Wx, Wh, b = (rng.standard_normal(shape).astype(dtype) for shape in [(D, 4 * H), (H, 4 * H),
                                                                        (4 * H,)])
    units = _lstm_cython.units_per_block(np.dtype(dtype).itemsize)
    packed = cython_backend.recurrent_weights(Wh, n_threads)
    assert packed.dtype == dtype
    np.testing.assert_array_equal(packed, expected_panels(Wh, H, units))
    packed_x = cython_backend.input_weights(Wx, n_threads)
    np.testing.assert_array_equal(packed_x, expected_panels(Wx, H, units))
    stacked = cython_backend.stacked_weights(Wx, Wh, b, n_threads)
    np.testing.assert_array_equal(stacked, expected_panels(np.vstack([Wx, Wh, b]), H, units))


def small_batch_forward(args, packed_x, packed, n_threads, weights=(None, None)):
    """y (T, B, H) and the cell state c_T of `_lstm_cython.forward` (no history kept)."""
    x, b, h0, c0 = (args[k] for k in ("x", "b", "h0", "c0"))
    T, B, _ = x.shape
    H = h0.shape[1]
    gates = np.empty((T, B, 4 * H), x.dtype)
    y = np.empty((T, B, H), x.dtype)
    c_store = c0.copy()[np.newaxis]
    tanh_c = np.empty((0, B, H), x.dtype)
    _lstm_cython.forward(x, packed_x, b, packed, h0, c0, gates, y, c_store, tanh_c, n_threads,
                         None, None, *weights)
    return y, c_store[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, H", PACK_SHAPES)
def test_forward_packs_weights_in_its_region(D, H, dtype, simd, n_threads):
    """Given Wx and Wh, the small-batch forward's threads pack them into packed_x and packed,
    each its own blocks, as the packing functions arrange them, and compute the same bits as
    from weights packed before."""
    args = make_problem(4, 1, D, H, dtype=dtype)
    Wx, Wh = args["Wx"], args["Wh"]
    units = _lstm_cython.units_per_block(np.dtype(dtype).itemsize)
    packed_x = np.full(_lstm_cython.packed_size(D, H, np.dtype(dtype).itemsize), np.nan, dtype)
    packed = np.full(_lstm_cython.packed_size(H, H, np.dtype(dtype).itemsize), np.nan, dtype)
    got = small_batch_forward(args, packed_x, packed, n_threads, (Wx, Wh))
    np.testing.assert_array_equal(packed_x, expected_panels(Wx, H, units))
    np.testing.assert_array_equal(packed, expected_panels(Wh, H, units))
    want = small_batch_forward(args, cython_backend.input_weights(Wx, n_threads),
                               cython_backend.recurrent_weights(Wh, n_threads), n_threads)
    for got_part, want_part in zip(got, want):
        np.testing.assert_array_equal(got_part, want_part)


def test_forward_packing_rejects_bad_targets():
    """Weights to pack come both or neither, in the kernel's shapes, into writable arrays."""
    args = make_problem(2, 1, 3, 5, dtype=np.float32)
    Wx, Wh = args["Wx"], args["Wh"]
    packed_x = np.empty(_lstm_cython.packed_size(3, 5, 4), np.float32)
    packed = np.empty(_lstm_cython.packed_size(5, 5, 4), np.float32)
    with pytest.raises(ValueError, match="together"):
        small_batch_forward(args, packed_x, packed, 1, (Wx, None))
    with pytest.raises(ValueError, match=r"Wx must have shape \(3, 20\).*\(5, 20\); got"):
        small_batch_forward(args, packed_x, packed, 1, (Wx, Wh[:4]))
    read_only = packed.copy()
    read_only.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        small_batch_forward(args, packed_x, read_only, 1, (Wx, Wh))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 3, 8, 13, 16, 37, 64, 100])
@pytest.mark.parametrize("use_matvec", [True, False], ids=["loop-matvec", "loop-batch"])
def test_backward_packs_transposed_weights(H, dtype, use_matvec, simd, n_threads):
    """The backward first arranges Wh.T into packed_t: packed_t[blk, k, j] = Wh[blk*N + j, k],
    zero past H (N = 2U units per block), whole vector tiles transposed in registers and the
    edges value by value, in every build; in the small-batch loop each thread its own panels."""
    args = make_problem(3, 2, 4, H, dtype=dtype)
    x, Wx, Wh, b, h0, c0 = (args[k] for k in ("x", "Wx", "Wh", "b", "h0", "c0"))
    cache = cython_backend.forward(x, Wx, Wh, b, h0, c0, need_cache=True, n_threads=n_threads)[3]
    x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c = cache
    width = 2 * _lstm_cython.units_per_block(np.dtype(dtype).itemsize)
    n_blocks = -(-H // width)
    padded = np.zeros((n_blocks * width, 4 * H), dtype)
    padded[:H] = Wh
    expected = padded.reshape(n_blocks, width, 4 * H).transpose(0, 2, 1).ravel()
    packed_t = np.full(_lstm_cython.packed_transposed_size(H, np.dtype(dtype).itemsize), np.nan,
                       dtype)
    states = [np.zeros(h0.shape, dtype) for _ in range(2)]
    _lstm_cython.backward(np.zeros(y.shape, dtype), x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c,
                          np.empty_like(gates), *states, None, np.empty_like(Wx),
                          np.empty_like(Wh), np.empty(4 * H, dtype), packed_t, use_matvec,
                          n_threads)
    np.testing.assert_array_equal(packed_t, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [1, 9])  # small-batch loops, batch loops (on 2 threads)
def test_forward_with_prepared_weights(monkeypatch, B, dtype):
    """Weights packed at the first call with a `PreparedWeights` serve the next calls: the same
    bits as packing at every call, and no packing after the first."""
    args = make_problem(5, B, 4, 21, dtype=dtype)
    x, Wx, Wh, b, h0, c0 = (args[k] for k in ("x", "Wx", "Wh", "b", "h0", "c0"))
    without = cython_backend.forward(x, Wx, Wh, b, h0, c0, need_cache=False, n_threads=2)
    prepared = PreparedWeights(Wx, Wh, b)
    first = cython_backend.forward(x, Wx, Wh, b, h0, c0, need_cache=False, n_threads=2,
                                   prepared=prepared)
    for name in ("pack_input_weights", "pack_recurrent_weights", "pack_stacked_weights"):
        monkeypatch.setattr(_lstm_cython, name, lambda *_: pytest.fail("packed again"))
    later = cython_backend.forward(x, Wx, Wh, b, h0, c0, need_cache=True, n_threads=2,
                                   prepared=prepared)
    for got_first, got_later, want in zip(first[:3], later[:3], without[:3]):
        np.testing.assert_array_equal(got_first, want)
        np.testing.assert_array_equal(got_later, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_blas_gemm_matches_numpy(trans_a, trans_b, dtype):
    rng = np.random.default_rng(0)
    m, n, k = 7, 5, 3
    A = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    C = rng.standard_normal((m, n)).astype(dtype)
    expected = 0.5 * ((A.T if trans_a else A) @ (B.T if trans_b else B)) + 2.0 * C
    _blas._check_gemm(trans_a, trans_b, 0.5, A, B, 2.0, C)
    np.testing.assert_allclose(C, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


DENORMAL_CHECK = """
import numpy as np
import fastlstm
assert np.float32(1e-45) * np.float32(1.0) != 0, "float32 denormal flushed at import"
assert np.float64(5e-324) * 1.0 != 0, "float64 denormal flushed at import"
rng = np.random.default_rng(0)
for dtype in (np.float32, np.float64):
    x = rng.standard_normal((3, 2, 4)).astype(dtype)
    Wx = rng.standard_normal((4, 20)).astype(dtype)
    Wh = rng.standard_normal((5, 20)).astype(dtype)
    b = np.zeros(20, dtype)
    y, h, c, cache = fastlstm.lstm_forward(x, Wx, Wh, b, backend="cython", return_cache=True)
    fastlstm.lstm_backward(np.ones_like(y), cache)
assert np.float32(1e-45) * np.float32(1.0) != 0, "float32 denormal flushed by a call"
assert np.float64(5e-324) * 1.0 != 0, "float64 denormal flushed by a call"
print("ok")
"""


def test_floating_point_state_survives_import_and_calls():
    """No flush-to-zero or denormals-are-zero after import fastlstm and after cython calls
    (DESIGN.md §6: a -ffast-math link flushes denormals for the whole process)."""
    assert run_python(DENORMAL_CHECK).stdout.strip() == "ok"


def test_denormal_inputs_stay_denormal_in_process():
    tiny = np.full((2, 1, 1), 1e-45, np.float32)
    Wx = np.ones((1, 4), np.float32)
    Wh = np.zeros((1, 4), np.float32)
    fastlstm.lstm_forward(tiny, Wx, Wh, np.zeros(4, np.float32), backend="cython")
    assert np.float32(1e-45) * np.float32(1.0) != 0


def test_environment_variable_disables_simd():
    code = "from fastlstm._kernels import _lstm_cython as k; print(k.simd_active())"
    env = dict(os.environ, FASTLSTM_DISABLE_SIMD="1")
    assert run_python(code, env=env).stdout.strip() == "False"


def test_simd_default_follows_cpu():
    if os.environ.get("FASTLSTM_DISABLE_SIMD", "0") not in ("", "0"):
        pytest.skip("FASTLSTM_DISABLE_SIMD is set")
    assert _lstm_cython.isa() == _lstm_cython.cpu_isa()
    assert _lstm_cython.simd_active() == _lstm_cython.cpu_has_simd()


@pytest.mark.parametrize("B", [1, 9])
def test_prepared_weights_follow_the_kernel_build(B):
    """Weights packed under one build are not used by another (their block widths differ)."""
    before = _lstm_cython.isa()
    args = make_problem(5, B, 3, 37, dtype=np.float32)
    expected = fastlstm.lstm_forward(**args, backend="numpy")[0]
    try:
        for made_under in _lstm_cython.ISAS[: _lstm_cython.ISAS.index(_lstm_cython.cpu_isa()) + 1]:
            _lstm_cython._set_isa(made_under)
            prepared = PreparedWeights(args["Wx"], args["Wh"], args["b"])
            cython_backend.forward(*args.values(), need_cache=False, n_threads=2,
                                   prepared=prepared)
            for used_under in _lstm_cython.ISAS:
                _lstm_cython._set_isa(used_under)
                y = cython_backend.forward(*args.values(), need_cache=False, n_threads=2,
                                           prepared=prepared)[0]
                np.testing.assert_allclose(y, expected, atol=1e-5)
    finally:
        _lstm_cython._set_isa(before)


# ---- streaming step --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 64, 128), (3, 5, 37), (7, 9, 16), (13, 70, 150)],
    ids=lambda s: "B{}D{}H{}".format(*s),
)
@pytest.mark.parametrize("threads_from", [0, None], ids=["threaded", "default-threads"])
def test_step_kernel_matches_reference(shape, dtype, threads_from, simd, n_threads, monkeypatch):
    """Steps of the Cython step kernel against the float64 reference's sequence, from strided
    inputs (row tiles of 1 to 6 rows, a last partial block of units, one or more threads)."""
    B, D, H = shape
    T = 4
    args = make_problem(T, B, D, H, dtype=dtype)
    if threads_from is not None:
        monkeypatch.setattr(cython_backend, "STEP_THREADS_FROM", threads_from)
    kernel = cython_backend.STEP_KERNEL
    prepared = kernel.prepare(args["Wx"], args["Wh"], args["b"])
    buffers = kernel.new_buffers(prepared, args["h0"], args["c0"])
    ref_y, _, ref_c = fastlstm.lstm_forward(**as_float64(args), backend="numpy")
    strided_x = np.repeat(args["x"], 2, axis=2)[:, :, ::2]
    forward_tol = TOLERANCE[dtype][0]
    for t in range(T):
        kernel.step(prepared, buffers, strided_x[t])
        assert buffers.h.dtype == dtype and buffers.c.dtype == dtype
        np.testing.assert_allclose(buffers.h, ref_y[t], rtol=0, atol=forward_tol)
    np.testing.assert_allclose(buffers.c, ref_c, rtol=0, atol=forward_tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 3, 16, 37])
def test_step_pack_layout(H, dtype):
    """packed[blk, half, k, q2, j] = stacked[k, (2*half + q2)*H + blk*U + j] over the K = D + H + 1
    rows of [Wx; Wh; b], zero past H (the layout of `pack` over K rows)."""
    D = 5
    args = make_problem(1, 1, D, H, dtype=dtype)
    stacked = np.concatenate([args["Wx"], args["Wh"], args["b"][np.newaxis]])
    K = D + H + 1
    units = _lstm_cython.units_per_block(np.dtype(dtype).itemsize)
    n_blocks = -(-H // units)
    padded = np.zeros((K, 4, n_blocks * units), dtype)
    padded[:, :, :H] = stacked.reshape(K, 4, H)
    expected = padded.reshape(K, 2, 2, n_blocks, units).transpose(3, 1, 0, 2, 4).ravel()
    prepared = cython_backend.STEP_KERNEL.prepare(args["Wx"], args["Wh"], args["b"])
    assert prepared.units == units and not prepared.packed.flags.writeable
    np.testing.assert_array_equal(prepared.packed, expected)
    with pytest.raises(ValueError, match="packed_size"):
        _lstm_cython.pack_stacked_weights(args["Wx"], args["Wh"], args["b"],
                                          np.empty(expected.size - 1, dtype))


def test_step_weights_follow_the_kernel_build():
    """Step weights packed under one build are refused by a build of another block width."""
    args = make_problem(1, 2, 3, 37, dtype=np.float32)
    kernel = cython_backend.STEP_KERNEL
    builds = _lstm_cython.ISAS[: _lstm_cython.ISAS.index(_lstm_cython.cpu_isa()) + 1]
    before = _lstm_cython.isa()
    try:
        for made_under in builds:
            _lstm_cython._set_isa(made_under)
            prepared = kernel.prepare(args["Wx"], args["Wh"], args["b"])
            buffers = kernel.new_buffers(prepared, args["h0"], args["c0"])
            for used_under in builds:
                _lstm_cython._set_isa(used_under)
                if _lstm_cython.units_per_block(4) == prepared.units:
                    kernel.step(prepared, buffers, args["x"][0])
                else:
                    with pytest.raises(ValueError, match="another kernel build"):
                        kernel.step(prepared, buffers, args["x"][0])
    finally:
        _lstm_cython._set_isa(before)
