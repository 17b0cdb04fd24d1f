"""Naive NumPy reference LSTM: the specification every other backend is tested against.

It is deliberately the plain per-step loop a user would write, one step forward and one
step backward that mirror the equations of DESIGN.md §1. Do not optimise it: it is also
the baseline that every benchmark compares against.

Gate blocks along the 4H axis are ordered i, f, o, g.
"""

import numpy as np

from .._backends import Backend
from .._threads import blas_threads


def sigmoid(a):
    """Logistic function 1 / (1 + exp(-a)), elementwise.

    ``exp(-a)`` overflows to inf for very negative ``a``; the result 1/inf = 0 is the correct
    limit, so the overflow warning is silenced rather than the formula changed.
    """
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-a))


def lstm_step_forward(x_t, h_prev, c_prev, Wx, Wh, b):
    """One LSTM time step.

    Parameters
    ----------
    x_t : (B, D) input at this step.
    h_prev, c_prev : (B, H) hidden and cell state of the previous step.
    Wx : (D, 4H), Wh : (H, 4H), b : (4H,) weights, gate blocks ordered i, f, o, g.

    Returns
    -------
    h, c : (B, H) new hidden and cell state.
    step_cache : tuple of what `lstm_step_backward` needs.
    """
    H = h_prev.shape[1]
    a = x_t @ Wx + h_prev @ Wh + b
    i = sigmoid(a[:, 0:H])
    f = sigmoid(a[:, H : 2 * H])
    o = sigmoid(a[:, 2 * H : 3 * H])
    g = np.tanh(a[:, 3 * H : 4 * H])
    c = f * c_prev + i * g
    tanh_c = np.tanh(c)
    h = o * tanh_c
    step_cache = (x_t, h_prev, c_prev, i, f, o, g, tanh_c)
    return h, c, step_cache


def lstm_step_backward(dh, dc, step_cache, Wx, Wh):
    """Backward pass of one LSTM time step.

    Parameters
    ----------
    dh, dc : (B, H) gradient of the loss with respect to this step's h and c
        (everything that flows into them: the output at this step and the next step).
    step_cache : tuple from `lstm_step_forward`.
    Wx : (D, 4H), Wh : (H, 4H) weights.

    Returns
    -------
    dx_t : (B, D), dh_prev : (B, H), dc_prev : (B, H),
    dWx : (D, 4H), dWh : (H, 4H), db : (4H,) contributions of this step.
    """
    x_t, h_prev, c_prev, i, f, o, g, tanh_c = step_cache
    do = dh * tanh_c
    dc = dc + dh * o * (1.0 - tanh_c**2)
    di = dc * g
    df = dc * c_prev
    dg = dc * i
    dc_prev = dc * f
    da = np.concatenate(
        [di * i * (1.0 - i), df * f * (1.0 - f), do * o * (1.0 - o), dg * (1.0 - g**2)],
        axis=1,
    )
    dx_t = da @ Wx.T
    dh_prev = da @ Wh.T
    dWx = x_t.T @ da
    dWh = h_prev.T @ da
    db = da.sum(axis=0)
    return dx_t, dh_prev, dc_prev, dWx, dWh, db


def forward(x, Wx, Wh, b, h0, c0, *, need_cache, n_threads, lengths=None, prepared=None):
    """Run the LSTM over a sequence.

    x : (T, B, D); Wx : (D, 4H); Wh : (H, 4H); b : (4H,); h0, c0 : (B, H).
    Returns y : (T, B, H), h_T : (B, H), c_T : (B, H) and the list of step caches
    (None unless ``need_cache``). ``n_threads`` is enforced on NumPy's BLAS by `_on_blas_threads`.
    With ``lengths`` (B,), h_T and c_T are each row's states after its first lengths[b] steps.
    ``prepared`` is unused: the reference reads the weights as they are.
    """
    T, B, _ = x.shape
    H = Wh.shape[0]
    y = np.empty((T, B, H), dtype=x.dtype)
    h, c = h0, c0
    h_T, c_T = h0.copy(), c0.copy()
    step_caches = []
    for t in range(T):
        h, c, step_cache = lstm_step_forward(x[t], h, c, Wx, Wh, b)
        y[t] = h
        if need_cache:
            step_caches.append(step_cache)
        if lengths is not None:
            ending = lengths == t + 1
            h_T[ending] = h[ending]
            c_T[ending] = c[ending]
    if lengths is None:
        h_T, c_T = h.copy(), c.copy()
    return y, h_T, c_T, (step_caches, Wx, Wh) if need_cache else None


def backward(dy, dh_T, dc_T, cache, *, n_threads, need_dx=True):
    """Backpropagation through time over the whole sequence.

    dy : (T, B, H) upstream gradient of y; dh_T, dc_T : (B, H) of the final states.
    Returns dx : (T, B, D) (None without ``need_dx``; the steps compute it anyway), dh0 : (B, H),
    dc0 : (B, H), dWx : (D, 4H), dWh : (H, 4H), db : (4H,).
    """
    step_caches, Wx, Wh = cache
    T, B, H = dy.shape
    dx = np.empty((T, B, Wx.shape[0]), dtype=dy.dtype)
    dWx = np.zeros_like(Wx)
    dWh = np.zeros_like(Wh)
    db = np.zeros(Wh.shape[1], dtype=dy.dtype)
    dh_next, dc_next = dh_T, dc_T
    for t in reversed(range(T)):
        dx[t], dh_next, dc_next, dWx_t, dWh_t, db_t = lstm_step_backward(
            dy[t] + dh_next, dc_next, step_caches[t], Wx, Wh
        )
        dWx += dWx_t
        dWh += dWh_t
        db += db_t
    return dx if need_dx else None, dh_next.copy(), dc_next.copy(), dWx, dWh, db


def cells_from_cache(cache, c_T):
    """Cell state c_t at every step, (T, B, H): step t+1's cache keeps c_t as its c_prev."""
    step_caches = cache[0]
    if not step_caches:
        return np.empty((0,) + c_T.shape, c_T.dtype)
    return np.stack([step_cache[2] for step_cache in step_caches[1:]] + [c_T])


def speed_rank(T, B, D, H):
    """The reference is never the fastest choice."""
    return 0


def _on_blas_threads(run):
    """``run`` with NumPy's BLAS, where the reference spends its time, on the call's threads."""

    def call(*args, n_threads, **kwargs):
        with blas_threads(n_threads):
            return run(*args, n_threads=n_threads, **kwargs)

    return call


BACKEND = Backend("numpy", _on_blas_threads(forward), _on_blas_threads(backward), speed_rank)
