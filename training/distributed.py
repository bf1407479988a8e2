"""Multi-process start-up: `jax.distributed` with gloo collectives on CPU.

Called by the launcher before anything touches a JAX device.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process JAX run (no-op for a single process).

    On CPU the cross-process collectives go through gloo, so processes on one machine
    (loopback) or several hosts train one model together.

    Args:
      coordinator_address: "host:port" of process 0, e.g. "127.0.0.1:12345".
      num_processes: number of processes.
      process_id: this process's index in [0, num_processes).
    """
    if num_processes <= 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
