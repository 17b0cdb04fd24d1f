"""Package-level behaviour: import, backend discovery, command line, floating-point state."""

import importlib.metadata
import math
import os
import pathlib
import re
import sys
import threading

import numpy as np
import pytest

import fastlstm
from fresh_python import run_python
from lstm_data import make_problem


def test_version_matches_metadata():
    assert fastlstm.__version__ == importlib.metadata.version("fastlstm")


def test_available_backends_order():
    backends = fastlstm.available_backends()
    assert backends[0] == "numpy"
    order = ("numpy", "numba", "cython")
    assert list(backends) == [name for name in order if name in backends]


def test_imports_and_says_so_without_compiled_extensions():
    """With every compiled module unimportable, fastlstm still works on the reference."""
    out = run_python("""
        import importlib.abc, sys

        class NoExtensions(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.startswith("fastlstm._kernels._") or name == "fastlstm._kernels.cython_backend":
                    raise ImportError(f"{name} blocked for the test")

        sys.meta_path.insert(0, NoExtensions())
        import numpy as np
        import fastlstm
        from fastlstm.__main__ import describe
        assert "cython" not in fastlstm.available_backends()
        y, h, c = fastlstm.lstm_forward(np.ones((2, 1, 3)), np.ones((3, 8)), np.ones((2, 8)), np.ones(8))
        assert y.shape == (2, 1, 2)
        print("\\n".join(describe()))
    """).stdout
    assert "cython: unavailable (ImportError" in out
    assert "compiled extensions: missing" in out


def test_works_without_numba():
    """Numba is an optional extra: without it fastlstm runs on the other backends, the default
    backend included, and says how to get the missing one."""
    result = run_python("""
        import importlib.abc, sys

        class NoNumba(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("numba", "llvmlite"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoNumba())
        import numpy as np
        import fastlstm
        from fastlstm.__main__ import describe, warm
        assert "numba" not in fastlstm.available_backends()
        args = (np.ones((2, 1, 3)), np.ones((3, 8)), np.ones((2, 8)), np.ones(8))
        y, _, _ = fastlstm.lstm_forward(*args)
        want, _, _ = fastlstm.lstm_forward(*args, backend="numpy")
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)
        assert warm() == 1
        print("\\n".join(describe()))
        assert "numba" not in sys.modules
    """)
    assert "numba: unavailable (ModuleNotFoundError" in result.stdout
    assert "pip install 'fastlstm[numba]'" in result.stdout
    assert "numba backend unavailable" in result.stdout


def test_command_line_info():
    result = run_python(["-m", "fastlstm"])
    assert f"fastlstm {fastlstm.__version__}" in result.stdout
    assert f"available backends: {', '.join(fastlstm.available_backends())}" in result.stdout
    assert "threads:" in result.stdout
    if "cython" in fastlstm.available_backends():
        from fastlstm._kernels import _lstm_cython

        assert f"cython kernels: {_lstm_cython.isa()} build" in result.stdout
    if "numba" in fastlstm.available_backends():
        from fastlstm._kernels import numba_backend

        assert f"numba kernel cache: {numba_backend.cache_dir()}" in result.stdout


def test_denormals_survive_import_and_every_backend():
    """No backend may leave flush-to-zero or denormals-are-zero set in the process."""
    args = make_problem(3, 2, 4, 5, np.float32)
    for backend in fastlstm.available_backends():
        fastlstm.lstm_forward(**args, backend=backend)
        assert np.float32(1e-45) * np.float32(1.0) != 0, backend
        assert np.float64(5e-324) * 1.0 != 0, backend


