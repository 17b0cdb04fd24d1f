"""Backend registry: which backends exist, which can be loaded here, and which one a call uses.

Backends live in `fastlstm._kernels`, one module each, and register themselves by defining a
module-level ``BACKEND`` (a `Backend`). Modules are imported on first use, so that
``import fastlstm`` stays cheap and a backend whose dependency or compiled extension is
missing only removes that backend; the reason is kept for the error message and for
``python -m fastlstm``.
"""

import importlib
import threading
from typing import Callable, NamedTuple

import numpy as np

from . import _threads

#: Backend names in the documented order, with the module that implements each.
BACKEND_MODULES = {
    "numpy": "fastlstm._kernels.numpy_ref",
    "numba": "fastlstm._kernels.numba_backend",
    "cython": "fastlstm._kernels.cython_backend",
}


class Backend(NamedTuple):
    """What a backend module provides.

    forward(x, Wx, Wh, b, h0, c0, *, need_cache, n_threads, lengths=None, prepared=None)
        -> (y, h_T, c_T, cache)
    backward(dy, dh_T, dc_T, cache, *, n_threads, need_dx=True) -> (dx, dh0, dc0, dWx, dWh, db)

    Arrays arrive validated, C-contiguous and of one dtype (float32 or float64); inputs are
    read-only to the backend. ``cache`` is the backend's own object, opaque to the API.
    ``lengths`` (B,) intp in [0, T], for padded batches: y still covers all T steps, but h_T
    and c_T are each row's states after its first lengths[row] steps (h0, c0 for 0), as
    `state_at_lengths` reads them from every step's states. The cache is unaffected.
    ``need_dx=False``: the caller needs no input gradient; dx is None and may be skipped.
    ``prepared``: a `PreparedWeights` of these same Wx, Wh and b, in which a backend keeps the
    arrangements of the weights its kernels read (None: arrange them for this call only).
    Every BLAS call a backend makes runs inside its own `fastlstm._threads.blas_threads` block
    (``n_threads``, or 1 inside its parallel regions); kernels that call no BLAS skip the
    block, which costs 3.5 µs a call.
    ``speed_rank(T, B, D, H)`` orders backends for ``backend=None``: higher is faster.
    """

    name: str
    forward: Callable
    backward: Callable
    speed_rank: Callable


class PreparedWeights:
    """One (Wx, Wh, b) and the arrangements of it that backends made for their kernels.

    A caller whose weights do not change between calls (`fastlstm.LSTM` while its weights are
    read-only) keeps one and passes it to every forward call with these same arrays: each
    arrangement (packed weights) is then made at the first call that needs it instead of at
    every call, and kept, about as large as the weights, for as long as this object lives.
    """

    __slots__ = ("Wx", "Wh", "b", "_made")

    def __init__(self, Wx, Wh, b):
        self.Wx, self.Wh, self.b = Wx, Wh, b
        self._made = {}

    def holds(self, Wx, Wh, b):
        """Whether these are the very arrays it was made for."""
        return self.Wx is Wx and self.Wh is Wh and self.b is b

    def get(self, key):
        """The arrangement named ``key`` (a backend's own name for it), or None."""
        return self._made.get(key)

    def keep(self, key, arrangement):
        """Keep a complete ``arrangement`` as ``key``; returns the one kept (that of another
        thread whose first call kept one first)."""
        return self._made.setdefault(key, arrangement)


def state_at_lengths(steps, initial, lengths):
    """Each row's state after its first lengths[row] steps: steps[lengths[row] - 1, row], or
    initial[row] where lengths[row] = 0. steps (T, B, H), initial (B, H); a new array.
    """
    state = initial.copy()
    ran = np.flatnonzero(lengths)
    state[ran] = steps[lengths[ran] - 1, ran]
    return state


_lock = threading.Lock()
_loaded = {}
_load_errors = {}

#: Backends that cannot run in a process forked after they started something (see
#: `fastlstm._threads.note_started`).
_FORK_UNSAFE = {"numba": _threads.NUMBA_POOL}


def _fork_reason(name):
    """Why backend ``name`` cannot run in this forked process, or None."""
    started = _FORK_UNSAFE.get(name)
    return None if started is None else _threads.fork_conflict(started, name)


def _load_error_hint(exc):
    """What to do about a known failure to load a backend."""
    if "no locator available" in str(exc):  # Numba's, for cache=True without a writable dir
        return " (no writable cache directory: set NUMBA_CACHE_DIR to one)"
    if isinstance(exc, ModuleNotFoundError) and exc.name in ("numba", "llvmlite"):
        return " (install it with: pip install 'fastlstm[numba]')"
    return ""


def _load(name):
    backend = _loaded.get(name)
    if backend is not None:  # every call resolves its backend: skip the lock once loaded
        return backend
    with _lock:
        if name not in _loaded and name not in _load_errors:
            try:
                module = importlib.import_module(BACKEND_MODULES[name])
                _loaded[name] = module.BACKEND
            except Exception as exc:  # any failure to load just makes the backend unavailable
                _load_errors[name] = f"{type(exc).__name__}: {exc}{_load_error_hint(exc)}"
            _threads.forget_loaded_libraries()
    return _loaded.get(name)


def available_backends():
    """Names of the backends usable in this process.

    Returns
    -------
    tuple of str
        A subset of ``("numpy", "numba", "cython")``, in that order.
    """
    return tuple(
        name for name in BACKEND_MODULES if _load(name) is not None and _fork_reason(name) is None
    )


def unavailable_backends():
    """Map of backend name to the reason it cannot run in this process."""
    available_backends()
    reasons = dict(_load_errors)
    for name in _loaded:
        reason = _fork_reason(name)
        if reason is not None:
            reasons[name] = reason
    return reasons


def get_backend(name, shape):
    """Resolve ``name`` (or None, the fastest for ``shape`` = (T, B, D, H)) to a `Backend`."""
    if name is None:
        candidates = [_load(n) for n in available_backends()]
        return max(candidates, key=lambda backend: backend.speed_rank(*shape))
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    backend = _load(name) if name in BACKEND_MODULES else None
    if backend is None or _fork_reason(name) is not None:
        reasons = unavailable_backends()
        reason = f" ({reasons[name]})" if name in reasons else ""
        raise ValueError(
            f"backend {name!r} is not available{reason}; "
            f"available backends: {available_backends()}"
        )
    return backend
