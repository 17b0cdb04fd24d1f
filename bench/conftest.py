"""Benchmark suite settings.

``pytest bench/ --benchmark-json=out.json`` (or ``--benchmark-enable``) times the DESIGN.md §4
shapes. A plain ``pytest`` run has benchmarks disabled (pyproject's addopts): each case then
runs once, on the same shapes cut to two time steps, as a smoke test that keeps the suite alive.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("benchmark_json", None) or config.getoption("benchmark_only", False):
        config.option.benchmark_disable = False


def pytest_report_header(config):
    mode = "disabled (smoke run)" if config.option.benchmark_disable else "enabled"
    return [f"fastlstm benchmarks: {mode}"]
