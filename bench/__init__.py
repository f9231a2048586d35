"""Benchmarks for pyvmm (run as ``python -m bench.<name>``, e.g. ``bench.boot``)."""
