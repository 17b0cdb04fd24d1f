"""Checks particular to the Numba backend: threading layer, activations, matrix-vector kernels,
the kernel variants the planner can choose, the step barrier, compile caching and
specialisations.

The generic forward/gradient checks against the reference are in test_backends.py.
"""


import os

import numpy as np
import pytest

import fastlstm

numba = pytest.importorskip("numba")
if "numba" not in fastlstm.available_backends():
    pytest.skip("numba backend not available", allow_module_level=True)

from fastlstm._kernels import numba_backend as nb  # noqa: E402
from fastlstm._threads import BACKOFF_FIRST, BACKOFF_MAX, SoloBackoff  # noqa: E402
from fresh_python import run_python
from lstm_data import as_float64, make_problem, make_upstream  # noqa: E402
from test_backends import assert_matches_reference, reference, run  # noqa: E402


def run_in_fresh_process(code):
    return run_python(code).stdout.strip().splitlines()[-1]


# --- threading layer --------------------------------------------------------------------------

def test_threading_layer_is_not_workqueue_in_a_fresh_process():
    """The layer is fixed at a process's first parallel launch; check the one we really get."""
    layer = run_in_fresh_process("""
        import numpy as np, fastlstm
        from fastlstm._kernels import numba_backend
        x = np.ones((3, 2, 4), np.float32)
        Wx, Wh, b = np.ones((4, 8), np.float32), np.ones((2, 8), np.float32), np.ones(8, np.float32)
        fastlstm.set_num_threads(2)
        fastlstm.lstm_forward(x, Wx, Wh, b, backend="numba")
        print(numba_backend.threading_layer())
    """)
    assert layer in ("omp", "tbb"), layer


def test_threading_layer_reports_the_layer_in_use():
    assert nb.threading_layer() == numba.threading_layer()


# --- activations ------------------------------------------------------------------------------

@numba.njit
def apply_tanh(a):
    out = np.empty_like(a)
    for k in range(a.shape[0]):
        out[k] = nb.tanh_act(a[k])
    return out


@numba.njit
def apply_sigmoid(a):
    out = np.empty_like(a)
    for k in range(a.shape[0]):
        out[k] = nb.sigmoid_act(a[k])
    return out


