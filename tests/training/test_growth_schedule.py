"""Growth during training: gin schedules in the trainer, resume across growth, `grow` CLI.

A tiny ViT on digits_v1 grows mid-run. Checked: the loss right after each growth equals
the loss right before it; checkpoints record the grown architecture; a run stopped before
or after a growth event and resumed ends bit-identical to an uninterrupted one; growing a
checkpoint offline (`./run.sh grow`) and resuming equals growing in-run; the same
schedule on 8 simulated devices agrees with 1 device.
"""

import dataclasses
import json
import os
import subprocess
import sys

import gin
import jax
import numpy as np
import optax
import pytest

from evogrow import main
from evogrow import train as train_lib
from models import classifier, growth_hooks, vit
from training import checkpoints, curves, data, growth_schedule, partitioning, reporting

pytestmark = pytest.mark.slow  # trains and grows a ViT several times

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCHEDULE = {
    3: ["mlp_dim=48", "num_heads=4", "qk_dim=12"],  # qk_dim rescales the queries
    5: ["hidden=32:replicate", "add_layer@1"],
}
FINAL = {"mlp_dim": 48, "num_heads": 4, "hidden": 32, "num_layers": 2}


def _model(**overrides):
    config = vit.vit_tiny(
        image_shape=(8, 8, 1),
        num_classes=10,
        patch_size=4,
        hidden=16,
        mlp_dim=32,
        num_heads=2,
        qk_dim=8,
        v_dim=8,
        num_layers=1,
        dropout_rate=0.1,
        **overrides,
    )
    return classifier.ImageClassifierModel(vit.ViT(config), optax.adam(3e-3))


def _cfg(split, shuffle=False):
    return data.DatasetConfig("digits_v1", None, split, 32, shuffle, module="tasks")


def _train(model_dir, total_steps, schedule=SCHEDULE, model=None):
    return train_lib.train(
        model=model or _model(),
        train_dataset_cfg=_cfg("train", shuffle=True),
        train_eval_dataset_cfg=None,
        infer_eval_dataset_cfg=None,
        checkpoint_cfg=checkpoints.CheckpointConfig(checkpoints.SaveCheckpointConfig(4)),
        partitioner=partitioning.Partitioner(),
        model_dir=str(model_dir),
        total_steps=total_steps,
        eval_steps=1,
        eval_period=0,
        stats_period=2,
        random_seed=5,
        growth_schedule=growth_schedule.GrowthSchedule(schedule) if schedule else None,
    )


def _assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 7-step run growing at steps 3 and 5."""
    model_dir = tmp_path_factory.mktemp("straight")
    _, state = _train(model_dir, 7)
    return model_dir, jax.device_get(state)


def test_growth_keeps_the_loss_and_records_the_architecture(straight):
    model_dir, state = straight
    events = [r for r in reporting.read_history(str(model_dir)) if r["kind"] == "growth"]
    assert [(e["step"], e["requests"]) for e in events] == sorted(SCHEDULE.items())
    for event in events:
        assert event["num_params_after"] > event["num_params_before"]
        assert event["loss_abs_delta"] <= 1e-5 * max(1.0, event["loss_before"]), event
    ckpt = checkpoints.Checkpointer(str(model_dir / "checkpoints"), read_only=True)
    meta = ckpt.read_metadata()
    assert meta["step"] == 7
    config = checkpoints.architecture_config(meta["architecture"])
    assert {k: getattr(config, k) for k in FINAL} == FINAL
    assert meta["growth_events"] == [
        {"step": s, "requests": r} for s, r in sorted(SCHEDULE.items())
    ]
    assert np.shape(state.params["block_1"]["mlp"]["wi"]["kernel"]) == (32, 48)
    png = curves.plot_training_curves(str(model_dir))
    assert os.path.getsize(png) > 0


@pytest.mark.parametrize("stop", [2, 4])  # before the first growth, between the two
def test_resume_across_growth_is_bit_identical(tmp_path, straight, stop):
    _, reference = straight
    _train(tmp_path, stop)
    step, resumed = _train(tmp_path, 7)
    assert step == 7
    _assert_same_state(reference, jax.device_get(resumed))


def test_grow_command_then_resume_equals_growing_in_run(tmp_path, straight, capsys):
    """Stage 1 stops at 3, `grow` grows its checkpoint, stage 2 resumes from the copy with
    the small model's config and the step-5 event still scheduled."""
    _, reference = straight
    _train(tmp_path / "stage1", 3, schedule=None)
    args = ["grow", "--checkpoint", str(tmp_path / "stage1"), "--out", str(tmp_path / "stage2")]
    assert main.main([*args, "--expand", ",".join(SCHEDULE[3])]) == 0
    assert "grown checkpoint" in capsys.readouterr().out
    _, resumed = _train(tmp_path / "stage2", 7)
    _assert_same_state(reference, jax.device_get(resumed))


