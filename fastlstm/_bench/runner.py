"""Time the registry's implementations side by side in one run.

Each implementation times each operation in a worker process of its own (``python -m
fastlstm._bench.runner``), all on the same inputs, one worker after another. In one shared
process the idle thread pools of whatever ran before (OpenBLAS, OpenMP, ONNX Runtime) slowed
what ran next: torch's streaming step at S3 measured 24 ms after the other implementations
and 0.26 ms on its own, on 2 idle cores.
"""

import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


def time_in_this_process(impl_name, op, shapes, dtype, n_threads, budget):
    """Yield (shape name, seconds of each call) for every shape, timed here."""
    if impl_name == "torch":
        import torch  # noqa: F401  (loaded before fixed_threads so that its pool is pinned)
    with fixed_threads(n_threads):
        for shape in shapes:
            problem = make_problem(shape, dtype)
            prepared = IMPLEMENTATIONS[impl_name].prepare(op, problem, n_threads)
            # A fresh process runs its first calls slower (page faults, thread pools waking,
            # caches); warm up for half the budget, untimed.
            time_calls(prepared.call, budget._replace(min_reps=1, min_seconds=budget.min_seconds / 2))
            yield shape.name, time_calls(prepared.call, budget)


def _time_in_worker(impl_name, op, shapes, dtype, n_threads, budget):
    """Like `time_in_this_process`, in a fresh worker process."""
    request = {"impl": impl_name, "op": op, "shapes": [list(shape) for shape in shapes],
               "dtype": str(dtype), "threads": n_threads, "budget": list(budget)}
    # The worker must import this very fastlstm: ``-m`` would put the working directory first
    # on sys.path, where a repository checkout holds an uncompiled source tree.
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    worker = subprocess.Popen(
        [sys.executable, "-m", "fastlstm._bench.runner", json.dumps(request)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=tempfile.gettempdir(),
    )
    for line in worker.stdout:
        result = json.loads(line)
        yield result["shape"], result["times"]
    if worker.wait() != 0:
        raise RuntimeError(f"benchmark worker for {impl_name} {op} failed:\n"
                           + worker.stderr.read()[-3000:])


def run(shapes, impl_names, ops, dtype, n_threads, budget, progress=None):
    """Time every runnable triple; returns (entries, skipped, peak GFLOP/s).

    ``progress(done, total, label)`` is called before each entry.
    """
    runnable, skipped = plan(shapes, impl_names, ops, dtype)
    peak = gemm_peak_gflops(dtype, n_threads, budget)
    times = {}
    for name in impl_names:
        for op in ops:
            group = [shape for o, shape, n in runnable if (o, n) == (op, name)]
            if not group:
                continue
            if progress:
                progress(len(times), len(runnable), f"{op}|{group[0].name} {name}")
            for shape_name, seconds in _time_in_worker(name, op, group, dtype, n_threads, budget):
                times[op, shape_name, name] = seconds
                if progress:
                    progress(len(times), len(runnable), f"{op}|{shape_name} {name}")
    entries = [Entry(op, shape.name, name, times[op, shape.name, name])
               for op, shape, name in runnable]
    return entries, skipped, peak


def _worker_main(request):
    from .problems import Shape

    for shape_name, seconds in time_in_this_process(
        request["impl"], request["op"], [Shape(*s) for s in request["shapes"]],
        np.dtype(request["dtype"]), request["threads"], Budget(*request["budget"]),
    ):
        print(json.dumps({"shape": shape_name, "times": seconds}), flush=True)


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
