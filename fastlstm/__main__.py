"""Command line: ``python -m fastlstm`` prints the version, backends and thread settings."""

import argparse
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
    for lib in _threads._blas_controllers():
        lines.append(
            f"BLAS: {lib.internal_api} {lib.version} ({lib.threading_layer}), "
            f"{lib.num_threads} threads, {lib.filepath}"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastlstm", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info"])
    parser.parse_args(argv)
    print("\n".join(describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
