"""The one place that decides how many threads fastlstm uses.

Every backend gets ``n_threads`` from `get_num_threads`, and runs whatever BLAS it calls inside
`blas_threads`, which pins the BLAS pools that are loaded in the process (NumPy's and SciPy's
OpenBLAS are separate libraries with separate pools) to the count it needs and restores the
user's setting afterwards. One owner of the cores per call: DESIGN.md §6 measured idle OpenBLAS
threads starving compiled kernels 13x on 2 cores. The kernels that split every time step across
their threads ask `SoloBackoff` when one thread would serve a call better.
"""

import itertools
import math
import os
import threading
import time
import warnings

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
    """Number of threads fastlstm calls use (see `set_num_threads`).

    1 in a process forked after fastlstm had started OpenMP threads, where GNU OpenMP cannot
    start them again (README, "Forked processes"); a RuntimeWarning says so once.
    """
    n = _num_threads if _num_threads is not None else _cores_available()
    if n > 1 and OPENMP_TEAM in _started_before_fork:
        _warn_one_thread_after_fork()
        return 1
    return n


#: What a kernel may have started, that a process forked afterwards cannot use. GNU OpenMP
#: keeps its thread team across fork() without the threads: a forked child's first region on
#: several threads waited forever (one thread runs). Numba's OpenMP layer kills such a child
#: (SIGTERM) at its first parallel launch, whatever the thread count.
OPENMP_TEAM = "OpenMP threads"
NUMBA_POOL = "Numba's OpenMP thread pool"
_started = set()
_started_before_fork = frozenset()
_warned_after_fork = False


def note_started(what, n_threads):
    """Record that a kernel about to run on ``n_threads`` threads starts ``what`` (OpenMP
    threads start only for several; Numba's pool at its first launch, for any count)."""
    if n_threads > 1 or what != OPENMP_TEAM:
        _started.add(what)


def fork_conflict(what, user):
    """Why ``user`` (a backend's name) cannot run here, as this process was forked after
    ``what`` had started in its parent; None where it was not."""
    if what not in _started_before_fork:
        return None
    return (f"this process was forked after {what} had started, which cannot run in a forked "
            f"child; fork before the first {user} call, or use multiprocessing's 'spawn' or "
            f"'forkserver' start method")


def check_no_fork_conflict(what, user):
    """Raise RuntimeError where `fork_conflict` gives a reason."""
    reason = fork_conflict(what, user)
    if reason is not None:
        raise RuntimeError(f"{user} backend: {reason}")


def _after_fork_in_child():
    global _started_before_fork
    _started_before_fork = _started_before_fork | _started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _warn_one_thread_after_fork():
    global _warned_after_fork
    if not _warned_after_fork:
        _warned_after_fork = True
        warnings.warn(
            "fastlstm runs on 1 thread in this process: it was forked after fastlstm had "
            "started OpenMP threads, which GNU OpenMP cannot start again in a forked child. "
            "Fork before fastlstm's first call, or use multiprocessing's 'spawn' or "
            "'forkserver' start method, to keep several threads.",
            RuntimeWarning,
            stacklevel=3,
        )


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
            _pools.clear()
        return [lib for lib in _controller.lib_controllers if lib.user_api == "blas"]


class _OpenBLASPool:
    """An OpenBLAS pool driven through its own entry points.

    threadpoolctl lets only the first Python thread that set an OpenBLAS pool (without the OpenMP
    threading layer) change it, and ignores every other thread: a call from a service's worker
    thread then ran its kernels beside a full BLAS pool (S1 forward 1.69 vs 0.48 ms). The pool is
    process-wide and `blas_threads` serialises every change, so any thread may set it here.
    """

    __slots__ = ("get_num_threads", "set_num_threads")

    def __init__(self, get_num_threads, set_num_threads):
        self.get_num_threads = get_num_threads
        self.set_num_threads = set_num_threads


def _pool(lib):
    dynlib = getattr(lib, "dynlib", None)
    if lib.internal_api == "openblas" and getattr(lib, "threading_layer", None) != "openmp":
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                return _OpenBLASPool(get, set_)
    return lib


_pools = {}  # library path -> _pool() of that library, for every BLAS library of _controller


def _blas_pools():
    """{library path: pool} of the BLAS libraries loaded now (a copy: a rescan may refill the
    shared one while a caller iterates)."""
    libs = _blas_controllers()
    with _lock:
        if not _pools:
            _pools.update((lib.filepath, _pool(lib)) for lib in libs)
        return dict(_pools)


_blocks_lock = threading.Lock()
_blocks_active = 0  # blas_threads blocks running now, over every Python thread
_blocks_limit = None  # the pools' thread count while blocks run
_blocks_saved = {}  # library path -> (pool, its thread count before the first block)


