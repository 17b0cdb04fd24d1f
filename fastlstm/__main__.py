"""Command line.

``python -m fastlstm`` (or ``info``) prints the version, backends and thread settings;
``python -m fastlstm bench`` times the backends and the peers side by side and writes a report;
``python -m fastlstm warm`` compiles the numba backend's kernels into Numba's on-disk cache.
"""

import argparse
import json
import shlex
import sys

from . import __version__, _backends, _threads


def describe():
    """Lines describing this installation: version, backends (and why any is missing), threads."""
    import numpy as np

    lines = [f"fastlstm {__version__} (numpy {np.__version__}, python {sys.version.split()[0]})"]
    lines.append(f"available backends: {', '.join(_backends.available_backends())}")
    for name, reason in _backends.unavailable_backends().items():
        lines.append(f"  {name}: unavailable ({reason})")
    lines.append(f"threads: {_threads.get_num_threads()} (fastlstm.set_num_threads)")
    try:
        from ._kernels import _openmp_info

        openmp = "yes" if _openmp_info.openmp_enabled() else "no"
        lines.append(f"compiled extensions: built, OpenMP {openmp}")
    except ImportError as exc:
        lines.append(f"compiled extensions: missing ({exc})")
    if "numba" in _backends.available_backends():
        from ._kernels import numba_backend

        lines.append(f"numba kernel cache: {numba_backend.cache_dir()} "
                     "(python -m fastlstm warm fills it)")
    if "cython" in _backends.available_backends():
        from ._kernels import _lstm_cython

        lines.append(f"cython kernels: {_lstm_cython.isa()} build "
                     f"(best for this CPU: {_lstm_cython.cpu_isa()}; FASTLSTM_DISABLE_SIMD=1 "
                     "forces portable)")
    for lib in _threads._blas_controllers():
        lines.append(
            f"BLAS: {lib.internal_api} {lib.version} ({lib.threading_layer}), "
            f"{lib.num_threads} threads, {lib.filepath}"
        )
    return lines


def _names(known):
    def parse(text):
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
        return names

    return parse


def _progress_bar(stream):
    def show(done, total, label, width=30):
        filled = width * done // max(total, 1)
        bar = "#" * filled + "." * (width - filled)
        end = "\n" if done == total or not stream.isatty() else ""
        stream.write(f"\r[{bar}] {done}/{total} {label:<28}{end}")
        stream.flush()

    return show


def bench(args, argv):
    import numpy as np

    from ._bench import report, runner
    from ._bench.problems import SHAPES

    dtype = np.dtype(args.dtype)
    shapes = [SHAPES[name] for name in args.shapes]
    budget = runner.QUICK if args.quick else runner.FULL
    print(f"fastlstm {__version__} bench: {', '.join(args.ops)} on {', '.join(args.shapes)}, "
          f"{dtype}, {args.threads} threads", flush=True)
    load_before = report.load_average()
    entries, skipped, peak = runner.run(shapes, args.backends, args.ops, dtype, args.threads,
                                        budget, progress=_progress_bar(sys.stderr))
    result = {
        "command": "python -m fastlstm " + shlex.join(argv),
        "dtype": str(dtype),
        "quick": args.quick,
        "machine": dict(report.machine_info(args.threads), load_before=load_before),
        "peak_gflops": peak,
        "skipped": skipped,
        "rows": report.summarize(entries, peak, str(dtype)),
    }
    print(report.describe_setup(result))
    for name, why in skipped.items():
        print(f"{name}: {why}")
    print(report.format_table(result["rows"]))
    paths = report.save(result, args.out)
    print(f"report: {paths['json']}, {paths['markdown']}, "
          + (paths["plot"] or "no plot (pip install matplotlib)"))
    if args.compare:
        with open(args.compare) as f:
            print("\n".join(report.compare(result, json.load(f))))
    return 0


def warm():
    """Compile (or load) every numba kernel, so that later processes find them cached."""
    import time

    if "numba" not in _backends.available_backends():
        reason = _backends.unavailable_backends().get("numba", "not installed")
        print(f"numba backend unavailable ({reason}): nothing to compile")
        return 1
    from ._kernels import numba_backend

    start = time.perf_counter()
    calls = numba_backend.warm_up()
    print(f"numba kernels compiled or loaded by {calls} calls in "
          f"{time.perf_counter() - start:.1f} s; cached in {numba_backend.cache_dir()}")
    return 0


def main(argv=None):
    from ._bench.implementations import IMPLEMENTATIONS
    from ._bench.problems import DEFAULT_OPS, OPS, SHAPES

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastlstm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("info", help="version, backends and thread settings (the default)")
    commands.add_parser("warm", help="compile the numba kernels into Numba's on-disk cache, "
                                     "so that new processes start without compiling")
    run = commands.add_parser("bench", help="time backends and peers, write a report")
    run.add_argument("--shapes", type=_names(list(SHAPES)), default=list(SHAPES),
                     help="comma-separated, from " + ",".join(SHAPES) + " (default: all)")
    run.add_argument("--backends", type=_names(list(IMPLEMENTATIONS)),
                     default=list(IMPLEMENTATIONS),
                     help="implementations, from " + ",".join(IMPLEMENTATIONS) + " (default: all)")
    run.add_argument("--ops", type=_names(list(OPS)), default=list(DEFAULT_OPS),
                     help="from " + ",".join(OPS) + " (default: " + ",".join(DEFAULT_OPS) + ")")
    run.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    run.add_argument("--threads", type=int, default=_threads.get_num_threads(),
                     help="threads for every implementation (default: all cores)")
    run.add_argument("--quick", action="store_true", help="fewer repetitions (about 1 minute)")
    run.add_argument("--out", default="bench-report", help="report folder (default: bench-report)")
    run.add_argument("--compare", metavar="OLD.json", help="show the change against a report")
    args = parser.parse_args(argv)
    if args.command == "bench":
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        return bench(args, argv)
    if args.command == "warm":
        return warm()
    print("\n".join(describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
