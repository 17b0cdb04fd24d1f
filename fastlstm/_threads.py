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


_blocks_lock = threading.Lock()
_blocks_active = 0  # blas_threads blocks running now, over every Python thread
_blocks_limit = None  # the pools' thread count while blocks run
_blocks_saved = []  # (library, its thread count before the first block)


@contextlib.contextmanager
def blas_threads(n):
    """Limit every loaded BLAS pool to ``n`` threads inside the block, then restore it.

    Blocks overlap when several Python threads call fastlstm at once, and nest (the API's block
    around a backend's): while any block runs the pools keep the smallest count one asked for,
    and the setting from before the first block comes back when the last one ends. (With each
    block restoring what it found, one thread's exit gave BLAS its whole pool in the middle of
    another thread's kernel: two Python threads ran S1 forward calls at 0.78x the rate of one.)
    """
    global _blocks_active, _blocks_limit
    with _blocks_lock:
        if _blocks_active == 0:
            _blocks_saved[:] = [(lib, lib.get_num_threads()) for lib in _blas_controllers()]
            _blocks_limit = None
        if _blocks_limit is None or n < _blocks_limit:
            for lib, _ in _blocks_saved:
                if lib.get_num_threads() != n:
                    lib.set_num_threads(n)
            _blocks_limit = n
        _blocks_active += 1
    try:
        yield
    finally:
        with _blocks_lock:
            _blocks_active -= 1
            if _blocks_active == 0:
                for lib, before in _blocks_saved:
                    if lib.get_num_threads() != before:
                        lib.set_num_threads(before)
                _blocks_saved.clear()