def test_installed_files_hold_no_generated_c():
    """The wheel carries the Cython sources and the compiled modules, not the 4 MB of C that
    Cython generates on the way."""
    dist = importlib.metadata.distribution("fastlstm")
    files = [f for f in dist.files or [] if f.parts[0] == "fastlstm"]
    # an editable install's RECORD lists no package files; a source tree's egg-info (found
    # first from the repository root) has no RECORD and lists sources only
    if dist.read_text("RECORD") is None or not files:
        pytest.skip("not an installed wheel: the package is the source tree, build files and all")
    names = {f.name for f in files}
    assert "_lstm_cython.pyx" in names
    assert sorted(name for name in names if name.endswith(".c")) == []
    if "cython" in fastlstm.available_backends():
        assert any(name.startswith("_lstm_cython.") and name.endswith((".so", ".pyd"))
                   for name in names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads ELF section names")
@pytest.mark.skipif(os.environ.get("FASTLSTM_DEBUG_SYMBOLS", "0") not in ("", "0"),
                    reason="FASTLSTM_DEBUG_SYMBOLS asks for a build with debug information")
def test_compiled_modules_carry_no_debug_information():
    """Debug information would make the modules five times their size (setup.py)."""
    if "cython" not in fastlstm.available_backends():
        pytest.skip("the cython extension is not built")
    from fastlstm._kernels import _blas, _lstm_cython, _openmp_info

    for module in (_blas, _lstm_cython, _openmp_info):
        image = pathlib.Path(module.__file__).read_bytes()
        assert image.startswith(b"\x7fELF"), module.__file__
        assert b".debug_info\0" not in image, module.__file__


def test_command_line_bench_writes_the_report(tmp_path):
    out = tmp_path / "report"
    args = ["-m", "fastlstm", "bench", "--quick", "--shapes", "S1", "--backends", "numpy",
            "--ops", "fwd,step", "--out", str(out)]
    first = run_python(args)
    for op in ("fwd", "step"):
        assert re.search(rf"^{op}\s+S1\s+numpy\s+\d", first.stdout, re.M), first.stdout
    assert (out / "report.json").exists() and (out / "report.md").exists()
    assert "| fwd | S1 | numpy |" in (out / "report.md").read_text()
    second = run_python(args[:-1] + [str(tmp_path / "again"), "--compare", str(out / "report.json")])
    assert "change = old median / new median" in second.stdout


def test_report_warns_when_the_machine_was_busy():
    from fastlstm._bench import report

    machine = {"cores": 2, "cores_available": 2}
    assert report.busy_warning(dict(machine, load_before=0.1)) is None
    assert report.busy_warning(dict(machine, load_before=None)) is None
    warning = report.busy_warning(dict(machine, load_before=3.4))
    assert "3.40 on 2 cores" in warning
    info = dict(report.machine_info(1), load_before=3.4)
    setup = report.describe_setup({"machine": info, "dtype": "float32", "peak_gflops": 1.0})
    assert setup.endswith(warning)


def test_report_says_when_entries_beat_numpys_gemm():
    """% peak is relative to NumPy's BLAS: past 100%, the setup line says so; the BLAS line
    names the kernels the library chose where it tells."""
    from fastlstm._bench import report

    machine = {"cpu": "x", "cores": 2, "threads": 2, "load_before": None,
               "blas": [{"library": "openblas", "version": "0.3", "architecture": "Haswell",
                         "path": "libopenblas.so"}]}
    rows = [{"percent_of_peak": 80.0}, {"percent_of_peak": 187.4}]
    setup = report.describe_setup({"machine": machine, "dtype": "float32", "peak_gflops": 225.0,
                                   "rows": rows})
    assert "openblas 0.3 (Haswell kernels, libopenblas.so)" in setup
    assert "up to 187% of that GEMM peak" in setup
    setup = report.describe_setup({"machine": machine, "dtype": "float32", "peak_gflops": 225.0,
                                   "rows": rows[:1]})
    assert "% of that GEMM peak" not in setup


def test_command_line_rejects_unknown_names():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastlstm", "bench", "--shapes", "S9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown ['S9']" in result.stderr


def test_blas_limits_of_overlapping_calls(monkeypatch):
    """Nested or overlapping blas_threads blocks (calls from several Python threads) keep the
    smallest count asked for, and the pools get their setting back when the last block ends."""
    import threading

    from fastlstm import _threads

    class Pool:  # stands in for a threadpoolctl controller of a BLAS library
        def __init__(self, n):
            self.n = n

        def get_num_threads(self):
            return self.n

        def set_num_threads(self, n):
            self.n = n

    pools = [Pool(4), Pool(3)]
    monkeypatch.setattr(_threads, "_blas_pools", lambda: {str(k): p for k, p in enumerate(pools)})
    counts = lambda: [pool.n for pool in pools]  # noqa: E731
    entered, release = threading.Event(), threading.Event()

    def other_call():
        with _threads.blas_threads(1):
            entered.set()
            release.wait(10)

    other = threading.Thread(target=other_call)
    try:
        with _threads.blas_threads(2):
            assert counts() == [2, 2]
            other.start()
            assert entered.wait(10)
            assert counts() == [1, 1]
            with _threads.blas_threads(2):
                assert counts() == [1, 1]  # a larger request does not raise the limit
            release.set()
            other.join(10)
            assert counts() == [1, 1]  # not restored while a block still runs
        assert counts() == [4, 3]
        with _threads.blas_threads(2):  # a new first block starts from the user's setting
            assert counts() == [2, 2]
            pools.append(Pool(5))  # a library loaded while a block runs joins at its limit
            with _threads.blas_threads(2):
                assert counts() == [2, 2, 2]
        assert counts() == [4, 3, 5]
    finally:
        release.set()
        other.join(10)


def test_blas_limit_holds_in_any_python_thread():
    """A call from a worker thread limits the real BLAS pools even after another thread set them
    through threadpoolctl (which then ignores every other thread's settings)."""
    import threading

    from fastlstm import _threads

    fastlstm.available_backends()  # loads every backend's BLAS
    _threads.forget_loaded_libraries()
    libs = _threads._blas_controllers()
    assert libs, "NumPy's BLAS not found"
    before = [lib.get_num_threads() for lib in libs]
    seen = []

    def worker():
        with _threads.blas_threads(1):
            seen.append([lib.get_num_threads() for lib in libs])

    try:
        for lib in libs:
            lib.set_num_threads(2)  # this thread becomes threadpoolctl's controlling thread
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join(30)
        after = [lib.get_num_threads() for lib in libs]
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)
    assert seen == [[1] * len(libs)]
    assert after == [2] * len(libs)


