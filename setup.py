"""Build the Cython extensions under fastlstm/_kernels/.

Every ``fastlstm/_kernels/*.pyx`` becomes an extension, compiled with -O3 and with OpenMP
when the compiler accepts -fopenmp. Never with -ffast-math: linking it sets flush-to-zero for
the whole process that loads the module (DESIGN.md §6). Where no C compiler is found, the
package installs without them: the cython backend is then absent and the others work.

Debug information is left out (-g0): it is four fifths of the modules' size, and the wheel goes
into inference images where size counts. ``FASTLSTM_DEBUG_SYMBOLS=1`` at build time keeps it.
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup


def c_compiler():
    """The C compiler command setuptools runs for extensions (``CC`` overrides the one Python
    was built with), as a list; None on Windows, where setuptools finds MSVC itself."""
    if sys.platform == "win32":
        return None
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def compiler_has_openmp(compiler):
    """Whether ``compiler`` compiles and links an OpenMP program."""
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run(
            [*compiler, "-fopenmp", path, "-o", os.path.join(tmp, "check_openmp")],
            capture_output=True,
        )
    return result.returncode == 0


def extensions():
    compiler = c_compiler()
    if compiler is not None and shutil.which(compiler[0]) is None:
        print(f"fastlstm: no C compiler ({compiler[0]} not found); installing without the "
              "cython backend (numpy and numba only)", file=sys.stderr)
        return []
    openmp = compiler is not None and compiler_has_openmp(compiler)
    openmp_flags = ["-fopenmp"] if openmp else []
    if not openmp:
        print("fastlstm: compiler has no OpenMP; building single-threaded kernels", file=sys.stderr)
    keep_debug = os.environ.get("FASTLSTM_DEBUG_SYMBOLS", "0") not in ("", "0")
    # MSVC adds no debug information unless asked, and knows no -g0.
    debug_flags = [] if keep_debug or compiler is None else ["-g0"]
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
