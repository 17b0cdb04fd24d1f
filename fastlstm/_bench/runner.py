"""Time the registry's implementations side by side, in one process and one run."""

import contextlib
import gc
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np

from .. import _threads, get_num_threads, set_num_threads
from .implementations import IMPLEMENTATIONS
from .problems import make_problem


class Budget(NamedTuple):
    """How long to time one entry: at least ``min_reps`` calls and ``min_seconds`` in total,
    at most ``max_reps`` calls."""

    min_reps: int
    min_seconds: float
    max_reps: int


FULL = Budget(min_reps=7, min_seconds=1.0, max_reps=300)
QUICK = Budget(min_reps=3, min_seconds=0.15, max_reps=50)


def time_calls(call, budget):
    """Seconds taken by each of repeated calls of ``call`` (garbage collector paused)."""
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < budget.max_reps and (
            len(times) < budget.min_reps or sum(times) < budget.min_seconds
        ):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def gemm_peak_gflops(dtype, n_threads, budget, n=1024):
    """GEMM throughput of NumPy's BLAS on ``n_threads`` threads: the ceiling for large shapes."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype)
    with _threads.blas_threads(n_threads):
        np.matmul(a, b, out=out)
        times = time_calls(lambda: np.matmul(a, b, out=out), budget)
    return 2 * n**3 / statistics.median(times) / 1e9


class Entry(NamedTuple):
    """One timed (op, shape, implementation)."""

    op: str
    shape: str
    impl: str
    times: list

    @property
    def median_ms(self):
        return 1e3 * statistics.median(self.times)


@contextlib.contextmanager
def fixed_threads(n_threads):
    """Run fastlstm (and torch, when loaded) on ``n_threads`` threads; restore both after."""
    torch = sys.modules.get("torch")
    before = get_num_threads(), torch.get_num_threads() if torch else None
    set_num_threads(n_threads)
    if torch:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        set_num_threads(before[0])
        if torch:
            torch.set_num_threads(before[1])


def plan(shapes, impl_names, ops, dtype):
    """The (op, shape, implementation) triples to run, in report order, and the skipped ones."""
    runnable, skipped = [], {}
    for name in impl_names:
        why = IMPLEMENTATIONS[name].missing(dtype)
        if why:
            skipped[name] = why
    for op in ops:
        for shape in shapes:
            for name in impl_names:
                if name not in skipped and op in IMPLEMENTATIONS[name].ops:
                    runnable.append((op, shape, name))
    return runnable, skipped


def run(shapes, impl_names, ops, dtype, n_threads, budget, progress=None):
    """Time every runnable triple; returns (entries, skipped, peak GFLOP/s).

    ``progress(done, total, label)`` is called before each entry.
    """
    runnable, skipped = plan(shapes, impl_names, ops, dtype)
    if any(name == "torch" for _, _, name in runnable):
        import torch  # noqa: F401  (loaded before fixed_threads so that its pool is pinned)
    peak = gemm_peak_gflops(dtype, n_threads, budget)
    problems = {}
    entries = []
    with fixed_threads(n_threads):
        for done, (op, shape, name) in enumerate(runnable):
            if progress:
                progress(done, len(runnable), f"{op}|{shape.name} {name}")
            if shape.name not in problems:
                problems[shape.name] = make_problem(shape, dtype)
            prepared = IMPLEMENTATIONS[name].prepare(op, problems[shape.name], n_threads)
            entries.append(Entry(op, shape.name, name, time_calls(prepared.call, budget)))
    if progress:
        progress(len(runnable), len(runnable), "done")
    return entries, skipped, peak
