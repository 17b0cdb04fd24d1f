"""Processes forked from one that has run fastlstm: prefork servers and multiprocessing's
default start method on Linux. GNU OpenMP keeps its thread team across fork() without the
threads, so a child's first region on several threads waited forever, and Numba's OpenMP
layer killed the child (SIGTERM) at its first parallel launch. Each scenario runs in a fresh
interpreter, so that what the test process itself started does not count."""

import json
import os
import textwrap

import pytest

from fresh_python import run_python

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")

# The parent runs a forward and a backward call with each backend named in argv[1] (and a
# streaming step with the last), then forks a child that does the same and reports what it
# saw. The child may not finish: the parent waits up to 120 s, then kills it.
SCENARIO = """
    import json, multiprocessing, sys, warnings
    import numpy as np
    import fastlstm

    parent_runs = sys.argv[1].split(",") if sys.argv[1] else []
    fastlstm.set_num_threads(2)
    rng = np.random.default_rng(0)
    T, B, D, H = 6, 3, 5, 40
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    Wx, Wh = ((rng.standard_normal(s) * 0.2).astype(np.float32) for s in [(D, 4 * H), (H, 4 * H)])
    b = np.zeros(4 * H, np.float32)
    dy = np.ones((T, B, H), np.float32)

    def run(backend):
        y, _, _, cache = fastlstm.lstm_forward(x, Wx, Wh, b, backend=backend, return_cache=True)
        return [y] + list(fastlstm.lstm_backward(dy, cache))

    def largest_difference(got, want):
        return max(float(np.abs(g - w).max()) for g, w in zip(got, want))

    # a layer big enough for threaded streaming steps, and a state made before the fork
    layer = fastlstm.LSTM(256, 256, seed=1, backend=parent_runs[-1] if parent_runs else None)
    state = layer.initial_state(32)
    frames = rng.standard_normal((2, 32, 256)).astype(np.float32)
    expected = {name: run(name) for name in parent_runs}
    for frame in frames[:1]:
        layer.step(frame, state)

    def child(queue):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen = {"threads": fastlstm.get_num_threads(),
                    "available": list(fastlstm.available_backends())}
            seen["differences"] = {name: largest_difference(run(name), want)
                                   for name, want in expected.items()
                                   if name in seen["available"]}
            seen["default_runs"] = len(run(None)) == 7
            refused = [name for name in parent_runs if name not in seen["available"]]
            seen["refused"] = {}
            for name in refused:
                try:
                    run(name)
                    seen["refused"][name] = "ran"
                except ValueError as error:
                    seen["refused"][name] = str(error)
            seen["step"] = layer.step(frames[1], state)[0].shape == (32, 256)
        seen["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
        queue.put(seen)

    if __name__ == "__main__":
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        process.join(120)
        if process.is_alive():
            process.kill()
            print(json.dumps({"outcome": "hung"}))
        elif process.exitcode != 0:
            print(json.dumps({"outcome": f"exit code {process.exitcode}"}))
        else:
            print(json.dumps({"outcome": "ok", **queue.get()}))
"""


def fork_scenario(parent_runs):
    import fastlstm

    compiled = [name for name in ("numba", "cython") if name in fastlstm.available_backends()]
    runs = [name for name in parent_runs if name == "numpy" or name in compiled]
    out = run_python(["-c", textwrap.dedent(SCENARIO), ",".join(runs)], timeout=600)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["outcome"] == "ok", seen
    return runs, seen


@pytest.mark.parametrize("parent_runs", [["cython"], ["numba"], ["numba", "cython"]],
                         ids=["cython", "numba", "both"])
def test_child_forked_after_compiled_calls_runs_on_one_thread(parent_runs):
    runs, seen = fork_scenario(parent_runs)
    if not runs:
        pytest.skip(f"{parent_runs} not available here")
    assert seen["threads"] == 1
    assert any("1 thread" in message and "spawn" in message for message in seen["warnings"])
    assert seen["default_runs"] and seen["step"]
    expected_same = [name for name in runs if name != "numba"]
    assert sorted(seen["differences"]) == sorted(expected_same)
    assert all(difference <= 1e-5 for difference in seen["differences"].values()), seen
    if "numba" in runs:
        assert "numba" not in seen["available"]
        assert "forked" in seen["refused"]["numba"] and "spawn" in seen["refused"]["numba"]
    else:
        assert seen["refused"] == {}


def test_child_forked_before_any_compiled_call_keeps_its_threads():
    _, seen = fork_scenario(["numpy"])
    assert seen["threads"] == 2 and seen["warnings"] == []
    assert seen["default_runs"] and seen["step"] and seen["differences"] == {"numpy": 0.0}
