"""CI: build the sdist and, from it, the wheel, the way a packager or `pip install` from an
index does, and check them:

- the sdist holds every source file needed to build, test and benchmark, and pytest collects
  the same tests from it as from the repository;
- neither artefact carries Cython's generated C; the wheel has every compiled module;
- on a machine without a C compiler the sdist still installs, without the cython backend;
- the wheel installed without extras (so without Numba) runs on the cython backend.

Run from the repository root with `build` and pytest installed (and fastlstm, for collection).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile

# Source files that only the repository needs.
REPOSITORY_ONLY = (".ci/", ".gitignore", "docs/")
COMPILED_MODULES = ("_blas", "_lstm_cython", "_openmp_info")


def run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


def copy_sources(repo, destination):
    """Copy the files git tracks or would track; return their paths. Building from such a copy
    keeps a previous build's egg-info in the working tree from lending the sdist its file list."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                cwd=repo).split()
    for path in files:
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / path, destination / path)
    return files


def sdist_failures(sdist, files, unpack_to):
    with tarfile.open(sdist) as archive:
        archive.extractall(unpack_to, filter="data")
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    failures = []
    missing = [path for path in files
               if not path.startswith(REPOSITORY_ONLY) and path not in in_sdist]
    if missing:
        failures.append(f"sdist lacks source files: {missing}")
    generated = sorted(name for name in in_sdist if name.endswith((".c", ".so")))
    if generated:
        failures.append(f"sdist carries build outputs: {generated}")
    return failures


def wheel_failures(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    failures = []
    if any(name.endswith(".c") for name in names):
        failures.append("wheel carries Cython's generated C")
    for module in COMPILED_MODULES:
        if not any(name.startswith(f"fastlstm/_kernels/{module}.") and name.endswith(".so")
                   for name in names):
            failures.append(f"wheel lacks the compiled module {module}")
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in names):
        failures.append("wheel lacks the LICENSE")
    return failures


def collected_tests(root, scratch):
    """Node ids pytest collects in ``root``, relative to it, or the error output if collection
    failed. It runs from an empty ``scratch`` directory, because ``python -m`` puts the working
    directory first on sys.path and the installed fastlstm, not a source tree's, must be the
    one imported."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(root), str(root / "tests"), str(root / "bench")],
        cwd=scratch, capture_output=True, text=True)
    if result.returncode != 0:
        return (result.stdout + result.stderr)[-2000:]
    return sorted(line for line in result.stdout.splitlines() if "::" in line)


def collection_failures(unpacked, repo, scratch):
    from_sdist = collected_tests(unpacked, scratch)
    from_repo = collected_tests(repo, scratch)
    if isinstance(from_sdist, str):
        return [f"pytest cannot collect the sdist's tests:\n{from_sdist}"]
    if from_sdist != from_repo:
        return [f"tests collected from the sdist ({len(from_sdist)}) differ from the "
                f"repository's ({len(from_repo)})"]
    return []


# Run against the wheel built without a compiler, ahead of the installed fastlstm on sys.path.
WITHOUT_COMPILER = textwrap.dedent("""
    import numpy as np
    import fastlstm
    assert fastlstm.available_backends() == ("numpy", "numba"), fastlstm.available_backends()
    y, _, _ = fastlstm.lstm_forward(np.ones((3, 2, 4)), np.ones((4, 20)), np.ones((5, 20)),
                                    np.zeros(20))
    assert y.shape == (3, 2, 5) and np.isfinite(y).all()
""")


def without_compiler_failures(unpacked, tmp):
    """Build a wheel from the sdist with CC naming no program; it must be a pure-Python wheel
    whose fastlstm imports and runs on the other backends."""
    env = dict(os.environ, CC="fastlstm-no-such-compiler")
    try:
        run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "pure"),
             str(unpacked)], cwd=tmp, env=env)
    except subprocess.CalledProcessError as error:
        output = error.stdout + error.stderr
        return [f"without a compiler the sdist does not build:\n{output[-2000:]}"]
    wheels = [path.name for path in (tmp / "pure").glob("*.whl")]
    if len(wheels) != 1 or not wheels[0].endswith("-py3-none-any.whl"):
        return [f"without a compiler the build made {wheels}, not one pure-Python wheel"]
    target = tmp / "pure" / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
         str(tmp / "pure" / wheels[0])], cwd=tmp)
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", WITHOUT_COMPILER], cwd=tmp, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return [f"the package built without a compiler fails:\n{result.stderr[-2000:]}"]
    return []


# Run in a fresh venv where the wheel is installed without extras, so without Numba.
WITHOUT_EXTRAS = textwrap.dedent("""
    import importlib.util
    import numpy as np
    import fastlstm
    assert importlib.util.find_spec("numba") is None
    assert fastlstm.available_backends() == ("numpy", "cython"), fastlstm.available_backends()
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(shape).astype(np.float32)
            for shape in [(5, 1, 4), (4, 24), (6, 24), (24,)]]
    y, _, _ = fastlstm.lstm_forward(*args)
    want, _, _ = fastlstm.lstm_forward(*args, backend="numpy")
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
""")


def without_extras_failures(wheel, tmp):
    """Install the wheel, with its required dependencies only, into a new virtual environment:
    fastlstm must run there on the cython backend, and name the extra that adds numba."""
    venv = tmp / "without-extras"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    python = str(venv / "bin" / "python")
    try:
        run([python, "-m", "pip", "install", "--quiet", str(wheel)], cwd=tmp)
        run([python, "-c", WITHOUT_EXTRAS], cwd=tmp)
        described = run([python, "-m", "fastlstm"], cwd=tmp)
    except subprocess.CalledProcessError as error:
        output = error.stdout + error.stderr
        return [f"the wheel installed without extras fails:\n{output[-2000:]}"]
    if "pip install 'fastlstm[numba]'" not in described:
        return [f"python -m fastlstm does not name the numba extra:\n{described}"]
    return []


def main():
    repo = pathlib.Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        files = copy_sources(repo, tmp / "source")
        run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(tmp / "source")],
            cwd=tmp)
        (sdist,) = (tmp / "dist").glob("*.tar.gz")
        (wheel,) = (tmp / "dist").glob("*.whl")
        failures = sdist_failures(sdist, files, tmp / "sdist") + wheel_failures(wheel)
        (unpacked,) = (tmp / "sdist").iterdir()
        scratch = tmp / "scratch"
        scratch.mkdir()
        failures += collection_failures(unpacked, repo, scratch)
        failures += without_compiler_failures(unpacked, tmp)
        failures += without_extras_failures(wheel, tmp)
        print(f"check_dist: {sdist.name} ({sdist.stat().st_size // 1024} KiB), "
              f"{wheel.name} ({wheel.stat().st_size // 1024} KiB)")
    for failure in failures:
        print(f"check_dist: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
