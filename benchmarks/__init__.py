"""Benchmarks run as `python -m benchmarks NAME` (run.sh bench NAME)."""
