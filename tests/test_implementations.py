"""Every implementation the benchmarks time agrees with the float64 reference.

The benchmark registry (fastlstm._bench.implementations) is the list of what gets timed; this
test walks the same list, so nothing is benchmarked that is not also checked. Peers (torch,
onnxruntime) are skipped only when they are not installed.
"""

import numpy as np
import pytest

import fastlstm
from fastlstm._bench.implementations import IMPLEMENTATIONS, onnx_lstm_model, reorder_gates
from fastlstm._bench.problems import Shape, make_problem, second_layer_weights

CASES = [(name, op) for name, impl in IMPLEMENTATIONS.items() for op in impl.ops]
SHAPES = [Shape("small", 5, 3, 4, 6), Shape("S1-short", 10, 1, 64, 128)]
TOLERANCE = {"float32": (1e-5, 1e-4), "float64": (1e-10, 1e-10)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("name, op", CASES, ids=[f"{n}-{op}" for n, op in CASES])
def test_implementation_matches_reference(name, op, shape, dtype):
    impl = IMPLEMENTATIONS[name]
    why = impl.missing(dtype)
    if why:
        pytest.skip(f"{name}: {why}")
    problem = make_problem(shape, np.dtype(dtype), seed=4)
    prepared = impl.prepare(op, problem, fastlstm.get_num_threads())
    got = prepared.result(prepared.call())

    x, Wx, Wh, b, h0, c0, dy = (a.astype(np.float64) for a in problem)
    if op == "step":
        x = x[:1]
    if op == "train":  # two layers from zero states; the first call's outputs
        h0 = c0 = None
        x, *_ = fastlstm.lstm_forward(x, Wx, Wh, b, backend="numpy")
        Wx, Wh, b = (w.astype(np.float64) for w in second_layer_weights(shape.H, np.float64))
    *want, cache = fastlstm.lstm_forward(x, Wx, Wh, b, h0, c0, backend="numpy", return_cache=True)
    forward_tol, grad_tol = TOLERANCE[dtype]
    for label, a, w in zip(("y", "h_T", "c_T"), got[:3], want):
        assert a.dtype == np.dtype(dtype), label
        np.testing.assert_allclose(a, w, rtol=0, atol=forward_tol, err_msg=label)
    if op == "fwdbwd":
        want_grads = fastlstm.lstm_backward(dy, cache)
        for label, a, w in zip(want_grads._fields, got[3], want_grads):
            assert a.shape == w.shape, label
            error = np.max(np.abs(a - w)) / np.max(np.abs(w))
            assert error <= grad_tol, f"{label}: {error:.2e}"


def test_reorder_gates_maps_blocks():
    ours = np.repeat(np.arange(4.0), 3)  # blocks i, f, o, g filled with 0, 1, 2, 3
    np.testing.assert_array_equal(reorder_gates(ours, (0, 1, 3, 2)), np.repeat([0, 1, 3, 2], 3))
    np.testing.assert_array_equal(reorder_gates(reorder_gates(ours, (0, 2, 1, 3)), (0, 2, 1, 3)), ours)


def test_onnx_graph_declares_our_weights():
    onnx = pytest.importorskip("onnx")
    problem = make_problem(SHAPES[0], np.float32)
    model = onnx_lstm_model(problem.Wx, problem.Wh, problem.b)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    H = problem.Wh.shape[0]
    assert weights["W"].shape == (1, 4 * H, problem.Wx.shape[0])
    np.testing.assert_array_equal(weights["R"][0, H:2 * H], problem.Wh[:, 2 * H:3 * H].T)  # o


def test_missing_peer_is_reported_not_installed(monkeypatch):
    import importlib.util

    from fastlstm._bench import runner

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    assert IMPLEMENTATIONS["torch"].missing() == "not installed (torch)"
    runnable, skipped = runner.plan([], ["numpy", "torch"], ["fwd"], "float32")
    assert skipped == {"torch": "not installed (torch)"}


def test_runner_takes_turns_in_rounds():
    """Every (op, shape) is timed for each implementation in a row, the sequence repeated
    once per round; an entry's times are those of all its turns."""
    from fastlstm._bench import runner

    shapes = [Shape("A", 2, 1, 3, 4), Shape("B", 3, 2, 2, 5)]
    impls = [name for name in ("numpy", "cython", "numba") if not IMPLEMENTATIONS[name].missing()]
    labels = []
    budget = runner.Budget(min_reps=4, min_seconds=0.0, max_reps=4, rounds=2)
    entries, skipped, _ = runner.run(shapes, impls, ["fwd"], np.dtype(np.float32), 1, budget,
                                     progress=lambda done, total, label: labels.append(label))
    turns = [f"fwd|{shape.name} {name}" for shape in shapes for name in impls]
    assert labels == turns * 2 + [""]
    assert [(e.shape, e.impl) for e in entries] == [(s.name, n) for s in shapes for n in impls]
    assert all(len(entry.times) == 4 for entry in entries)  # 2 calls in each of 2 turns


def test_runner_reports_a_failing_worker():
    from fastlstm._bench import runner

    worker = runner._Worker("numpy", np.dtype(np.float32), 1)
    try:
        # a negative size makes the worker's problem setup raise: its traceback comes back
        with pytest.raises(RuntimeError, match="(?s)benchmark worker for numpy failed.*Error"):
            worker.time("fwd", Shape("A", 2, 1, 3, -4), runner.QUICK)
    finally:
        worker.close()
