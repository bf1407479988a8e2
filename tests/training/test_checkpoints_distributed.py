"""Resuming in a 2-process run: every process takes the first process's view of MODEL_DIR.

The first process creates `MODEL_DIR/checkpoints` right after its own check, as the
trainer's checkpointer does; the second process checks later. Both must still see "no
checkpoints yet" and meet at the same barriers (a process that saw the new directory
would open a read-only checkpoint manager, whose barrier the other never reaches).
"""

import os
import sys

import pytest
from multiprocess_testlib import run_processes

pytestmark = pytest.mark.multiprocess  # two jax.distributed processes

PROCESSES = 2
LATE_SECONDS = 3.0


def test_a_late_process_sees_what_the_first_saw(tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", "PJRT_NPROC": "16"}
    # One CPU device per process: no forced device count from the calling environment.
    env["XLA_FLAGS"] = ""
    run_processes(__file__, PROCESSES, str(tmp_path), env=env, timeout=300)


# ------------------------------------------------------------ the subprocesses' body
def _child(port: int, index: int, model_dir: str) -> None:
    import time

    from training import distributed

    distributed.initialize(f"127.0.0.1:{port}", PROCESSES, index)

    from jax.experimental import multihost_utils

    from training import checkpoints

    if index == 1:
        time.sleep(LATE_SECONDS)
    latest = checkpoints.check_resumable(model_dir, total_steps=10)
    assert latest is None, latest
    if index == 0:
        os.makedirs(os.path.join(model_dir, "checkpoints"))
    multihost_utils.sync_global_devices("after the resume check")
    print(f"ok process {index}", flush=True)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
