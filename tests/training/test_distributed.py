"""Same training on 1 device, 8 simulated devices (data x model mesh), and 2 processes.

The test-local toy MLP (tests/gin/trainer_toy.gin; a ViT takes minutes here) goes
through `python -m evogrow.main train`, in subprocesses where the device count or
`jax.distributed` must differ. Dropout is off and the train stream unshuffled: with
several processes each global batch holds the same examples in another row order, which
only permutes float sums.
"""

import os
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import trainer_testlib as tl
from multiprocess_testlib import free_port

from evogrow import main
from training import checkpoints, partitioning, reporting, trainer

pytestmark = pytest.mark.multiprocess  # subprocesses and jax.distributed

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STEPS = 30
ARGS = [
    "train",
    "--gin_file=tests/gin/trainer_toy.gin",
    "--gin.ToyConfig.dropout=0.0",
    "--gin.SHUFFLE_TRAIN_EXAMPLES=False",
    f"--gin.TRAIN_STEPS={STEPS}",
    f"--gin.EVAL_PERIOD={STEPS}",
    f"--gin.CHECKPOINT_PERIOD={STEPS}",
]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    env.pop("XLA_FLAGS", None)
    env.update(PJRT_NPROC="16", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", **extra)
    return env


def _launch(model_dir, *flags, env):
    cmd = [sys.executable, "-m", "evogrow.main", *ARGS, f"--gin.MODEL_DIR='{model_dir}'", *flags]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(proc):
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]


def _final_params(model_dir):
    """Restores the last params onto this process's one device, building the model from
    the architecture the checkpoint recorded."""
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
    meta = ckpt.read_metadata()
    assert meta["step"] == STEPS
    config = checkpoints.architecture_config(meta["architecture"])
    model = tl.ToyClassifier(tl.ToyMLP(config))
    shapes, types = tl.toy_inputs(32)
    p = partitioning.Partitioner(logical_axis_rules=tl.TOY_RULES)
    t = trainer.Trainer(model, p, shapes, types, jax.random.key(0))
    items, _ = ckpt.restore(
        {"params": partitioning.with_shardings(t.abstract_state, t.state_shardings).params}
    )
    return jax.device_get(items["params"])


def _final_train_loss(model_dir):
    return [r for r in reporting.read_history(model_dir) if r["kind"] == "train"][-1]["loss"]


def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
    dirs = {name: str(tmp_path / name) for name in ("one", "eight", "procs")}
    eight = _launch(
        dirs["eight"],
        "--gin.NUM_PARTITIONS=2",  # a 4 x 2 (data x model) mesh
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    port = free_port()
    procs = [
        _launch(
            dirs["procs"],
            f"--coordinator_address=127.0.0.1:{port}",
            "--process_count=2",
            f"--process_index={i}",
            env=_env(),
        )
        for i in range(2)
    ]
    gin.clear_config()
    try:
        assert main.main([*ARGS, f"--gin.MODEL_DIR='{dirs['one']}'"]) == 0
    finally:
        gin.clear_config()
    for proc in [eight, *procs]:
        _wait(proc)

    reference = _final_params(dirs["one"])
    reference_loss = _final_train_loss(dirs["one"])
    for name in ("eight", "procs"):
        params = _final_params(dirs[name])
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=name)
        assert abs(_final_train_loss(dirs[name]) - reference_loss) < 1e-4, name
