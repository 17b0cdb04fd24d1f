"""Cython backend: compiled kernels (no JIT start-up), OpenMP threads, AVX2 or AVX-512 chosen at
run time.

This module is the glue: it allocates outputs and scratch, has the weights packed ([Wx; Wh; b]
for the batch forward, Wx and Wh for the small-batch forward: once per `PreparedWeights`, or at
every call, the small-batch forward kernel then packing them itself; Wh.T by the backward
kernel at every call), holds BLAS to one thread while the backward's threads run (they call
BLAS on their share of the work, DESIGN.md §6) and calls `_lstm_cython`.
"""

from typing import NamedTuple

import numpy as np

from .. import _threads
from .._backends import Backend, state_at_lengths
from .._scratch import aligned_copy, aligned_empty, recycled, scratch
from .._step import StepKernel
from . import _lstm_cython

#: Fewest batch rows per thread for the batch time loops (threads split the batch rows; tiles of
#: up to 6 rows over the packed weights); smaller batches run the small-batch loops (threads split
#: the hidden units, a barrier per step). A thread's tile needs 4 rows (8 accumulators) to hide the
#: FMA latency. Measured, float32, (T, D, H) = (50, 256, 256), one thread, median CPU ms,
#: matvec vs tiles: forward B=2 1.61 vs 1.73, B=4 2.96 vs 2.57, B=16 13.4 vs 9.8, B=32 23.0 vs
#: 19.7; forward+backward B=2 5.4 vs 4.9, B=4 9.7 vs 7.6, B=16 40.9 vs 28.0. (Two threads on
#: the loaded machine: tiles never slower, B=16 forward 27 vs 16 ms.)
MIN_ROWS_PER_THREAD = 4


#: Most bytes of pre-activations (T·B·4H values) a small-batch inference call (no cache) keeps at
#: once: longer sequences run in chunks of time steps, each chunk's input projection at once. A
#: fresh array above glibc's mmap threshold (32 MiB) is page-faulted in at every call (84 MB:
#: 6.3 ms). (The batch loop keeps no such array: it multiplies x_t within each step.)
INFERENCE_GATES_BYTES = 16 << 20


#: When the small-batch loops and the threaded steps run on one thread (`_threads.SoloBackoff`).
_backoff = _threads.SoloBackoff(_threads.BACKOFF_FIRST, _threads.BACKOFF_MAX)


def use_matvec(B, n_threads):
    """Whether a batch of B rows runs the small-batch time loops (threads split the hidden units)
    on n_threads threads."""
    return B < MIN_ROWS_PER_THREAD * n_threads


def _arranged(name, size, dtype, fill, prepared):
    """Packed weights: ``fill(out)`` writes them into ``out`` (1-D, ``size`` values). Made once
    and kept in ``prepared`` (a `PreparedWeights`), or, without one, into this thread's scratch
    for this call. Keyed by the kernel build's units per block, on which the layout depends.

    Packing is a pass over the weights; made at every call it cost, paired against the same
    call on weights packed before (float32): 2 threads S1 forward 1.04x, S2 1.11x, T = 10 at
    S2's size 1.23x; one thread S1 1.07x, S2 1.10x.
    """
    if prepared is None:
        out = scratch(name, (size,), dtype)
        fill(out)
        return out
    key = (name, _lstm_cython.units_per_block(dtype.itemsize))
    out = prepared.get(key)
    if out is None:
        out = aligned_empty((size,), dtype)
        fill(out)
        out = prepared.keep(key, out)
    return out


def recurrent_weights(Wh, n_threads, prepared=None):
    """Wh (H, 4H) packed for the small-batch forward kernels (`_lstm_cython.forward`)."""
    H = Wh.shape[0]
    return _arranged("cython/recurrent", _lstm_cython.packed_size(H, H, Wh.itemsize), Wh.dtype,
                     lambda out: _lstm_cython.pack_recurrent_weights(Wh, out, n_threads),
                     prepared)


