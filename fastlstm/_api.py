"""Public LSTM functions: validate, resolve backend and threads, allocate, dispatch."""

from typing import NamedTuple

import numpy as np

from . import _backends, _threads
from ._validation import check_backward_args, check_forward_args


class LSTMGrads(NamedTuple):
    """Gradients of the loss with respect to every input of `lstm_forward`.

    dx : (T, B, D), dh0 : (B, H), dc0 : (B, H), dWx : (D, 4H), dWh : (H, 4H), db : (4H,).
    """

    dx: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray
    dWx: np.ndarray
    dWh: np.ndarray
    db: np.ndarray


class LSTMCache:
    """What `lstm_backward` needs from a forward call; opaque to users.

    It keeps references to the forward call's inputs: modifying them before the backward
    call changes the gradients. The y it returned is read-only for the same reason.

    Attributes
    ----------
    backend : str, the backend that ran the forward call (and will run the backward call).
    shape : (T, B, D, H).
    dtype : numpy.dtype of the call.
    """

    __slots__ = ("backend", "shape", "dtype", "_data")

    def __init__(self, backend, shape, dtype, data):
        self.backend = backend
        self.shape = shape
        self.dtype = dtype
        self._data = data

    def __repr__(self):
        T, B, D, H = self.shape
        return f"LSTMCache(backend={self.backend!r}, T={T}, B={B}, D={D}, H={H}, dtype={self.dtype})"


def _resolve_backend(backend, shape):
    chosen = _backends.get_backend(backend, shape)
    T, B, _, _ = shape
    if T == 0 or B == 0:
        # Empty sequences and batches have nothing to compute; the reference handles every
        # such edge exactly, so compiled kernels never see them.
        return _backends.get_backend("numpy", shape)
    return chosen


def lstm_forward(x, Wx, Wh, b, h0=None, c0=None, *, backend=None, return_cache=False):
    """Run a one-layer LSTM over a time-major sequence.

    ``a_t = x_t @ Wx + h_{t-1} @ Wh + b`` split into gates i, f, o, g (in that order);
    ``c_t = σ(a_f) ⊙ c_{t-1} + σ(a_i) ⊙ tanh(a_g)``, ``h_t = σ(a_o) ⊙ tanh(c_t)``.

    Parameters
    ----------
    x : ndarray, shape (T, B, D)
        Input sequence, time-major.
    Wx : ndarray, shape (D, 4H)
        Input weights, gate blocks i, f, o, g along the last axis.
    Wh : ndarray, shape (H, 4H)
        Recurrent weights, same gate order.
    b : ndarray, shape (4H,)
        Bias.
    h0, c0 : ndarray, shape (B, H), optional
        Initial hidden and cell state; None means zeros.
    backend : {None, "numpy", "numba", "cython"}
        None picks the fastest available backend for this shape.
    return_cache : bool
        Also return the cache that `lstm_backward` needs.

    Returns
    -------
    y : ndarray, shape (T, B, H)
        Hidden state at every step.
    h_T, c_T : ndarray, shape (B, H)
        Final hidden and cell state.
    cache : LSTMCache
        Only with ``return_cache=True``.

    All arrays share one dtype, float32 or float64, which the outputs keep. Inputs are never
    modified. With ``return_cache=True``, y is read-only: the compiled backends' cache holds
    it as the h_{t-1} that `lstm_backward` reads, so changing it in place would change the
    gradients (``y.copy()`` gives an array to change).

    The compiled backends pack the weights for their kernels at every call; repeated inference
    with the same weights is faster through `fastlstm.LSTM`, which keeps them packed.
    """
    outputs = forward_padded(x, Wx, Wh, b, h0, c0, backend=backend, return_cache=return_cache)
    if return_cache:
        y, h_T, c_T, cache = outputs
        return read_only_view(y), h_T, c_T, cache
    return outputs


def read_only_view(array):
    """A view of ``array`` that cannot be written through."""
    view = array.view()
    view.setflags(write=False)
    return view


def forward_padded(x, Wx, Wh, b, h0=None, c0=None, *, backend=None, return_cache=False,
                   lengths=None, prepared=None):
    """`lstm_forward` plus ``lengths`` and ``prepared`` (for `fastlstm.LSTM`; not public API).

    lengths : intp ndarray, shape (B,), values in [0, T], already validated, or None.
        y covers all T steps of every row, but h_T and c_T are each row's states after its
        first lengths[row] steps (h0, c0 where it is 0), read by the backend without keeping
        every step's state.
    prepared : `fastlstm._backends.PreparedWeights` of these Wx, Wh, b (C-contiguous), or None.
        Keeps the backend's arrangements of the weights for the caller's next calls.
    """
    shape, dtype = check_forward_args(x, Wx, Wh, b, h0, c0)
    if prepared is not None and not prepared.holds(Wx, Wh, b):
        raise ValueError("prepared must hold these same Wx, Wh and b arrays")
    chosen = _resolve_backend(backend, shape)
    _, B, _, H = shape
    h0 = np.zeros((B, H), dtype) if h0 is None else np.ascontiguousarray(h0)
    c0 = np.zeros((B, H), dtype) if c0 is None else np.ascontiguousarray(c0)
    y, h_T, c_T, data = chosen.forward(
        np.ascontiguousarray(x),
        np.ascontiguousarray(Wx),
        np.ascontiguousarray(Wh),
        np.ascontiguousarray(b),
        h0,
        c0,
        need_cache=bool(return_cache),
        n_threads=_threads.get_num_threads(),
        lengths=lengths,
        prepared=prepared,
    )
    if return_cache:
        return y, h_T, c_T, LSTMCache(chosen.name, shape, dtype, data)
    return y, h_T, c_T


def lstm_backward(dy, cache, dh_T=None, dc_T=None):
    """Backpropagation through time for a forward call made with ``return_cache=True``.

    Parameters
    ----------
    dy : ndarray, shape (T, B, H)
        Gradient of the loss with respect to ``y``.
    cache : LSTMCache
        From ``lstm_forward(..., return_cache=True)``; its backend runs the backward pass.
    dh_T, dc_T : ndarray, shape (B, H), optional
        Gradient with respect to the final states; None means zeros.

    Returns
    -------
    LSTMGrads
        ``(dx, dh0, dc0, dWx, dWh, db)``, each shaped and typed like its forward input.
    """
    return backward_grads(dy, cache, dh_T, dc_T)


def backward_grads(dy, cache, dh_T=None, dc_T=None, *, need_dx=True):
    """`lstm_backward` plus ``need_dx`` (for `fastlstm.LSTM`; not public API): with False, the
    input gradient is not computed and ``dx`` is None (a first layer's caller needs none).
    """
    if not isinstance(cache, LSTMCache):
        raise TypeError(
            "cache must be the LSTMCache returned by lstm_forward(..., return_cache=True), "
            f"got {type(cache).__name__}"
        )
    check_backward_args(dy, dh_T, dc_T, cache.shape, cache.dtype)
    _, B, _, H = cache.shape
    dh_T = np.zeros((B, H), cache.dtype) if dh_T is None else np.ascontiguousarray(dh_T)
    dc_T = np.zeros((B, H), cache.dtype) if dc_T is None else np.ascontiguousarray(dc_T)
    chosen = _backends.get_backend(cache.backend, cache.shape)
    grads = chosen.backward(
        np.ascontiguousarray(dy), dh_T, dc_T, cache._data, n_threads=_threads.get_num_threads(),
        need_dx=need_dx,
    )
    return LSTMGrads(*grads)
