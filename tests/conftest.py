"""Shared fixtures: every backend runs through the same checks against the NumPy reference."""

import os

import pytest

import fastlstm

BACKENDS = fastlstm.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each available backend by name (the reference included, so the suite checks itself)."""
    return request.param


@pytest.fixture(params=[1, 2])
def n_threads(request):
    """Run the test under 1 and under 2 threads, restoring the setting afterwards."""
    before = fastlstm.get_num_threads()
    fastlstm.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        fastlstm.set_num_threads(before)


def pytest_report_header(config):
    return [f"fastlstm {fastlstm.__version__} from {os.path.dirname(fastlstm.__file__)}; "
            f"backends: {BACKENDS}; threads: {fastlstm.get_num_threads()}"]


def pytest_terminal_summary(terminalreporter):
    from lstm_data import FINITE_DIFFERENCE_ERRORS

    if FINITE_DIFFERENCE_ERRORS:
        terminalreporter.write_line(
            f"worst finite-difference relative error of the reference gradients: "
            f"{max(FINITE_DIFFERENCE_ERRORS):.3e} over {len(FINITE_DIFFERENCE_ERRORS)} gradients"
        )
