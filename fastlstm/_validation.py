"""Argument checks for the public API.

Every message names the argument and gives the expected and the actual shape or dtype.
"""

import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_positive_int(name, value):
    """Require an integer >= 1 (any integer type, not bool); return it as an int."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__}") from None
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def describe_dtype(dtype):
    """``dtype`` for an error message, with a way out for byte-swapped floats (arrays read from
    files or buffers written on big-endian machines)."""
    if dtype.newbyteorder("=") in FLOAT_DTYPES and not dtype.isnative:
        return f"{dtype} (byte-swapped; convert with .astype(np.{dtype.name}))"
    return str(dtype)


def check_array(name, value, ndim):
    """Require a NumPy array of real floating dtype with ``ndim`` dimensions."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32 or float64, got {describe_dtype(value.dtype)}"
        )
    if value.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got {value.ndim} "
            f"(shape {value.shape})"
        )
    return value


def check_shape(name, value, expected, meaning):
    """Require ``value.shape == expected``; ``meaning`` spells the expected shape in symbols."""
    if value.shape != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {value.shape}")


def check_same_dtype(arrays):
    """Require every array of ``arrays`` (a name -> array dict) to share one dtype."""
    dtypes = {name: arr.dtype for name, arr in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"all arrays must share one dtype (float32 or float64), got {listing}")
    return next(iter(dtypes.values()))


def check_forward_args(x, Wx, Wh, b, h0, c0):
    """Validate `lstm_forward`'s arrays; return (T, B, D, H) and the common dtype."""
    check_array("x", x, 3)
    check_array("Wx", Wx, 2)
    check_array("Wh", Wh, 2)
    check_array("b", b, 1)
    T, B, D = x.shape
    H = Wh.shape[0]
    if H < 1:
        raise ValueError(f"Wh must have shape (H, 4H) with H >= 1, got {Wh.shape}")
    if D < 1:
        raise ValueError(f"x must have shape (T, B, D) with D >= 1, got {x.shape}")
    check_shape("Wh", Wh, (H, 4 * H), "(H, 4H)")
    check_shape("Wx", Wx, (D, 4 * H), "(D, 4H) with D from x and H from Wh")
    check_shape("b", b, (4 * H,), "(4H,)")
    arrays = {"x": x, "Wx": Wx, "Wh": Wh, "b": b}
    for name, state in (("h0", h0), ("c0", c0)):
        if state is not None:
            check_array(name, state, 2)
            check_shape(name, state, (B, H), "(B, H)")
            arrays[name] = state
    return (T, B, D, H), check_same_dtype(arrays)


def check_backward_args(dy, dh_T, dc_T, shape, dtype):
    """Validate `lstm_backward`'s upstream gradients against the forward call's shape and dtype."""
    T, B, _, H = shape
    check_array("dy", dy, 3)
    check_shape("dy", dy, (T, B, H), "(T, B, H) of the forward call")
    arrays = {"dy": dy}
    for name, grad in (("dh_T", dh_T), ("dc_T", dc_T)):
        if grad is not None:
            check_array(name, grad, 2)
            check_shape(name, grad, (B, H), "(B, H) of the forward call")
            arrays[name] = grad
    got = check_same_dtype(arrays)
    if got != dtype:
        raise TypeError(f"dy, dh_T and dc_T must have the forward call's dtype {dtype}, got {got}")
