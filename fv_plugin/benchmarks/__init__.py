"""Benchmarks, run as commands (``fv bench ...``)."""