def input_weights(Wx, n_threads, prepared=None):
    """Wx (D, 4H) packed for the small-batch forward kernels' input projection
    (`_lstm_cython.forward`)."""
    D, H = Wx.shape[0], Wx.shape[1] // 4
    return _arranged("cython/input", _lstm_cython.packed_size(D, H, Wx.itemsize), Wx.dtype,
                     lambda out: _lstm_cython.pack_input_weights(Wx, out, n_threads), prepared)


def stacked_weights(Wx, Wh, b, n_threads, prepared=None):
    """[Wx; Wh; b] (D + H + 1 rows of 4H) packed for the batch forward kernels
    (`_lstm_cython.forward_stacked`)."""
    K, H = Wx.shape[0] + Wh.shape[0] + 1, Wh.shape[0]
    return _arranged("cython/stacked", _lstm_cython.packed_size(K, H, Wx.itemsize), Wx.dtype,
                     lambda out: _lstm_cython.pack_stacked_weights(Wx, Wh, b, out, n_threads),
                     prepared)


def forward(x, Wx, Wh, b, h0, c0, *, need_cache, n_threads, lengths=None, prepared=None):
    """Backend forward: see `fastlstm._backends.Backend`.

    With ``lengths`` and no cache, the time loop copies each row's cell state at its last step,
    instead of keeping every step's cell state.
    """
    _threads.note_started(_threads.OPENMP_TEAM, n_threads)
    T, B, _ = x.shape
    H = Wh.shape[0]
    y = recycled((T, B, H), x.dtype)
    if need_cache:
        gates = recycled((T, B, 4 * H), x.dtype)
        c_store = recycled((T, B, H), x.dtype)
        tanh_c = recycled((T, B, H), x.dtype)
        c_last = None
    else:
        # c0 on entry, the latest cell state after each call
        c_store = aligned_copy(c0)[np.newaxis]
        tanh_c = np.empty((0, B, H), x.dtype)
        # With lengths, the time loop copies each row's cell state at its last step into c_last
        # (one compare per row and step); rows of length 0 keep c0.
        c_last = None if lengths is None else aligned_copy(c0)
    if use_matvec(B, n_threads):
        _forward_small_batch(x, Wx, Wh, b, h0, c0, y, c_store, tanh_c, c_last,
                             gates if need_cache else None, lengths, n_threads, prepared)
    else:
        _forward_batch(x, Wx, Wh, b, h0, c0, y, c_store, tanh_c, c_last,
                       gates if need_cache else None, lengths, n_threads, prepared)
    if not need_cache:
        if lengths is None:
            return y, y[-1].copy(), c_store[-1].copy(), None
        return y, state_at_lengths(y, h0, lengths), c_last, None
    cache = (x, Wx, Wh, h0, c0, y, gates, c_store, tanh_c)
    if lengths is None:
        return y, y[-1].copy(), c_store[-1].copy(), cache
    return y, state_at_lengths(y, h0, lengths), state_at_lengths(c_store, c0, lengths), cache


def _forward_batch(x, Wx, Wh, b, h0, c0, y, c_store, tanh_c, c_last, gates, lengths, n_threads,
                   prepared):
    """Threads split the rows; each step is one product [x_t, h, 1] @ [Wx; Wh; b] by register
    tiles over the stacked weights (`stacked_weights`). Against the input projection as one
    GEMM before the loop plus h @ Wh per step: one thread, S3 forward 14.6-14.9 vs 15.0-16.2
    ms; 2 threads, S5 291 vs 300 ms, S3 level. (``gates`` None: no history, a one-step
    scratch.)"""
    T, B, D = x.shape
    H = Wh.shape[0]
    packed = stacked_weights(Wx, Wh, b, n_threads, prepared)
    xh = scratch("cython/xh", (B, D + H + 1), x.dtype)
    if gates is None:
        gates = scratch("cython/gates", (1, B, 4 * H), x.dtype)
    _lstm_cython.forward_stacked(x, packed, h0, c0, xh, gates, y, c_store, tanh_c, n_threads,
                                 None if c_last is None else lengths - 1, c_last)


