"""Random LSTM problems for the tests, initialised like PyTorch (uniform ±1/√H)."""

import numpy as np

#: Relative errors of the reference gradients against finite differences, for the summary.
FINITE_DIFFERENCE_ERRORS = []


def make_problem(T, B, D, H, dtype=np.float64, seed=0, with_state=True, x_scale=1.0):
    """Return a dict of forward arguments (x, Wx, Wh, b, h0, c0) of the given dtype.

    With ``with_state=False`` h0 and c0 are None (zeros).
    """
    rng = np.random.default_rng(seed)
    k = 1.0 / np.sqrt(H)
    args = {
        "x": x_scale * rng.standard_normal((T, B, D)),
        "Wx": rng.uniform(-k, k, (D, 4 * H)),
        "Wh": rng.uniform(-k, k, (H, 4 * H)),
        "b": rng.uniform(-k, k, 4 * H),
        "h0": rng.uniform(-0.5, 0.5, (B, H)) if with_state else None,
        "c0": rng.uniform(-1.0, 1.0, (B, H)) if with_state else None,
    }
    return {name: None if a is None else a.astype(dtype) for name, a in args.items()}


def make_upstream(T, B, H, dtype=np.float64, seed=1, final_grads=True):
    """Return (dy, dh_T, dc_T) of the given dtype; dh_T and dc_T are None without final_grads."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    if not final_grads:
        return dy, None, None
    return dy, rng.standard_normal((B, H)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)


def as_float64(args):
    """The same problem, every array cast to float64 (the reference's precision)."""
    return {name: None if a is None else a.astype(np.float64) for name, a in args.items()}
