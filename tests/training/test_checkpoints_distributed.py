"""Resuming in a 2-process run: every process takes the first process's view of MODEL_DIR.

The first process creates `MODEL_DIR/checkpoints` right after its own check, as the
trainer's checkpointer does; the second process checks later. Both must still see "no
checkpoints yet" and meet at the same barriers (a process that saw the new directory
would open a read-only checkpoint manager, whose barrier the other never reaches).
"""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.multiprocess  # two jax.distributed processes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROCESSES = 2
LATE_SECONDS = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_late_process_sees_what_the_first_saw(tmp_path):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO, PJRT_NPROC="16")
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(port), str(index), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(PROCESSES)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for index, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, out[-5000:]
        assert f"ok process {index}" in out, out[-3000:]


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
