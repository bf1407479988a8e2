"""Runs a test module's body as N jax.distributed processes on this host and checks each.

The module is started as `python MODULE PORT INDEX *ARGS` (its `__main__` calls the
body); every process must exit 0 and print `ok process INDEX`.
"""

import os
import socket
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the coordinator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    module: str, count: int, *args: str, env: dict[str, str], timeout: float = 600
) -> None:
    """Starts `count` processes of `module` with one coordinator port; asserts each passed.

    Args:
      module: the test module's file.
      count: the number of processes.
      *args: further arguments after PORT and INDEX.
      env: variables set on top of this environment (PYTHONPATH is the repo).
      timeout: seconds each process may run.
    """
    # The repo for the packages, tests/ for the test libraries the module imports.
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS]), **env}
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(module), str(port), str(index), *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(count)
    ]
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for index, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, out[-5000:]
        assert f"ok process {index}" in out, out[-3000:]