def test_reference_runs_blas_on_the_call_threads(monkeypatch):
    """The reference's BLAS gets fastlstm's thread count for the call (each backend owns its
    BLAS limit now), and the user's setting is back afterwards."""
    from fastlstm import _threads
    from fastlstm._kernels import numpy_ref

    fastlstm.available_backends()
    _threads.forget_loaded_libraries()
    libs = _threads._blas_controllers()
    seen = []
    step = numpy_ref.lstm_step_forward

    def recording_step(*args):
        seen.append({lib.get_num_threads() for lib in libs})
        return step(*args)

    monkeypatch.setattr(numpy_ref, "lstm_step_forward", recording_step)
    before = [lib.get_num_threads() for lib in libs]
    args = make_problem(3, 2, 4, 5)
    try:
        for lib in libs:
            lib.set_num_threads(2)
        fastlstm.set_num_threads(1)
        fastlstm.lstm_forward(**args, backend="numpy")
        after = [lib.get_num_threads() for lib in libs]
    finally:
        fastlstm.set_num_threads(None)
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)
    assert seen == [{1}] * 3  # every step
    assert after == [2] * len(libs)


def test_recycled_memory_returns_only_when_every_view_is_gone(monkeypatch):
    from fastlstm import _scratch

    monkeypatch.setattr(_scratch, "_free", [])
    monkeypatch.setattr(_scratch, "_free_bytes", 0)
    shape = (3, 512, 256)  # 1.5 MiB of float32: above RECYCLE_MIN_BYTES
    first = _scratch.recycled(shape, np.float32)
    assert first.shape == shape and first.dtype == np.float32
    assert first.flags.c_contiguous and first.flags.writeable
    assert first.ctypes.data % 64 == 0
    address = first.ctypes.data
    view = first[1:]
    view[:] = 1.0
    del first
    second = _scratch.recycled(shape, np.float32)  # the view still holds the first block
    assert second.ctypes.data != address
    second[:] = 2.0
    assert np.all(view == 1.0)
    del view
    third = _scratch.recycled(shape, np.float32)  # now it is free
    assert third.ctypes.data == address
    del second, third
    assert _scratch._free_bytes == 2 * (np.prod(shape) * 4 + 64)


