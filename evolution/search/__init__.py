"""One task's muNet / mu2Net+ search: space/, data/, paths/, execution/, its iteration and loop.

Bottom to top (pyproject.toml's layers contract): the search space and its operators
(`space`), scoring and parent selection; the task's data in memory (`data`), paths as
trainable models (`paths`) and the iteration's settings (`config`); where a generation's
candidates train (`execution`) and resuming an interrupted iteration (`resume`); one task
iteration's working state (`iteration`); the loop the agents call (`loop`).
"""