def activation_grid(dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    special = [0.0, -0.0, np.inf, -np.inf, 1e4, -1e4, 1e30, -1e30, 7.9, -7.9, 7.9001, 15.8,
               -15.8, tiny, -tiny, 1e3 * tiny, np.finfo(dtype).tiny, np.finfo(dtype).max,
               -np.finfo(dtype).max]
    dense = np.linspace(-20.0, 20.0, 400_001)
    return np.concatenate([dense, special]).astype(dtype)


ACTIVATION_TOLERANCE = {np.float32: 4e-7, np.float64: 1e-15}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tanh_error_bound_and_limits(dtype):
    a = activation_grid(dtype)
    got = apply_tanh(a)
    assert got.dtype == dtype
    want = np.tanh(a.astype(np.float64))
    assert np.max(np.abs(got - want)) <= ACTIVATION_TOLERANCE[dtype]
    assert np.all(np.abs(got) <= 1.0)
    np.testing.assert_array_equal(got, -apply_tanh(-a))  # odd, also for ±0 and ±inf
    assert got[a == np.inf].tolist() == [pytest.approx(1.0, abs=3e-7)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_error_bound_and_limits(dtype):
    a = activation_grid(dtype)
    got = apply_sigmoid(a)
    assert got.dtype == dtype
    with np.errstate(over="ignore"):
        want = 1.0 / (1.0 + np.exp(-a.astype(np.float64)))
    assert np.max(np.abs(got - want)) <= ACTIVATION_TOLERANCE[dtype]
    assert np.all((got >= 0.0) & (got <= 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_propagate_nan(dtype):
    a = np.array([np.nan, -np.nan, 1.0], dtype)
    assert np.isnan(apply_tanh(a)[:2]).all() and np.isnan(apply_sigmoid(a)[:2]).all()


def test_float32_tiny_inputs_keep_their_value():
    """Denormal and tiny inputs: tanh(x) ≈ x (no flush to zero, no sign loss)."""
    a = np.array([1e-40, -1e-40, 1e-30, -1e-30], np.float32)
    np.testing.assert_allclose(apply_tanh(a), a, rtol=1e-6)


# --- the matrix-vector kernels --------------------------------------------

@pytest.mark.parametrize("H", [1, 5, 16, 17, 40, 130])
@pytest.mark.parametrize("n_parts", [1, 2, 3, 5])
def test_unit_ranges_cover_every_unit_once_aligned(H, n_parts):
    ranges = [nb._unit_range(part, n_parts, H) for part in range(n_parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == H
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        assert lo <= hi == next_lo
    assert all(lo % nb.UNIT_ALIGN == 0 or lo == H for lo, _ in ranges)


@pytest.mark.parametrize("gates_per_row", [4, 2])
@pytest.mark.parametrize("K", [21, 13])
@pytest.mark.parametrize("lo, hi", [(0, 21), (0, 16), (16, 21), (5, 5)])
def test_pack_part_gathers_the_four_gate_ranges(lo, hi, K, gates_per_row):
    H = 21
    V = nb.VECTOR_BYTES // 8  # float64 values per vector; parts start at multiples of it
    W = np.random.default_rng(hi).standard_normal((K, 4 * H))
    packed = np.full((H + V - 1) // V * V * 4 * K, 7.0)
    nb._pack_part(W, packed, lo, hi, gates_per_row)
    run = gates_per_row * V
    for u in range(lo, hi, V):  # per V units, 4 // gates_per_row panels (K, run), 0 past hi
        n = min(V, hi - u)
        panels = packed[4 * K * u:4 * K * (u + V)].reshape(4 // gates_per_row, K, run)
        for gate in range(4):
            columns = panels[gate // gates_per_row, :, gate % gates_per_row * V:][:, :V]
            np.testing.assert_array_equal(columns[:, :n], W[:, gate * H + u:gate * H + u + n])
            assert np.all(columns[:, n:] == 0)
    end = lo + (hi - lo + V - 1) // V * V
    assert np.all(packed[:4 * K * lo] == 7.0) and np.all(packed[4 * K * end:] == 7.0)


def test_project_part_writes_its_units_columns():
    """A part's columns of x @ Wx, gate by gate at a stride of whole vectors."""
    M, D, H, lo, hi = 13, 5, 21, 16, 21
    V = nb.VECTOR_BYTES // 8
    rng = np.random.default_rng(4)
    x, Wx = rng.standard_normal((M, D)), rng.standard_normal((D, 4 * H))
    packed = np.zeros((H + V - 1) // V * V * 4 * D)
    nb._pack_part(Wx, packed, lo, hi, 2)
    Hs = -(-(hi - lo) // V) * V
    out = np.full((M, 4 * Hs), np.nan)
    nb._project_part(x, packed, lo, hi, out)
    expected = x @ Wx
    for gate in range(4):
        np.testing.assert_allclose(out[:, gate * Hs:gate * Hs + hi - lo],
                                   expected[:, gate * H + lo:gate * H + hi], rtol=1e-12)
        assert np.all(out[:, gate * Hs + hi - lo:(gate + 1) * Hs] == 0)  # the zero padding


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("H", [1, 3, 8, 13, 16, 37, 64, 100])
def test_pack_transposed_layout(H, dtype):
    """Blocks blk_lo..blk_hi-1 of packed_t[blk, g, j] = Wh[blk·2V + j, g], 0 past H (whole
    vector tiles through registers, the edges value by value); other blocks untouched."""
    Wh = np.random.default_rng(H).standard_normal((H, 4 * H)).astype(dtype)
    width = 2 * nb.VECTOR_BYTES // np.dtype(dtype).itemsize
    n_blocks = -(-H // width)
    padded = np.zeros((n_blocks * width, 4 * H), dtype)
    padded[:H] = Wh
    expected = padded.reshape(n_blocks, width, 4 * H).transpose(0, 2, 1).ravel()
    packed_t = np.full(expected.size, 7.0, dtype)
    blk_lo = n_blocks // 2
    nb._pack_transposed(Wh, packed_t, blk_lo, n_blocks)
    start = blk_lo * width * 4 * H
    np.testing.assert_array_equal(packed_t[start:], expected[start:])
    assert np.all(packed_t[:start] == 7.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (17, 33), (16, 16), (40, 70), (8, 5)])
def test_transpose_into(shape, dtype):
    """Whole vector tiles and both edges (rows past the last tile, columns past it)."""
    src = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    dst = np.full(shape[::-1], 7.0, dtype)
    nb._transpose_into(src, dst)
    np.testing.assert_array_equal(dst, src.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K, N, lo, hi", [(1, 7, 0, 7), (3, 9, 2, 5), (13, 64, 0, 64),
                                           (130, 512, 128, 384), (5, 33, 33, 33)])
def test_matvec_columns(dtype, K, N, lo, hi):
    rng = np.random.default_rng(K + N)
    vec, W = rng.standard_normal(K).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    out = np.full(N, 7.0, dtype)
    nb._matvec_columns(vec, W, out, lo, hi)
    want = vec.astype(np.float64) @ W.astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(out[lo:hi], want[lo:hi], rtol=tol, atol=tol)
    assert np.all(out[:lo] == 7.0) and np.all(out[hi:] == 7.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N, K, lo, hi", [(1, 7, 0, 1), (9, 3, 2, 7), (13, 64, 0, 13),
                                           (128, 512, 64, 128), (5, 33, 5, 5)])
def test_matvec_rows(dtype, N, K, lo, hi):
    rng = np.random.default_rng(K + N)
    W, vec = rng.standard_normal((N, K)).astype(dtype), rng.standard_normal(K).astype(dtype)
    out = np.full(N, 7.0, dtype)
    nb._matvec_rows(W, vec, out, lo, hi)
    want = W.astype(np.float64) @ vec.astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(out[lo:hi], want[lo:hi], rtol=tol, atol=tol)
    assert np.all(out[:lo] == 7.0) and np.all(out[hi:] == 7.0)


# --- every kernel variant the planner can choose ----------------------------------------------

PLANS = [  # what _plan would return, forced
    nb.Plan("split_hidden", 2, True, 2),
    nb.Plan("split_hidden", 3, True, 2),  # more parts than threads: a thread takes several
    nb.Plan("split_hidden", 2, True, 1),  # the back-off: one thread runs every part
    nb.Plan("split_hidden", 1, True, 1),
    nb.Plan("chunks", 1, True, 1),
    nb.Plan("chunks", 2, True, 2),
    nb.Plan("chunks", 1, False, 1),
    nb.Plan("chunks", 3, False, 2),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "{}-{}-{}-{}t".format(
    p[0], p[1], "matvec" if p[2] else "tiles", p[3]))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (9, 1, 5, 19), (6, 4, 7, 33), (4, 3, 2, 48)],
                         ids=lambda s: "T{}B{}D{}H{}".format(*s))
def test_every_plan_matches_reference(monkeypatch, shape, plan, dtype):
    T, B, D, H = shape
    if plan.mode == "chunks":
        plan = plan._replace(n_workers=min(plan.n_workers, B))
    monkeypatch.setattr(nb, "_plan", lambda B, H, n_threads: plan)
    args = make_problem(T, B, D, H, dtype, seed=T * B + H)
    dy, dh_T, dc_T = make_upstream(T, B, H, dtype)
    y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="numba", return_cache=True)
    grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)
    assert_matches_reference((y, h_T, c_T), grads, *reference(args, dy, dh_T, dc_T), dtype)


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_split_hidden_is_bit_identical_to_one_thread(monkeypatch, n_threads, B):
    """Which thread computes a part never changes the arithmetic, so neither do the parts."""
    args = make_problem(30, B, 12, 70, np.float32, seed=5)
    dy, dh_T, dc_T = make_upstream(30, B, 70, np.float32)
    results = []
    for plan in [nb.Plan("split_hidden", 2, True, 1), nb.Plan("split_hidden", 2, True, 2),
                 nb.Plan("split_hidden", 3, True, 2)]:
        monkeypatch.setattr(nb, "_plan", lambda B, H, n, plan=plan: plan)
        fastlstm.set_num_threads(n_threads)
        try:
            y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="numba", return_cache=True)
            results.append((y, h_T, c_T) + tuple(fastlstm.lstm_backward(dy, cache, dh_T, dc_T)))
        finally:
            fastlstm.set_num_threads(None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_helping_threads_never_expose_partial_results(monkeypatch):
    """A duplicate of the step-0 part (the input projection, by BLAS, which writes its output
    through zeros and partial sums) ran while the other thread read it for step 1: at no
    patience, 3 wrong forward calls in 3000 at this shape before the fix."""
    args = make_problem(3, 1, 5, 19, np.float32, seed=3)
    monkeypatch.setattr(nb, "_plan", lambda B, H, n: nb.Plan("split_hidden", 2, True, 2))
    monkeypatch.setattr(nb, "PATIENCE_CYCLES", -(10**12))
    monkeypatch.setattr(nb, "PATIENCE_FACTOR", 0)
    first = fastlstm.lstm_forward(**args, backend="numba")
    wrong = 0
    for _ in range(6000):
        wrong += not all(np.array_equal(a, b)
                         for a, b in zip(fastlstm.lstm_forward(**args, backend="numba"), first))
    assert wrong == 0


def test_helping_with_every_part_gives_the_same_bits(monkeypatch):
    """With no patience every waiting thread recomputes parts the other thread may still be
    writing: the duplicates must write the same bits (step-unique storage, same code)."""
    args = make_problem(40, 1, 9, 50, np.float32, seed=11)
    dy, dh_T, dc_T = make_upstream(40, 1, 50, np.float32)
    monkeypatch.setattr(nb, "_plan", lambda B, H, n: nb.Plan("split_hidden", 2, True, 2))
    results = []
    for patience in (nb.PATIENCE_CYCLES, -(10**12)):
        monkeypatch.setattr(nb, "PATIENCE_CYCLES", patience)
        for _ in range(3):
            y, h_T, c_T, cache = fastlstm.lstm_forward(**args, backend="numba", return_cache=True)
            results.append((y, h_T, c_T) + tuple(fastlstm.lstm_backward(dy, cache, dh_T, dc_T)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def busy_backoff():
    """A back-off whose threads ran a moment ago, on a stopped clock (no idle rule)."""
    backoff = SoloBackoff(BACKOFF_FIRST, BACKOFF_MAX, clock=lambda: 0.0)
    backoff.note(2, False)
    return backoff


def test_planner_choices(monkeypatch):
    monkeypatch.setattr(nb, "_backoff", busy_backoff())
    assert nb._plan(1, 256, 2) == ("split_hidden", 2, True, 2)
    assert nb._plan(1, 256, 1) == ("split_hidden", 1, True, 1)
    assert nb._plan(1, 64, 2) == ("chunks", 1, False, 2)  # small H: a one-row tile
    assert nb._plan(2, 512, 2) == ("chunks", 2, True, 2)  # one row per thread: matvec
    assert nb._plan(4, 512, 2) == ("chunks", 2, False, 2)  # two rows per thread: tiles
    assert nb._plan(64, 512, 2) == ("chunks", 2, False, 2)
    assert nb._plan(3, 8, 4)[:2] == ("chunks", 3)


def test_absent_partner_backs_off_to_one_thread_for_a_while(monkeypatch):
    """Each absence in a row doubles the one-thread back-off (up to its cap); a shared call
    resets it; a one-thread call says nothing about the partner."""
    monkeypatch.setattr(nb, "_backoff", busy_backoff())
    plan = nb._plan(1, 256, 2)
    alone = plan._replace(n_threads=1)
    nb._note_partner(np.array([50, 50]), plan)
    assert nb._plan(1, 256, 2) == plan

    def back_off_after_absence():
        nb._note_partner(np.array([98, 2]), plan)
        plans = [nb._plan(1, 256, 2) for _ in range(BACKOFF_MAX + 1)]
        assert plans[-1] == plan
        return plans.index(plan)

    lengths = [back_off_after_absence() for _ in range(8)]
    assert lengths[0] == BACKOFF_FIRST
    assert all(b == min(2 * a, BACKOFF_MAX) for a, b in zip(lengths, lengths[1:]))
    assert lengths[-1] == BACKOFF_MAX
    nb._note_partner(np.array([100, 0]), alone)  # one thread by design, not absence
    assert nb._plan(1, 256, 2) == plan
    nb._note_partner(np.array([50, 50]), plan)
    assert back_off_after_absence() == BACKOFF_FIRST


def test_speed_rank_prefers_numba_over_the_reference():
    for shape in [(100, 1, 64, 128), (100, 1, 256, 256), (50, 32, 128, 256),
                  (100, 64, 512, 512), (20, 256, 256, 1024), (1, 1, 1, 1)]:
        assert nb.speed_rank(*shape) > 0


# --- threads ------------------------------------------------------------------------------

def test_numba_thread_count_is_restored():
    before = numba.get_num_threads()
    args = make_problem(5, 4, 3, 8, np.float32)
    fastlstm.set_num_threads(1)
    try:
        fastlstm.lstm_forward(**args, backend="numba")
    finally:
        fastlstm.set_num_threads(None)
    assert numba.get_num_threads() == before


def test_more_threads_than_numba_has_is_clamped():
    args = make_problem(4, 3, 3, 5, np.float64)
    fastlstm.set_num_threads(numba.config.NUMBA_NUM_THREADS + 3)
    try:
        y, _, _ = fastlstm.lstm_forward(**args, backend="numba")
    finally:
        fastlstm.set_num_threads(None)
    np.testing.assert_allclose(y, fastlstm.lstm_forward(**as_float64(args), backend="numpy")[0],
                               atol=1e-12)


# --- compile caching and specialisations ------------------------------------------------------

def dispatchers():
    return [v for v in vars(nb).values() if isinstance(v, numba.core.registry.CPUDispatcher)]


def test_every_kernel_caches_its_compilation():
    found = dispatchers()
    assert len(found) >= 10
    for dispatcher in found:
        assert type(dispatcher._cache).__name__ == "FunctionCache", dispatcher.py_func.__name__


def test_fresh_process_loads_kernels_from_the_cache():
    code = """
        import numpy as np, fastlstm
        from fastlstm._kernels import numba_backend as nb
        x = np.ones((4, 1, 3), np.float32)
        Wx, Wh, b = np.ones((3, 40), np.float32), np.ones((10, 40), np.float32), np.ones(40, np.float32)
        fastlstm.lstm_forward(x, Wx, Wh, b, backend="numba")
        d = nb._forward_batch_tiles  # the kernel of this shape (H < 128), with its tiles
        print(sum(d.stats.cache_misses.values()), sum(d.stats.cache_hits.values()))
    """
    run_in_fresh_process(code)  # fills the cache if it was empty
    misses, hits = map(int, run_in_fresh_process(code).split())
    assert misses == 0 and hits >= 1


def test_compiling_and_loading_processes_agree_bit_for_bit(tmp_path):
    """A process that compiles the kernels and later ones that load them from the cache give the
    same bits, forward and every gradient, in the split, the matrix-vector and the batch kernels
    (until `_fma`, float32 results differed in the last bits)."""
    code = """
        import hashlib, numpy as np, fastlstm
        rng = np.random.default_rng(0)
        digest = hashlib.sha256()
        for T, B, D, H in [(30, 1, 16, 130), (10, 2, 8, 130), (20, 9, 8, 40)]:
            x = rng.standard_normal((T, B, D)).astype(np.float32)
            Wx, Wh = ((0.1 * rng.standard_normal(s)).astype(np.float32)
                      for s in [(D, 4 * H), (H, 4 * H)])
            y, h_T, c_T, cache = fastlstm.lstm_forward(x, Wx, Wh, np.zeros(4 * H, np.float32),
                                                       backend="numba", return_cache=True)
            for a in (y, *fastlstm.lstm_backward(np.ones_like(y), cache)):
                digest.update(a.tobytes())
        print(digest.hexdigest())
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    compiled = run_python(code, env=env).stdout.split()[-1]
    assert any(tmp_path.rglob("*.nbi")), "the first process wrote no cache"
    loaded = [run_python(code, env=env).stdout.split()[-1] for _ in range(2)]
    assert loaded == [compiled, compiled]


def test_warm_up_reaches_every_kernel_the_api_runs():
    """After `warm_up`, a mix of public calls (every planner mode, both dtypes, one and two
    threads, lengths, layers, streaming steps) compiles or loads nothing more."""
    code = """
        import numpy as np, numba, fastlstm
        from fastlstm import LSTM
        from fastlstm._kernels import numba_backend as nb

        def signatures():
            return {name: set(d.signatures) for name, d in vars(nb).items()
                    if isinstance(d, numba.core.registry.CPUDispatcher)}

        nb.warm_up()
        warmed = signatures()
        rng = np.random.default_rng(0)
        for dtype in (np.float32, np.float64):
            for T, B, D, H in [(5, 1, 4, 130), (5, 1, 4, 20), (6, 2, 3, 256), (4, 3, 5, 17),
                               (700, 4, 3, 16), (3, 64, 8, 300)]:
                x = rng.standard_normal((T, B, D)).astype(dtype)
                Wx, Wh = (rng.standard_normal(s).astype(dtype) for s in [(D, 4 * H), (H, 4 * H)])
                b = np.zeros(4 * H, dtype)
                for n in (1, 2):
                    fastlstm.set_num_threads(n)
                    y, _, _, cache = fastlstm.lstm_forward(x, Wx, Wh, b, backend="numba",
                                                           return_cache=True)
                    fastlstm.lstm_backward(np.ones_like(y), cache)
            for config in (dict(), dict(num_layers=2, bidirectional=True)):
                layer = LSTM(6, 32, dtype=dtype, backend="numba", **config)
                x = rng.standard_normal((5, 4, 6)).astype(dtype)
                lengths = np.array([5, 3, 1, 0])
                layer(x, lengths=lengths)
                y, _, cache = layer.forward_train(x, lengths=lengths)
                layer.backward(np.ones_like(y), cache)
            for B, D, H in ((1, 6, 32), (32, 128, 256)):
                layer = LSTM(D, H, dtype=dtype, backend="numba")
                state = layer.initial_state(B)
                for _ in range(6):
                    layer.step(np.ones((B, D), dtype), state)
        new = {name: sorted(map(str, sigs - warmed[name]))
               for name, sigs in signatures().items() if sigs - warmed[name]}
        print(new)
    """
    assert run_in_fresh_process(code) == "{}"


def test_warm_command():
    out = run_python(["-m", "fastlstm", "warm"]).stdout
    assert "numba kernels compiled or loaded by" in out and "cached in" in out


def test_no_writable_cache_directory_leaves_the_backend_out():
    # Numba raises at the first cache=True kernel when it finds no writable directory.
    out = run_python("""
        import numba.core.caching as caching
        for locator in caching.CacheImpl._locator_classes:
            locator.from_function = classmethod(lambda cls, function, path: None)
        import numpy as np, fastlstm
        from fastlstm.__main__ import describe
        x, W = np.ones((3, 1, 2), np.float32), np.ones((2, 8), np.float32)
        fastlstm.lstm_forward(x, W, W, np.ones(8, np.float32))
        print(fastlstm.available_backends())
        print("\\n".join(describe()))
    """).stdout
    assert "'numba'" not in out.splitlines()[0]
    assert "numba: unavailable" in out and "NUMBA_CACHE_DIR" in out


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: "{}-{}-{}-{}t".format(
    p[0], p[1], "matvec" if p[2] else "tiles", p[3]))
def test_read_only_inputs_add_no_specialisation_and_no_copy(monkeypatch, plan):
    """Read-only inputs (the layer's weights) reach the kernels as they are: no new compile, no
    copy, and nothing written to them."""
    T, B, D, H = 6, 3 if plan.mode == "chunks" else 1, 4, 5
    monkeypatch.setattr(nb, "_plan", lambda B, H, n_threads: plan._replace(
        n_workers=min(plan.n_workers, B) if plan.mode == "chunks" else plan.n_workers))
    args = make_problem(T, B, D, H, np.float32, seed=2)
    dy, dh_T, dc_T = make_upstream(T, B, H, np.float32)

    def forward_backward(arrays, upstream):
        y, h_T, c_T, cache = fastlstm.lstm_forward(**arrays, backend="numba", return_cache=True)
        return (y, h_T, c_T) + tuple(fastlstm.lstm_backward(*upstream[:1], cache, *upstream[1:]))

    want = forward_backward(args, (dy, dh_T, dc_T))
    counts = {d.py_func.__name__: len(d.signatures) for d in dispatchers()}
    read_only = {name: a.copy() for name, a in args.items()}
    upstream = tuple(a.copy() for a in (dy, dh_T, dc_T))
    for a in list(read_only.values()) + list(upstream):
        a.flags.writeable = False
    got = forward_backward(read_only, upstream)
    assert {d.py_func.__name__: len(d.signatures) for d in dispatchers()} == counts
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    for name, a in read_only.items():
        np.testing.assert_array_equal(a, args[name], err_msg=name)
    _, _, _, cache = fastlstm.lstm_forward(**read_only, backend="numba", return_cache=True)
    x_rows, Wx, Wh = cache._data[:3]
    assert np.shares_memory(x_rows, read_only["x"])
    assert np.shares_memory(Wx, read_only["Wx"]) and np.shares_memory(Wh, read_only["Wh"])


# --- numerics through the whole kernel --------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_inputs_give_no_nan(dtype):
    args = make_problem(5, 2, 3, 20, dtype, seed=1, x_scale=1e4)
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend="numba")
    ref = fastlstm.lstm_forward(**as_float64(args), backend="numpy")
    assert np.isfinite(y).all()
    for got, want in zip((y, h_T, c_T), ref):
        np.testing.assert_allclose(got, want, atol=1e-5 if dtype == np.float32 else 1e-10)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_rows, any_length", [(0, False), (10**6, False), (64, True)],
                         ids=["blas", "tiles", "chunks"])
def test_weight_gradients_on_blas_and_on_tiles(monkeypatch, max_rows, any_length, dtype,
                                               n_threads):
    """Every way to the weight gradients (BLAS past TILED_GRADIENTS_MAX_ROWS rows, the tiles up
    to it, or the tiles in chunks of rows, here 3 of 50), forced, against the reference."""
    monkeypatch.setattr(nb, "TILED_GRADIENTS_MAX_ROWS", max_rows)
    monkeypatch.setattr(nb, "TILED_GRADIENTS_ANY_LENGTH", any_length)
    args = make_problem(30, 5, 7, 21, dtype, seed=4)
    dy, dh_T, dc_T = make_upstream(30, 5, 21, dtype)
    outputs, grads = run("numba", args, dy, dh_T, dc_T)
    assert_matches_reference(outputs, grads, *reference(args, dy, dh_T, dc_T), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B, D, H", [(1, 5, 37), (3, 16, 40), (7, 9, 33), (2, 3, 130)])
def test_step_kernel_matches_reference_on_one_thread_and_on_threads(monkeypatch, dtype, B, D,
                                                                     H, n_threads):
    """`STEP_KERNEL` steps against the float64 reference's sequence, and the threaded steps
    (units split over the threads) bit-identical to the one-thread steps."""
    T = 4
    args = make_problem(T, B, D, H, dtype=dtype)
    y_ref, _, c_ref = fastlstm.lstm_forward(**as_float64(args), backend="numpy")
    kernel = nb.STEP_KERNEL
    prepared = kernel.prepare(args["Wx"], args["Wh"], args["b"])
    outputs = []
    for threads_from in (2**62, 0):
        monkeypatch.setattr(nb, "STEP_THREADS_FROM", threads_from)
        buffers = kernel.new_buffers(prepared, args["h0"], args["c0"])
        assert buffers.threaded == (threads_from == 0)
        steps = []
        for t in range(T):
            kernel.step(prepared, buffers, args["x"][t])
            steps.append(buffers.h.copy())
        outputs.append((np.stack(steps), buffers.c.copy()))
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(outputs[0][0], y_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(outputs[0][1], c_ref, rtol=0, atol=tol)
    for one_thread, threaded in zip(outputs[0], outputs[1]):
        np.testing.assert_array_equal(one_thread, threaded)
