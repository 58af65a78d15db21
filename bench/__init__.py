"""Benchmarks against the tools people use instead. ``make bench`` (``python -m bench``) runs them all."""
