"""CI: build the sdist and, from it, the wheel, the way a packager or `pip install` from an
index does; check that the sdist holds every source file needed to build, test and benchmark,
that the tests collected from it are the repository's, and that neither artefact carries
Cython's generated C. Run from the repository root with `build` and pytest installed.
"""

import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# Source files that only the repository needs.
REPOSITORY_ONLY = (".ci/", ".gitignore", "docs/")
COMPILED_MODULES = ("_blas", "_lstm_cython", "_openmp_info")


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


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


def main():
    repo = pathlib.Path.cwd()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        # Built from a copy of the source files alone: a previous build's egg-info in the
        # working tree would otherwise lend the sdist its file list.
        source = tmp / "source"
        files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                    cwd=repo).split()
        for path in files:
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / path, source / path)
        run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(source)], cwd=tmp)
        (sdist,) = (tmp / "dist").glob("*.tar.gz")
        (wheel,) = (tmp / "dist").glob("*.whl")

        with tarfile.open(sdist) as archive:
            archive.extractall(tmp / "sdist", filter="data")
            in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        missing = [path for path in files
                   if not path.startswith(REPOSITORY_ONLY) and path not in in_sdist]
        if missing:
            failures.append(f"sdist lacks source files: {missing}")
        generated = sorted(name for name in in_sdist if name.endswith((".c", ".so")))
        if generated:
            failures.append(f"sdist carries build outputs: {generated}")

        in_wheel = zipfile.ZipFile(wheel).namelist()
        if any(name.endswith(".c") for name in in_wheel):
            failures.append("wheel carries Cython's generated C")
        for module in COMPILED_MODULES:
            if not any(name.startswith(f"fastlstm/_kernels/{module}.") and name.endswith(".so")
                       for name in in_wheel):
                failures.append(f"wheel lacks the compiled module {module}")
        if not any(name.endswith(".dist-info/licenses/LICENSE") for name in in_wheel):
            failures.append("wheel lacks the LICENSE")

        (unpacked,) = (tmp / "sdist").iterdir()
        scratch = tmp / "scratch"
        scratch.mkdir()
        from_sdist = collected_tests(unpacked, scratch)
        from_repo = collected_tests(repo, scratch)
        if isinstance(from_sdist, str):
            failures.append(f"pytest cannot collect the sdist's tests:\n{from_sdist}")
        elif from_sdist != from_repo:
            failures.append(f"tests collected from the sdist ({len(from_sdist)}) differ from the "
                            f"repository's ({len(from_repo)})")
        print(f"check_dist: {sdist.name} ({sdist.stat().st_size // 1024} KiB), "
              f"{wheel.name} ({wheel.stat().st_size // 1024} KiB), "
              f"{len(from_repo)} tests collected from the repository")
    for failure in failures:
        print(f"check_dist: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
