"""The one place that decides how many threads fastlstm uses.

Every backend gets ``n_threads`` from `resolve_num_threads`, and every call runs inside
`blas_threads`, which pins the BLAS pools that are loaded in the process (NumPy's and
SciPy's OpenBLAS are separate libraries with separate pools) to the same count and restores
the user's setting afterwards. One owner of the cores per call: DESIGN.md §6 measured idle
OpenBLAS threads starving compiled kernels 13x on 2 cores.
"""

import contextlib
import os
import threading

from threadpoolctl import ThreadpoolController

from ._validation import check_positive_int

_lock = threading.Lock()
_num_threads = None
_controller = None


def _cores_available():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_num_threads(n):
    """Set the number of threads every fastlstm kernel and BLAS call uses.

    Parameters
    ----------
    n : int >= 1, or None to go back to the default (the cores this process may run on).
    """
    global _num_threads
    _num_threads = None if n is None else check_positive_int("n", n)


def get_num_threads():
    """Number of threads fastlstm calls use (see `set_num_threads`)."""
    return _num_threads if _num_threads is not None else _cores_available()


def forget_loaded_libraries():
    """Rescan the BLAS libraries at the next call (a backend may have loaded a new one)."""
    global _controller
    with _lock:
        _controller = None


def _blas_controllers():
    global _controller
    with _lock:
        if _controller is None:
            _controller = ThreadpoolController()
        return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


@contextlib.contextmanager
def blas_threads(n):
    """Limit every loaded BLAS pool to ``n`` threads inside the block, then restore it."""
    changed = []
    try:
        for lib in _blas_controllers():
            before = lib.get_num_threads()
            if before != n:
                lib.set_num_threads(n)
                changed.append((lib, before))
        yield
    finally:
        for lib, before in changed:
            lib.set_num_threads(before)
