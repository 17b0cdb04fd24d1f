"""Benchmark machinery shared by ``python -m fastlstm bench``, ``bench/`` and the tests."""
