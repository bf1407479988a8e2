"""Runs one benchmark: `python -m benchmarks NAME [ARGS]`; the JSON result is the last line."""

from __future__ import annotations

import importlib
import sys

# benchmark name -> module with a `main(argv) -> int`.
BENCHMARKS = {
    "trainer": "benchmarks.trainer",
    "growth": "benchmarks.growth",
    "staged": "benchmarks.staged",
    "munet": "benchmarks.munet",
    "munet_text": "benchmarks.munet_text",
    "agents": "benchmarks.agents",
}


def main(argv: list[str]) -> int:
    """Dispatches to the named benchmark.

    Args:
      argv: [NAME, benchmark arguments...].

    Returns:
      the exit status.
    """
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [ARGS]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
