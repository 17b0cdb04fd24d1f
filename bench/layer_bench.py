"""Measurements for `fastlstm.LSTM` (issue 6): lengths overhead, streaming step, threads, cold start.

    python bench/layer_bench.py [lengths|step|threads|coldstart ...] [--backend NAME]

Every comparison is measured side by side in one process, interleaved, median of repeats
(the machine is shared and noisy). Prints one line per measurement.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import fastlstm
from fastlstm import LSTM


def median_seconds(function, repeats, number=1):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            function()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def interleaved(functions, repeats, number=1):
    """Median seconds of each function, measured in alternation so drifts hit all alike.

    Also returns, for each function, the median over rounds of its time divided by the first
    function's time in the same round: paired ratios are steadier than ratios of medians.
    """
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(median_seconds(function, 1, number))
    first = next(iter(samples.values()))
    ratios = {
        name: statistics.median(t / f for t, f in zip(values, first))
        for name, values in samples.items()
    }
    return {name: statistics.median(values) for name, values in samples.items()}, ratios


def bench_lengths(backend):
    """Cost of ``lengths`` relative to the padded run of the same batch."""
    rng = np.random.default_rng(0)
    print(
        "lengths: layer(x, lengths=L) vs layer(x) (padded), same x: median ms "
        "(median of paired ratios to padded)"
    )
    for T, B, D, H, bidirectional in [
        (100, 32, 128, 256, False),
        (100, 32, 128, 256, True),
        (50, 8, 64, 128, False),
        (100, 64, 256, 256, False),
    ]:
        layer = LSTM(D, H, bidirectional=bidirectional, seed=0, backend=backend)
        x = rng.standard_normal((T, B, D)).astype(np.float32)
        cases = {
            "all T": np.full(B, T),
            "T-1 for one": np.r_[np.full(B - 1, T), T - 1],
            "distinct T-B+1..T": T - np.arange(B),
            "uniform [T/2, T]": rng.integers(T // 2, T + 1, B),
            "uniform [1, T]": rng.integers(1, T + 1, B),
        }
        functions = {"padded": lambda: layer(x)}
        for name, lengths in cases.items():
            functions[name] = lambda lengths=lengths: layer(x, lengths=lengths)
        times, ratios = interleaved(functions, repeats=15)
        padded = times.pop("padded")
        parts = ", ".join(
            f"{name}: {t * 1e3:.2f} ms ({ratios[name]:.3f}x; useful work {cases[name].sum() / (T * B):.2f})"
            for name, t in times.items()
        )
        print(
            f"  T={T} B={B} D={D} H={H} bidir={bidirectional}: padded {padded * 1e3:.2f} ms; {parts}"
        )


def bench_step(backend):
    """One streaming step from Python at B = 1, against torch.nn.LSTMCell."""
    try:
        import torch
    except ImportError:
        torch = None
    print("step: one time step from Python, B=1, median µs per step")
    for D, H in [(128, 128), (64, 128), (256, 256), (512, 512)]:
        layer = LSTM(D, H, seed=0, backend=backend)
        x = np.random.default_rng(0).standard_normal((1, D)).astype(np.float32)
        state = layer.initial_state(1)
        functions = {"fastlstm LSTM.step": lambda: layer.step(x, state)}
        if torch is not None:
            cell = torch.nn.LSTMCell(D, H)
            x_t = torch.from_numpy(x)
            hc = (torch.zeros(1, H), torch.zeros(1, H))

            def torch_step():
                with torch.no_grad():
                    return cell(x_t, hc)

            functions["torch LSTMCell (no_grad)"] = torch_step
        for name, function in functions.items():
            function()
        times, _ = interleaved(functions, repeats=15, number=2000)
        threads = f"torch threads {torch.get_num_threads()}" if torch is not None else "no torch"
        print(
            f"  D={D} H={H}: "
            + ", ".join(f"{n} {t * 1e6:.2f} µs" for n, t in times.items())
            + f" ({threads})"
        )


def bench_threads(backend):
    """Throughput of one shared layer object called from 1 and from 2 Python threads."""
    print("threads: calls per second of one shared layer, 1 vs 2 Python threads")
    cases = [((50, 32, 128, 256), 1), ((50, 32, 128, 256), 2), ((100, 1, 64, 128), 1)]
    for (T, B, D, H), kernel_threads in cases:
        layer = LSTM(D, H, seed=0, backend=backend)
        x = np.random.default_rng(0).standard_normal((T, B, D)).astype(np.float32)
        layer(x)
        before = fastlstm.get_num_threads()
        fastlstm.set_num_threads(kernel_threads)
        try:
            results = {}
            for n_workers in (1, 2, 1, 2):
                calls_each = 40 if B > 1 else 100
                barrier = threading.Barrier(n_workers + 1)

                def work():
                    barrier.wait()
                    for _ in range(calls_each):
                        layer(x)

                workers = [threading.Thread(target=work) for _ in range(n_workers)]
                for worker in workers:
                    worker.start()
                barrier.wait()
                start = time.perf_counter()
                for worker in workers:
                    worker.join()
                rate = n_workers * calls_each / (time.perf_counter() - start)
                results.setdefault(n_workers, []).append(rate)
        finally:
            fastlstm.set_num_threads(before)
        one, two = max(results[1]), max(results[2])
        print(
            f"  T={T} B={B} D={D} H={H}, fastlstm.set_num_threads({kernel_threads}): "
            f"1 thread {one:.1f} calls/s, 2 threads {two:.1f} calls/s ({two / one:.2f}x)"
        )


COLD_START = """
import time
start = time.perf_counter()
import numpy as np
numpy_done = time.perf_counter()
import fastlstm
import_done = time.perf_counter()
layer = fastlstm.LSTM.load({path!r}, backend={backend!r})
load_done = time.perf_counter()
y, _ = layer(np.zeros((100, 1, 64), np.float32))
end = time.perf_counter()
print(f"{{numpy_done - start:.3f}} {{import_done - numpy_done:.3f}} {{load_done - import_done:.3f}} {{end - load_done:.3f}}")
"""


def bench_coldstart(backend):
    """A new process: import fastlstm, LSTM.load(path), first call (T=100, B=1, D=64, H=128)."""
    print("coldstart: fresh `python -c` process, median of 5, seconds")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.npz")
        LSTM(64, 128, 2, seed=0).save(path)
        code = COLD_START.format(path=path, backend=backend)
        walls, parts = [], []
        for _ in range(5):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            )
            walls.append(time.perf_counter() - start)
            parts.append([float(v) for v in out.stdout.split()])
        bare = median_seconds(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 5)
        numpy_s, import_s, load_s, call_s = (
            statistics.median(p[k] for p in parts) for k in range(4)
        )
        print(
            f"  whole process {statistics.median(walls):.3f} s (bare python {bare:.3f} s); inside: "
            f"import numpy {numpy_s:.3f}, import fastlstm {import_s:.3f}, LSTM.load {load_s:.3f}, "
            f"first call {call_s:.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sections = {
        "lengths": bench_lengths,
        "step": bench_step,
        "threads": bench_threads,
        "coldstart": bench_coldstart,
    }
    parser.add_argument("sections", nargs="*", choices=[*sections, []], default=list(sections))
    parser.add_argument("--backend", default=None)
    parser.add_argument("--threads", type=int, default=None, help="fastlstm.set_num_threads")
    args = parser.parse_args()
    fastlstm.set_num_threads(args.threads)
    print(
        f"fastlstm {fastlstm.__version__}, backends {fastlstm.available_backends()}, "
        f"backend={args.backend!r}, threads {fastlstm.get_num_threads()}, numpy {np.__version__}"
    )
    for name in args.sections or list(sections):
        sections[name](args.backend)


if __name__ == "__main__":
    main()