def test_recycled_pool_keeps_at_most_its_limit(monkeypatch):
    from fastlstm import _scratch

    monkeypatch.setattr(_scratch, "_free", [])
    monkeypatch.setattr(_scratch, "_free_bytes", 0)
    monkeypatch.setattr(_scratch, "RECYCLE_KEEP_BYTES", 5 << 20)
    arrays = [_scratch.recycled((1 << 20,), np.float64) for _ in range(4)]  # 8 MiB each
    del arrays
    assert _scratch._free == []  # none fits under 5 MiB
    small = [_scratch.recycled((1 << 18,), np.float64) for _ in range(4)]  # 2 MiB each
    del small
    assert len(_scratch._free) == 2 and _scratch._free_bytes <= 5 << 20
    tiny = _scratch.recycled((10,), np.float64)  # below RECYCLE_MIN_BYTES: not pooled
    assert tiny.ctypes.data % 64 == 0
    del tiny
    assert len(_scratch._free) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 1, 129)])
def test_kernel_memory_starts_on_a_cache_line(shape, dtype, monkeypatch):
    """Packed weights and per-thread output ranges must not straddle cache lines by accident
    (malloc aligns to 16 bytes): scratch, small results and copies start on 64 bytes."""
    from fastlstm import _scratch

    monkeypatch.setattr(_scratch, "_kept", threading.local())

    source = np.arange(math.prod(shape), dtype=dtype).reshape(shape)
    for name in ("test/a", "test/b"):  # a second name: not the same cached array
        kept = _scratch.scratch(name, shape, dtype)
        assert kept.ctypes.data % 64 == 0 and kept.shape == shape and kept.dtype == dtype
        assert kept.flags.c_contiguous and kept.flags.writeable
    small = _scratch.recycled(shape, dtype)
    assert small.ctypes.data % 64 == 0 and small.shape == shape and small.dtype == dtype
    copy = _scratch.aligned_copy(source)
    assert copy.ctypes.data % 64 == 0 and copy.flags.c_contiguous
    assert np.array_equal(copy, source) and copy.dtype == source.dtype
    assert not np.shares_memory(copy, source)


def test_solo_backoff_idle_burst_and_absence():
    """One thread for calls after the threads idled, until calls come close together; and for
    a while after a call whose partner was absent; threads again after a shared call."""
    from fastlstm._threads import BACKOFF_FIRST, BACKOFF_MAX, IDLE_SECONDS, WAKE_CALLS, SoloBackoff

    now = [100.0]
    backoff = SoloBackoff(BACKOFF_FIRST, BACKOFF_MAX, clock=lambda: now[0])

    def calls(n_threads, count, gap):
        used = []
        for _ in range(count):
            now[0] += gap
            used.append(backoff.threads(n_threads))
            backoff.note(used[-1], False)
        return used

    assert calls(1, 3, 0) == [1, 1, 1]
    # the threads never ran: asleep, until WAKE_CALLS calls come in a row
    assert calls(2, WAKE_CALLS + 1, IDLE_SECONDS / 2) == [1] * (WAKE_CALLS - 1) + [2, 2]
    assert calls(3, 2, 2 * IDLE_SECONDS) == [1, 1]  # asleep again: calls far apart stay alone
    # with the last of those, WAKE_CALLS calls in a row
    assert calls(3, WAKE_CALLS - 1, IDLE_SECONDS / 2) == [1] * (WAKE_CALLS - 2) + [3]
    lengths = []
    for _ in range(8):
        backoff.note(3, True)  # the partners were absent
        runs = [backoff.threads(3) for _ in range(BACKOFF_MAX + 1)]
        assert runs[-1] == 3
        lengths.append(runs.index(3))
    assert lengths[0] == BACKOFF_FIRST
    assert all(b == min(2 * a, BACKOFF_MAX) for a, b in zip(lengths, lengths[1:]))
    backoff.note(3, False)
    backoff.note(3, True)
    assert [backoff.threads(3) for _ in range(BACKOFF_FIRST + 1)] == [1] * BACKOFF_FIRST + [3]
