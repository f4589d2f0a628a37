"""Gatehouse benchmarks: each figure is a ratio against a reference measured in the same run.

Run with ``python -m bench`` (``--quick``, ``--only NAME``); see docs/benchmarks.md.
"""
