"""Time the registry's implementations side by side in one run.

Each implementation runs in a worker process of its own (``python -m fastlstm._bench.runner``),
all on the same inputs. In one shared process the idle thread pools of whatever ran before
(OpenBLAS, OpenMP, ONNX Runtime) slowed what ran next: torch's streaming step at S3 measured
24 ms after the other implementations and 0.26 ms on its own, on 2 idle cores.

The workers stay up for the whole run and take turns: every (op, shape) is timed for each
implementation in a row, and the whole sequence is repeated in rounds, each with a share of
the budget. This machine's shared cores have slow phases of tens of seconds; with one worker
timing all its shapes in one go, such a phase fell on one implementation only (one full run
had Numba's S5 forward at 502 ms, against 257-270 ms in the runs before and after).
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
    at most ``max_reps`` calls, spread over ``rounds`` turns."""

    min_reps: int
    min_seconds: float
    max_reps: int
    rounds: int = 1

    def per_round(self):
        """The budget of one turn."""
        return Budget(-(-self.min_reps // self.rounds), self.min_seconds / self.rounds,
                      -(-self.max_reps // self.rounds))


FULL = Budget(min_reps=9, min_seconds=1.0, max_reps=300, rounds=3)
QUICK = Budget(min_reps=3, min_seconds=0.15, max_reps=50)

#: Pause after each turn before the next worker times: a worker's idle thread pools keep
#: spinning for a while after its calls (OpenBLAS's up to ~0.1 s), on the cores the next one
#: measures.
SETTLE_SECONDS = 0.1


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


class _Worker:
    """A worker process that times one implementation for the whole run: requests go to its
    stdin and times come back on its stdout, one JSON line each."""

    def __init__(self, impl_name, dtype, n_threads):
        self.impl_name = impl_name
        setup = {"impl": impl_name, "dtype": str(dtype), "threads": n_threads}
        # The worker must import this very fastlstm: ``-m`` would put the working directory
        # first on sys.path, where a repository checkout holds an uncompiled source tree.
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [os.path.dirname(package), os.environ.get("PYTHONPATH")])))
        # stderr to a file: a pipe nobody reads until the end fills up and stalls the worker
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastlstm._bench.runner", json.dumps(setup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env, cwd=tempfile.gettempdir(),
        )

    def time(self, op, shape, budget):
        """Seconds of each timed call of ``op`` on ``shape``."""
        request = {"op": op, "shape": list(shape), "budget": list(budget)}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"benchmark worker for {self.impl_name} failed:\n"
                               + self.stderr.read()[-3000:])
        return json.loads(line)["times"]

    def close(self):
        with contextlib.suppress(BrokenPipeError):  # a worker that failed has no reader left
            self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def run(shapes, impl_names, ops, dtype, n_threads, budget, progress=None):
    """Time every runnable triple; returns (entries, skipped, peak GFLOP/s).

    ``progress(done, total, label)`` is called before each turn.
    """
    runnable, skipped = plan(shapes, impl_names, ops, dtype)
    peak = gemm_peak_gflops(dtype, n_threads, budget)
    times = {key: [] for key in runnable}
    turn_budget = budget.per_round()
    workers = {}
    total = len(runnable) * budget.rounds
    try:
        for round_index in range(budget.rounds):
            for done, (op, shape, name) in enumerate(runnable, round_index * len(runnable)):
                if progress:
                    progress(done, total, f"{op}|{shape.name} {name}")
                if name not in workers:
                    workers[name] = _Worker(name, dtype, n_threads)
                times[op, shape, name] += workers[name].time(op, shape, turn_budget)
                time.sleep(SETTLE_SECONDS)
    finally:
        for worker in workers.values():
            worker.close()
    if progress:
        progress(total, total, "")
    entries = [Entry(op, shape.name, name, times[op, shape, name])
               for op, shape, name in runnable]
    return entries, skipped, peak


def _worker_main(setup):
    """Serve timing requests on stdin for one implementation (see `_Worker`)."""
    from .problems import Shape

    impl_name, dtype, n_threads = setup["impl"], np.dtype(setup["dtype"]), setup["threads"]
    if impl_name == "torch":
        import torch  # noqa: F401  (loaded before fixed_threads so that its pool is pinned)
    prepared = {}
    with fixed_threads(n_threads):
        for line in sys.stdin:
            request = json.loads(line)
            budget = Budget(*request["budget"])
            key = request["op"], tuple(request["shape"])
            if key not in prepared:
                problem = make_problem(Shape(*request["shape"]), dtype)
                prepared[key] = IMPLEMENTATIONS[impl_name].prepare(request["op"], problem,
                                                                    n_threads)
                # A fresh process runs its first calls slower (page faults, thread pools
                # waking, caches); warm up for as long as a turn, untimed.
                time_calls(prepared[key].call, budget._replace(min_reps=1))
            print(json.dumps({"times": time_calls(prepared[key].call, budget)}), flush=True)
if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