def _forward_small_batch(x, Wx, Wh, b, h0, c0, y, c_store, tanh_c, c_last, gates, lengths,
                         n_threads, prepared):
    """Threads split the hidden units, each projecting the input onto its own units and then
    running the time loop, a barrier a step; or one thread, where `_backoff` says so. (``gates``
    None: no history; the projection then runs in chunks of steps holding at most
    INFERENCE_GATES_BYTES.)"""
    T, B, D = x.shape
    H = Wh.shape[0]
    n_threads = _backoff.threads(n_threads)
    if prepared is None:
        # the first kernel call packs the weights into these, in its own parallel region
        packed_x = scratch("cython/input", (_lstm_cython.packed_size(D, H, x.itemsize),), x.dtype)
        packed = scratch("cython/recurrent", (_lstm_cython.packed_size(H, H, x.itemsize),),
                         x.dtype)
        to_pack = (Wx, Wh)
    else:
        packed_x = input_weights(Wx, n_threads, prepared)
        packed = recurrent_weights(Wh, n_threads, prepared)
        to_pack = (None, None)
    if gates is not None:
        went_solo = _lstm_cython.forward(x, packed_x, b, packed, h0, c0, gates, y, c_store,
                                         tanh_c, n_threads, None, None, *to_pack)
        _backoff.note(n_threads, went_solo)
        return
    chunk = max(1, min(T, INFERENCE_GATES_BYTES // (B * 4 * H * x.itemsize)))
    gates = scratch("cython/gates", (chunk, B, 4 * H), x.dtype)
    went_solo = False
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        h_prev = h0 if t0 == 0 else y[t0 - 1]
        # last steps outside this chunk match none of its steps
        went_solo |= _lstm_cython.forward(x[t0:t1], packed_x, b, packed, h_prev, c0,
                                          gates[: t1 - t0], y[t0:t1], c_store, tanh_c,
                                          n_threads, None if lengths is None else lengths - 1 - t0,
                                          c_last, *to_pack)
        to_pack = (None, None)
    _backoff.note(n_threads, went_solo)


def backward(dy, dh_T, dc_T, cache, *, n_threads, need_dx=True):
    """Backend backward: see `fastlstm._backends.Backend`."""
    _threads.note_started(_threads.OPENMP_TEAM, n_threads)
    x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c = cache
    T, B, _ = x.shape
    da = scratch("cython/da", gates.shape, gates.dtype)
    dh = dh_T.copy()
    dc = dc_T.copy()
    dx = recycled(x.shape, x.dtype) if need_dx else None
    dWx = recycled(Wx.shape, x.dtype)
    dWh = recycled(Wh.shape, x.dtype)
    db = np.empty(Wh.shape[1], x.dtype)
    matvec = use_matvec(B, n_threads)
    if matvec:
        n_threads = _backoff.threads(n_threads)
    # the kernel arranges Wh.T in this
    packed_t = scratch("cython/transposed",
                        (_lstm_cython.packed_transposed_size(Wh.shape[0], x.itemsize),), x.dtype)
    scratch_size = _lstm_cython.tiled_gradients_size(T, B, x.shape[2], Wh.shape[0], x.itemsize,
                                                      n_threads)
    gradients_scratch = (scratch("cython/gradients", (scratch_size,), x.dtype) if scratch_size
                         else None)
    with _threads.blas_threads(1):
        went_solo = _lstm_cython.backward(dy, x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c, da, dh,
                                          dc, dx, dWx, dWh, db, packed_t, matvec, n_threads,
                                          gradients_scratch)
    if matvec:
        _backoff.note(n_threads, went_solo)
    return dx, dh, dc, dWx, dWh, db


def cells_from_cache(cache, c_T):
    """Cell state c_t at every step, (T, B, H), from a forward cache (for `LSTM` return_cells)."""
    return cache[7]


def speed_rank(T, B, D, H):
    """Preference for backend=None (higher wins; numba's backend ranks 1, the reference 0).

    Measured side by side against the numba branch's backend (f32ccd1) in one process (float32,
    median ms; one thread in CPU time, the machine being shared): forward S3 15.8 vs numba 18.6,
    S4 278 vs 310, S5 595 vs 574, S1 0.44 vs 0.40, S2 2.08 vs 1.93; forward+backward S1 1.06 vs
    1.10, S2 5.8 vs 5.7, S3 44.5 vs 56.1, S4 844 vs 931, S5 1718 vs 1818. Two threads (wall
    time, loaded): forward S3 24 vs 32, S4 298 vs 352; forward+backward S1 1.09 vs 1.34, S2 3.2
    vs 5.0, S3 26 vs 39, S4 699 vs 960. So: first choice at every shape.
    """
    return 2.0


BACKEND = Backend("cython", forward, backward, speed_rank)


# ---- streaming step (`fastlstm.LSTM.step`) ----------------------------------------------------

#: Smallest step, in bytes of multiply-adds (B·(D + H + 1)·4H·itemsize: at B = 1 the weights it
#: streams), that runs on fastlstm's threads; smaller steps run on the calling thread. A parallel
#: region costs ~1 µs, and its idle threads spin on the other core for a while after each step.
#: Measured, 2 threads vs 1, B = 1, median µs per step (back to back, so the threads were
#: awake): float32 (D, H) = (64, 96) 3.5 vs 3.3 (0.25 MB), (64, 128) 4.3 vs 4.9 (0.4 MB),
#: (128, 128) 5.0 vs 6.1 (0.53 MB), (160, 192) 8.2 vs 13.7; float64 (64, 96) 5.2 vs 6.2 (0.49 MB),
#: (64, 128) 7.5 vs 9.5. So threads from about 1.2x.
STEP_THREADS_FROM = 1 << 19


class StepWeights(NamedTuple):
    """One layer's weights for the step kernel: [Wx; Wh; b] (K = D + H + 1 rows, 4H columns)
    arranged by `_lstm_cython.pack_stacked_weights` under a build of ``units`` units per block."""

    packed: np.ndarray
    units: int
    K: int
    H: int


def _step_prepare(Wx, Wh, b):
    K, H = Wx.shape[0] + Wh.shape[0] + 1, Wh.shape[0]
    packed = aligned_empty((_lstm_cython.packed_size(K, H, Wx.itemsize),), Wx.dtype)
    _lstm_cython.pack_stacked_weights(np.ascontiguousarray(Wx), np.ascontiguousarray(Wh),
                                      np.ascontiguousarray(b), packed)
    packed.setflags(write=False)
    return StepWeights(packed, _lstm_cython.units_per_block(Wx.itemsize), K, H)


class _StepBuffers:
    """One stream's buffers: the states h, c (B, H) and the kernel's scratch xh (B, K) = [x_t,
    h, 1] and gates (B, 4H). ``threaded``: whether its steps are large enough for threads."""

    __slots__ = ("h", "c", "xh", "gates", "threaded")

    def __init__(self, prepared, h0, c0):
        B, H = h0.shape
        dtype = prepared.packed.dtype
        self.h = aligned_copy(np.asarray(h0, dtype))
        self.c = aligned_copy(np.asarray(c0, dtype))
        self.xh = aligned_empty((B, prepared.K), dtype)
        self.gates = aligned_empty((B, 4 * H), dtype)
        self.threaded = B * prepared.K * 4 * H * dtype.itemsize >= STEP_THREADS_FROM


def _step(prepared, buffers, x_t):
    """h, c <- LSTM step of (x_t, h, c): one stacked product by register tiles over the packed
    weights, each block of hidden units' cell update right after its gates. (OpenBLAS sgemm
    packs the weights at every call; its product alone, float32, against these whole steps:
    1 thread 1.1-1.5x slower at S3-S5, 1.5-4.7x at B <= 16; 2 threads 1.2-3.9x slower at
    S1-S5, where the tiles match or beat torch's LSTMCell.)"""
    n_threads = _backoff.threads(_threads.get_num_threads()) if buffers.threaded else 1
    if n_threads > 1:
        _threads.note_started(_threads.OPENMP_TEAM, n_threads)
    _lstm_cython.stacked_step(x_t, prepared.packed, prepared.units, buffers.xh, buffers.gates,
                              buffers.h, buffers.c, n_threads)
    if buffers.threaded:
        _backoff.note(n_threads)


STEP_KERNEL = StepKernel(_step_prepare, _StepBuffers, _step)
