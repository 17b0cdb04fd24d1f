"""Cython backend: compiled kernels (no JIT start-up), OpenMP threads, AVX2 chosen at run time.

This module is the glue: it allocates outputs and scratch, packs the recurrent weights for the
small-batch kernels, holds BLAS to one thread while the kernels' own threads run (they call BLAS
on their share of the work, DESIGN.md §6) and calls `_lstm_cython`.
"""

from typing import NamedTuple

import numpy as np

from .. import _threads
from .._backends import Backend
from . import _lstm_cython

#: Largest batch whose time loops run the fused kernels over packed weights, the threads
#: splitting the hidden units; larger batches split their rows across the threads and call
#: gemm per step. Measured, float32, one thread, min ms (forward): (T, B, D, H) = (100, 4, 256,
#: 256) fused 5.5 vs gemm 12.2; (50, 32, 128, 256) 21 vs 18; (20, 256, 256, 1024) 932 vs 600.
MATVEC_MAX_BATCH = 16


class PackedWeights(NamedTuple):
    """Recurrent weights arranged for the small-batch kernels, made once by `pack`.

    Wh : the (H, 4H) array it was made from; packed : the arrangement (1-D, Wh's dtype).
    """

    Wh: np.ndarray
    packed: np.ndarray


def pack(Wh):
    """Arrange the recurrent weights Wh (H, 4H) for the small-batch forward kernel.

    A layer that keeps its weights between calls packs them once and passes the result as
    ``forward(..., packed=...)`` (with that same Wh array; pack again after changing Wh),
    otherwise every small-batch forward call packs them (S2: ~0.1 ms of the call's time).
    """
    Wh = np.ascontiguousarray(Wh)
    packed = np.empty(_lstm_cython.packed_size(Wh.shape[0], Wh.dtype.itemsize), Wh.dtype)
    _lstm_cython.pack_recurrent_weights(Wh, packed)
    return PackedWeights(Wh, packed)


def forward(x, Wx, Wh, b, h0, c0, *, need_cache, n_threads, packed=None):
    """Backend forward: see `fastlstm._backends.Backend`. ``packed`` is an optional `pack(Wh)`."""
    T, B, _ = x.shape
    H = Wh.shape[0]
    use_matvec = B <= MATVEC_MAX_BATCH
    if not use_matvec:
        packed_array = np.empty(0, x.dtype)
    elif packed is not None and packed.Wh is Wh:
        packed_array = packed.packed
    else:
        packed_array = pack(Wh).packed
    gates = np.empty((T, B, 4 * H), x.dtype)
    y = np.empty((T, B, H), x.dtype)
    if need_cache:
        c_store = np.empty((T, B, H), x.dtype)
        tanh_c = np.empty((T, B, H), x.dtype)
    else:
        c_store = c0.copy()[np.newaxis]
        tanh_c = np.empty((0, B, H), x.dtype)
    with _threads.blas_threads(1):
        _lstm_cython.forward(x, Wx, Wh, b, packed_array, h0, c0, gates, y, c_store, tanh_c,
                             use_matvec, n_threads)
    cache = (x, Wx, Wh, h0, c0, y, gates, c_store, tanh_c) if need_cache else None
    return y, y[-1].copy(), c_store[-1].copy(), cache


def backward(dy, dh_T, dc_T, cache, *, n_threads):
    """Backend backward: see `fastlstm._backends.Backend`."""
    x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c = cache
    T, B, _ = x.shape
    da = np.empty_like(gates)
    dh = dh_T.copy()
    dc = dc_T.copy()
    dx = np.empty_like(x)
    dWx = np.empty_like(Wx)
    dWh = np.empty_like(Wh)
    db = np.empty(Wh.shape[1], x.dtype)
    with _threads.blas_threads(1):
        _lstm_cython.backward(dy, x, Wx, Wh, h0, c0, y, gates, c_all, tanh_c, da, dh, dc, dx,
                              dWx, dWh, db, B <= MATVEC_MAX_BATCH, n_threads)
    return dx, dh, dc, dWx, dWh, db


def cells_from_cache(cache, c_T):
    """Cell state c_t at every step, (T, B, H), from a forward cache (for `LSTM` return_cells)."""
    return cache[7]


def speed_rank(T, B, D, H):
    """Preference for backend=None (higher wins; numba's backend ranks 1, the reference 0).

    Measured side by side (float32, 2 threads, median ms, each backend in its own process,
    shared 2-core machine): at B = 1 this backend was faster, forward S1 0.29 vs numba 0.38 and
    forward+backward S1 0.67 vs 2.07, S2 4.0 vs 8.5; at B >= 32 numba's forward was faster
    (S3 11.0 vs 14, S5 319 vs 506) and forward+backward was mixed (S3 38 vs 44, S4 983 vs 544,
    S5 1004 vs 1157). So: first choice for the small batches of the fused kernels only.
    """
    return 2.0 if B <= MATVEC_MAX_BATCH else 0.9


BACKEND = Backend("cython", forward, backward, speed_rank)