def _enter_block(n):
    global _blocks_active, _blocks_limit
    pools = _blas_pools()
    with _blocks_lock:
        if _blocks_active == 0:
            _blocks_saved.clear()
            _blocks_limit = None
        # Libraries loaded while blocks run (a backend's first call from another thread) join
        # at the current limit, and get their own setting back with the others.
        for path, pool in pools.items():
            if path not in _blocks_saved:
                before = pool.get_num_threads()
                _blocks_saved[path] = pool, before
                if _blocks_limit is not None and before != _blocks_limit:
                    pool.set_num_threads(_blocks_limit)
        if _blocks_limit is None or n < _blocks_limit:
            for pool, before in _blocks_saved.values():
                if (before if _blocks_limit is None else _blocks_limit) != n:
                    pool.set_num_threads(n)
            _blocks_limit = n
        _blocks_active += 1


def _exit_block():
    global _blocks_active
    with _blocks_lock:
        _blocks_active -= 1
        if _blocks_active == 0:
            for pool, before in _blocks_saved.values():
                if before != _blocks_limit:
                    pool.set_num_threads(before)
            _blocks_saved.clear()


class blas_threads:
    """Limit every loaded BLAS pool to ``n`` threads inside the block, then restore it.

    Blocks overlap when several Python threads call fastlstm at once, and nest (the API's block
    around a backend's): while any block runs the pools keep the smallest count one asked for,
    and the setting from before the first block comes back when the last one ends. (With each
    block restoring what it found, one thread's exit gave BLAS its whole pool in the middle of
    another thread's kernel: two Python threads ran S1 forward calls at 0.78x the rate of one.)
    Inside blocks the pools are fastlstm's: a count set by other code meanwhile is overwritten.
    A class calling OpenBLAS directly: a call's two nested blocks cost 5.4 µs, where a generator
    through threadpoolctl's getters and setters took 7.4 µs.
    """

    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        _enter_block(self.n)

    def __exit__(self, *exc_info):
        _exit_block()


#: `SoloBackoff` lengths, in calls. A fixed 20 calls made one descheduling of the partner (a
#: 10.8 ms Numba call at S1) cost ten forward+backward calls at 0.95 instead of 0.65 ms.
BACKOFF_FIRST = 2
BACKOFF_MAX = 64
#: Seconds after which `SoloBackoff` treats the worker threads as asleep, and the calls in a
#: row, each within that time of the one before, after which it wakes them again (so that a
#: forward call and its backward call alone do not). An OpenMP region on 2 threads here, after
#: the process slept 15 ms: 0.1 ms; after 20-50 ms: often 4-8 ms (the woken worker was placed on
#: the caller's core, where the caller's end-of-region spin held it).
IDLE_SECONDS = 0.010
WAKE_CALLS = 4


class SoloBackoff:
    """Whether a kernel whose threads split each time step runs them, or one thread, next.

    - When a call finds its partner threads mostly absent (the cores busy with other work),
      the next calls run on one thread: ``first`` calls, doubling while the calls that end a
      back-off find the partners absent again, up to ``most``. A call whose threads took their
      shares resets it.
    - When the threads have been idle for IDLE_SECONDS, calls run on one thread too, rather
      than wake them, until WAKE_CALLS calls have come in a row, each within IDLE_SECONDS of
      the one before. After 50 ms idle, on 2 threads: S1 forward median 1.9-9.8 ms, p90
      ~10 ms (one thread: 0.75-0.93 ms); S1 forward+backward p90 13.8 ms (one thread: 2.1 ms);
      a streaming step at (B, D, H) = (32, 128, 256) 5.5 ms (143 µs back to back).

    The kernels compute every share with the same code on any number of threads, so the
    results are bit-identical either way.
    """

    __slots__ = ("first", "most", "left", "next", "clock", "call_end", "team_end", "in_row")

    def __init__(self, first, most, clock=time.monotonic):
        self.first = first
        self.most = most
        self.left = 0  # calls still to run on one thread
        self.next = first  # the length of the next back-off
        self.clock = clock
        self.call_end = -math.inf  # when the last call ended
        self.team_end = -math.inf  # when the last call on several threads ended
        self.in_row = 0  # calls in a row, each within IDLE_SECONDS of the one before (capped)

    def threads(self, n_threads):
        """The threads the next call runs on, given the n_threads it was asked to use."""
        if n_threads == 1:
            return 1
        if self.left > 0:
            self.left -= 1
            return 1
        now = self.clock()
        # Capped at WAKE_CALLS, all that is compared: ints above 256 are new objects, and a
        # streaming step must allocate nothing (a long run in a row made it keep 32 bytes).
        in_row = min(self.in_row + 1, WAKE_CALLS)
        self.in_row = in_row if now - self.call_end <= IDLE_SECONDS else 1
        if now - self.team_end > IDLE_SECONDS and self.in_row < WAKE_CALLS:
            return 1
        return n_threads

    def note(self, n_threads, partners_absent=None):
        """Record how a call on n_threads went, as it ends (``partners_absent`` None: the kernel
        does not tell)."""
        self.call_end = self.clock()
        if n_threads == 1:
            return  # a one-thread call tells nothing of the partners
        self.team_end = self.call_end
        if partners_absent is None:
            return
        if partners_absent:
            self.left = self.next
            self.next = min(2 * self.next, self.most)
        else:
            self.next = self.first
