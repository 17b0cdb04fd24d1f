"""The reference's BPTT gradients against central finite differences in float64.

This is what makes the reference the specification: every backend's gradients are then
compared with the reference's.
"""

import numpy as np
import pytest

import fastlstm
from lstm_data import FINITE_DIFFERENCE_ERRORS, make_problem, make_upstream

FD_STEP = 1e-6
FD_TOLERANCE = 1e-6
SHAPES = [  # (T, B, D, H): unit sizes, odd sizes, and a few steps
    (1, 1, 1, 1),
    (1, 2, 3, 2),
    (3, 1, 2, 3),
    (4, 3, 1, 5),
    (5, 2, 3, 1),
    (3, 2, 5, 7),
]

def loss(args, dy, dh_T, dc_T):
    """Scalar whose gradient with respect to (y, h_T, c_T) is (dy, dh_T, dc_T)."""
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend="numpy")
    total = np.sum(dy * y)
    if dh_T is not None:
        total += np.sum(dh_T * h_T) + np.sum(dc_T * c_T)
    return total


def numerical_gradient(args, name, dy, dh_T, dc_T):
    """Central differences of `loss` with respect to every element of ``args[name]``."""
    array = args[name]
    grad = np.empty_like(array)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + FD_STEP
        plus = loss(args, dy, dh_T, dc_T)
        array[index] = original - FD_STEP
        minus = loss(args, dy, dh_T, dc_T)
        array[index] = original
        grad[index] = (plus - minus) / (2 * FD_STEP)
    return grad


@pytest.mark.parametrize("final_grads", [False, True], ids=["dy-only", "with-dh_T-dc_T"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}D{}H{}".format(*s))
def test_reference_gradients_match_finite_differences(shape, final_grads):
    T, B, D, H = shape
    args = make_problem(T, B, D, H, seed=T * 1000 + B * 100 + D * 10 + H)
    dy, dh_T, dc_T = make_upstream(T, B, H, final_grads=final_grads)
    *_, cache = fastlstm.lstm_forward(**args, backend="numpy", return_cache=True)
    grads = fastlstm.lstm_backward(dy, cache, dh_T, dc_T)

    pairs = {"x": grads.dx, "Wx": grads.dWx, "Wh": grads.dWh, "b": grads.db,
             "h0": grads.dh0, "c0": grads.dc0}
    for name, analytic in pairs.items():
        numeric = numerical_gradient(args, name, dy, dh_T, dc_T)
        error = np.max(np.abs(analytic - numeric)) / max(np.max(np.abs(numeric)), 1e-12)
        FINITE_DIFFERENCE_ERRORS.append(error)
        assert error <= FD_TOLERANCE, f"d{name}: relative error {error:.2e}"


def test_initial_state_none_equals_zeros():
    args = make_problem(4, 2, 3, 5, with_state=False)
    y_none, h_none, c_none = fastlstm.lstm_forward(**args, backend="numpy")
    zeros = np.zeros((2, 5))
    y_zero, h_zero, c_zero = fastlstm.lstm_forward(
        **{**args, "h0": zeros, "c0": zeros}, backend="numpy"
    )
    np.testing.assert_array_equal(y_none, y_zero)
    np.testing.assert_array_equal(c_none, c_zero)


def test_reference_matches_hand_computed_single_step():
    """One step, one unit, written out with scalars: pins the gate order i, f, o, g."""
    x, h_prev, c_prev = 0.3, -0.2, 0.5
    wx = np.array([0.1, -0.4, 0.7, 0.2])  # i, f, o, g
    wh = np.array([0.5, 0.3, -0.6, 0.9])
    bias = np.array([0.05, 1.0, -0.1, 0.2])
    a = x * wx + h_prev * wh + bias
    sig = lambda v: 1 / (1 + np.exp(-v))
    c = sig(a[1]) * c_prev + sig(a[0]) * np.tanh(a[3])
    h = sig(a[2]) * np.tanh(c)
    y, h_T, c_T = fastlstm.lstm_forward(
        np.full((1, 1, 1), x), wx[None, :], wh[None, :], bias,
        np.full((1, 1), h_prev), np.full((1, 1), c_prev), backend="numpy",
    )
    assert abs(c_T[0, 0] - c) < 1e-15
    assert abs(h_T[0, 0] - h) < 1e-15
    assert y[0, 0, 0] == h_T[0, 0]
