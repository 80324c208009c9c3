"""Benchmarks for zoprivacy (run as modules: python -m benchmarks.<name>)."""
