"""pytest-benchmark suite: every registered implementation on the DESIGN.md §4 shapes.

Groups are named ``op|shape``; preparation (JIT warm-up, weight conversion, graph building)
happens outside the timed call; the thread count is fixed and recorded in extra_info.
"""

import numpy as np
import pytest

from fastlstm._bench import runner
from fastlstm._bench.implementations import IMPLEMENTATIONS
from fastlstm._bench.problems import OPS, SHAPES, make_problem

THREADS = 2
CASES = [(op, shape, name) for op in OPS for shape in SHAPES
         for name, impl in IMPLEMENTATIONS.items() if op in impl.ops]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.mark.parametrize("op, shape_name, impl_name", CASES,
                         ids=[f"{op}|{shape}|{name}" for op, shape, name in CASES])
def test_lstm(benchmark, op, shape_name, impl_name, dtype):
    impl = IMPLEMENTATIONS[impl_name]
    why = impl.missing(dtype)
    if why:
        pytest.skip(f"{impl_name}: {why}")
    shape = SHAPES[shape_name]
    if benchmark.disabled:
        shape = shape._replace(T=2)
    elif dtype != np.float32:
        pytest.skip("timed runs use float32, the dtype of the DESIGN.md targets")
    benchmark.group = f"{op}|{shape_name}"
    benchmark.extra_info.update(threads=THREADS, dtype=str(dtype), gflop=shape.flops(op) / 1e9)
    with runner.fixed_threads(THREADS):
        prepared = impl.prepare(op, make_problem(shape, dtype), THREADS)
        output = benchmark(prepared.call)
    y = prepared.result(output)[0]
    assert y.shape == (1 if op == "step" else shape.T, shape.B, shape.H)
    assert np.isfinite(y).all()
