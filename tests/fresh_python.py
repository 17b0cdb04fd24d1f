"""Run Python in a new process that imports the same fastlstm as the tests."""

import os
import subprocess
import sys
import tempfile
import textwrap

import fastlstm

# The directory holding the fastlstm package the tests import. The child starts in a scratch
# directory (``python -c`` and ``-m`` put the working directory first on sys.path, and the
# repository root holds an uncompiled source tree) and finds fastlstm through PYTHONPATH.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastlstm.__file__)))


def run_python(args, env=None, timeout=300):
    """Run ``python ARGS`` (``args`` a list, or a code string for ``-c``); return the
    CompletedProcess after checking that it exited 0."""
    if isinstance(args, str):
        args = ["-c", textwrap.dedent(args)]
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [_PACKAGE_PARENT, child_env.get("PYTHONPATH")])
    )
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                                env=child_env, cwd=scratch, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result
