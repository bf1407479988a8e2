"""Benchmarks run as `python -m evogrow.bench NAME` (run.sh bench NAME)."""
