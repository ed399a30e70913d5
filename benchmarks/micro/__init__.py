"""Micro-benchmarks: one component or one engine-level comparison each, run as `python -m`."""