@pytest.mark.parametrize(
    "expand, out, message",
    [
        ("hidden=48", "new", "LayerNorm"),  # 1.5x a LayerNorm model: no exact rule
        ("mlp_dim=8", "new", "shrink"),
        ("width=3", "new", "cannot parse growth request"),
        ("mlp_dim=64", "existing", "already holds checkpoints"),
    ],
)
def test_grow_command_refuses_bad_requests(tmp_path, straight, expand, out, message, capsys):
    model_dir, _ = straight
    (tmp_path / "existing" / "checkpoints" / "7").mkdir(parents=True)
    args = ["grow", "--checkpoint", str(model_dir), "--out", str(tmp_path / out)]
    assert main.main([*args, "--expand", expand]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.lower() in err.lower(), err


def test_grow_command_missing_checkpoint(tmp_path, capsys):
    args = ["grow", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
    assert main.main([*args, "--expand", "mlp_dim=64"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="step 3"):
        growth_schedule.GrowthSchedule({3: ["mlp_dim=-1"]})
    with pytest.raises(ValueError, match="positive integer"):
        growth_schedule.GrowthSchedule({0: ["mlp_dim=64"]})


def test_with_config_keeps_everything_but_the_module():
    model = _model()
    config = dataclasses.replace(growth_hooks.model_config(model), mlp_dim=64)
    grown = growth_hooks.with_config(model, config)
    assert grown.optimizer_def is model.optimizer_def
    assert grown.module.config == config and model.module.config.mlp_dim == 32
    with pytest.raises(TypeError, match="cannot build"):
        growth_hooks.with_config(model, object.__new__(type("Other", (), {})))


def _final_params(model_dir):
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
    return ckpt.restore_on_host(["params"])["params"]


@pytest.mark.multiprocess
def test_growth_on_eight_devices_matches_one_device(tmp_path):
    """The gin schedule of tests/gin/growth_vit.gin on a 4 x 2 mesh and on one device."""
    args = ["train", "--gin_file=tests/gin/growth_vit.gin"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
    env.update(
        PJRT_NPROC="16",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    eight = subprocess.Popen(
        [sys.executable, "-m", "evogrow.main", *args, "--gin.NUM_PARTITIONS=2"]
        + [f"--gin.MODEL_DIR='{tmp_path / 'eight'}'"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    gin.clear_config()
    try:
        assert main.main([*args, f"--gin.MODEL_DIR='{tmp_path / 'one'}'"]) == 0
    finally:
        gin.clear_config()
    out, _ = eight.communicate(timeout=300)
    assert eight.returncode == 0, out[-3000:]
    one, many = _final_params(tmp_path / "one"), _final_params(tmp_path / "eight")
    assert jax.tree.structure(one) == jax.tree.structure(many)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    grown = [
        r
        for r in map(json.loads, open(tmp_path / "eight" / "metrics.jsonl"))
        if r["kind"] == "growth"
    ]
    assert [r["step"] for r in grown] == [3, 5]
    assert all(r["loss_abs_delta"] <= 1e-5 * max(1.0, r["loss_before"]) for r in grown)
