"""Build the Cython extensions under fastlstm/_kernels/.

Every ``fastlstm/_kernels/*.pyx`` becomes an extension, compiled with -O3 and with OpenMP
when the compiler accepts -fopenmp. Never with -ffast-math: linking it sets flush-to-zero for
the whole process that loads the module (DESIGN.md §6).

Debug information is left out (-g0): it is four fifths of the modules' size, and the wheel goes
into inference images where size counts. ``FASTLSTM_DEBUG_SYMBOLS=1`` at build time keeps it.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def compiler_has_openmp():
    """Whether the C compiler used for extensions compiles and links an OpenMP program."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return False
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run(
            [compiler, "-fopenmp", path, "-o", os.path.join(tmp, "check_openmp")],
            capture_output=True,
        )
    return result.returncode == 0


def extensions():
    openmp = sys.platform != "win32" and compiler_has_openmp()
    openmp_flags = ["-fopenmp"] if openmp else []
    if not openmp:
        print("fastlstm: compiler has no OpenMP; building single-threaded kernels", file=sys.stderr)
    keep_debug = os.environ.get("FASTLSTM_DEBUG_SYMBOLS", "0") not in ("", "0")
    debug_flags = [] if keep_debug else ["-g0"]
    modules = []
    for pyx in sorted(glob.glob(os.path.join("fastlstm", "_kernels", "*.pyx"))):
        name = pyx[: -len(".pyx")].replace(os.sep, ".")
        modules.append(
            Extension(
                name,
                [pyx],
                include_dirs=[np.get_include(), os.path.join("fastlstm", "_kernels")],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"] + debug_flags + openmp_flags,
                extra_link_args=openmp_flags,
                depends=glob.glob(os.path.join("fastlstm", "_kernels", "csrc", "*.h")),
            )
        )
    return cythonize(
        modules,
        compiler_directives={"language_level": 3},
    )


setup(ext_modules=extensions())
