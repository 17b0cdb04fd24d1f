"""Hypothesis property tests over random small problems, every backend, both dtypes."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from lstm_data import make_problem

problems = st.tuples(
    st.integers(1, 12),  # T
    st.integers(1, 5),  # B
    st.integers(1, 6),  # D
    st.integers(1, 6),  # H
    st.sampled_from([np.float32, np.float64]),
    st.booleans(),  # with_state
    st.integers(0, 2**32 - 1),  # seed
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems)
def test_shapes_dtypes_finiteness_and_range(backend, problem):
    T, B, D, H, dtype, with_state, seed = problem
    # |x| <= 1 and weights within ±1/√H keep every pre-activation below ~8 in magnitude, so
    # no gate saturates to exactly 0 or 1 and |h| < 1 must hold strictly.
    args = make_problem(T, B, D, H, dtype, seed=seed, with_state=with_state)
    args["x"] = np.clip(args["x"], -1, 1)
    y, h_T, c_T = fastlstm.lstm_forward(**args, backend=backend)
    assert y.shape == (T, B, H) and h_T.shape == (B, H) and c_T.shape == (B, H)
    assert y.dtype == h_T.dtype == c_T.dtype == dtype
    assert np.isfinite(y).all() and np.isfinite(c_T).all()
    assert (np.abs(y) < 1).all() and (np.abs(h_T) < 1).all()
    np.testing.assert_array_equal(y[-1], h_T)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems)
def test_gradient_shapes_dtypes_and_finiteness(backend, problem):
    T, B, D, H, dtype, with_state, seed = problem
    args = make_problem(T, B, D, H, dtype, seed=seed, with_state=with_state)
    y, _, _, cache = fastlstm.lstm_forward(**args, backend=backend, return_cache=True)
    grads = fastlstm.lstm_backward(np.ones_like(y), cache)
    expected_shapes = {"dx": (T, B, D), "dh0": (B, H), "dc0": (B, H),
                       "dWx": (D, 4 * H), "dWh": (H, 4 * H), "db": (4 * H,)}
    for name, shape in expected_shapes.items():
        grad = getattr(grads, name)
        assert grad.shape == shape and grad.dtype == dtype, name
        assert np.isfinite(grad).all(), name
