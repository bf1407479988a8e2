"""One task's muNet / mu2Net+ search: its settings, space, operators, candidates and loop."""
