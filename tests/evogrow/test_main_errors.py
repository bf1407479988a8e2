"""Bad input through the real entry point: checkpoints cannot run code, a misspelled macro
or an out-of-range setting is refused, and each user error is one line without traceback.

Checkpoints are written directly with `Checkpointer.save` (the metadata is what matters),
so every refusal is tested without training.
"""

import os
import pathlib
import re
import subprocess
import sys
import types

import gin
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import trainer_testlib  # noqa: F401 - registers the toy task the toy gin files use
from tiny_vit_testlib import TINY_VIT, random_params

from evogrow import main
from evolution.roots import seeding
from evolution.store import param_files
from evolution.store import sqlite as sqlite_store
from evolution.system import families
from models import vit
from training import checkpoints, lr_schedule, settings

REPO = pathlib.Path(__file__).resolve().parents[2]
TOY = "tests/gin/trainer_toy.gin"


@pytest.fixture(autouse=True)
def _fresh_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _write_checkpoint(directory, step, metadata):
    """A checkpoint at `step` with a tiny params tree and the given JSON metadata."""
    state = types.SimpleNamespace(
        params={"w": np.zeros((2, 3), np.float32)}, opt_state={"count": np.zeros((), np.int32)}
    )
    writer = checkpoints.Checkpointer(
        str(directory), checkpoints.SaveCheckpointConfig(period=0, async_save=False)
    )
    writer.save(step, state, metadata)
    writer.close()


def _one_line_error(capsys, argv):
    """Runs the launcher; asserts exit 2 and a single `error:` line; returns that line."""
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------- code in checkpoint metadata


FOREIGN_CLASSES = {
    "subprocess.Popen": lambda marker: {"args": ["touch", marker]},
    "os.system": lambda marker: {"command": f"touch {marker}"},
    "builtins.eval": lambda marker: {"source": f"open({marker!r}, 'w')"},
}


@pytest.mark.parametrize("config_class", sorted(FOREIGN_CLASSES))
def test_checkpoint_naming_a_foreign_class_is_refused_and_nothing_runs(
    config_class, tmp_path, capsys
):
    marker = str(tmp_path / "executed")
    architecture = {"config_class": config_class, "config": FOREIGN_CLASSES[config_class](marker)}
    source = tmp_path / "run" / "checkpoints"
    _write_checkpoint(source, 4, {"architecture": architecture, "seed": 0})

    with pytest.raises(checkpoints.CheckpointMetadataError, match="not an evogrow"):
        checkpoints.architecture_config(architecture)
    argv = ["grow", "--checkpoint", str(tmp_path / "run"), "--expand", "mlp_dim=256"]
    line = _one_line_error(capsys, [*argv, "--out", str(tmp_path / "out")])
    assert config_class in line and "refusing" in line
    assert not os.path.exists(marker)
    assert not (tmp_path / "out").exists()


def test_foreign_class_through_run_sh_prints_no_traceback(tmp_path):
    marker = tmp_path / "executed"
    architecture = {"config_class": "subprocess.Popen", "config": {"args": ["touch", str(marker)]}}
    _write_checkpoint(tmp_path / "run" / "checkpoints", 4, {"architecture": architecture})
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOGROW_VENV": sys.prefix}
    result = subprocess.run(
        [str(REPO / "run.sh"), "grow", "--checkpoint", str(tmp_path / "run")]
        + ["--expand", "mlp_dim=256", "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # TensorFlow's and XLA's C++ start-up lines are not the launcher's; the rest is one line.
    ours = [
        line
        for line in result.stderr.splitlines()
        if not re.match(r"[IWE]\d{4} |WARNING: All log messages before absl", line)
    ]
    assert len(ours) == 1, result.stderr
    assert ours[0].startswith("error: the checkpoint names config_class 'subprocess.Popen'")
    assert not marker.exists()


def test_project_config_classes_still_load_by_their_recorded_names():
    config = vit.ViTConfig(hidden=32, num_heads=2, qk_dim=16, v_dim=16, mlp_dim=64)
    recorded = {
        "config_class": "models.vit.ViTConfig",  # the name checkpoints hold today
        "config": checkpoints.architecture_metadata_of_config(config),
    }
    assert checkpoints.architecture_config(recorded) == config
    with pytest.raises(checkpoints.CheckpointMetadataError, match="not fields"):
        checkpoints.architecture_config({**recorded, "config": {"no_such_field": 1}})


def test_store_dtype_names_are_only_numeric_dtypes():
    assert families._dtype_named("bfloat16") is jnp.bfloat16
    for name in ("save", "object", "O", "load"):
        with pytest.raises(ValueError, match="dtype"):
            families._dtype_named(name)
    assert param_files._dtype_from_name("bfloat16") == np.dtype(ml_dtypes.bfloat16)
    for name in ("O", "object", "finfo"):
        with pytest.raises(ValueError, match="dtype"):
            param_files._dtype_from_name(name)


# ----------------------------------------------------------------- misspelled gin macros


def test_misspelled_macro_is_refused_with_the_close_name(tmp_path, capsys):
    argv = ["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{tmp_path / 'm'}'"]
    line = _one_line_error(capsys, [*argv, "--gin.TRAIN_STPES=20"])
    assert "TRAIN_STPES" in line and "did you mean TRAIN_STEPS?" in line
    assert not (tmp_path / "m").exists()


def test_unused_lowercase_macro_is_refused_too(tmp_path, capsys):
    argv = ["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{tmp_path / 'm'}'"]
    line = _one_line_error(capsys, [*argv, "--gin.train_steps=20"])
    assert "train_steps" in line and "no gin file or binding uses" in line


# ------------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("TRAIN_STEPS=0", "TRAIN_STEPS=0"),
        ("TRAIN_STEPS=-5", "TRAIN_STEPS=-5"),
        ("TRAIN_STEPS=20.5", "TRAIN_STEPS=20.5 (total_steps of the schedule) is a float"),
        ('TRAIN_STEPS="20"', "TRAIN_STEPS='20' (total_steps of the schedule) is a quoted"),
        ("WARMUP_STEPS=40", "WARMUP_STEPS=40 is not below TRAIN_STEPS=40"),
        ("WARMUP_STEPS=-1", "WARMUP_STEPS=-1"),
        ("BATCH_SIZE=0", "BATCH_SIZE=0"),
        ("BATCH_SIZE=-32", "BATCH_SIZE=-32"),
        ('BATCH_SIZE="32"', "BATCH_SIZE='32' (or EVAL_BATCH_SIZE: the batch size of the"),
        ("EVAL_PERIOD=-1", "EVAL_PERIOD=-1"),
        ("CHECKPOINT_PERIOD=2.5", "CHECKPOINT_PERIOD=2.5"),
        ("NUM_PARTITIONS=-1", "num_partitions=-1 (NUM_PARTITIONS)"),
    ],
)
def test_bad_setting_is_one_line_naming_it_and_creates_nothing(binding, expected, tmp_path, capsys):
    model_dir = tmp_path / "m"
    argv = ["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.{binding}"]
    line = _one_line_error(capsys, argv)
    assert expected in line and "valid" in line.lower()
    assert not model_dir.exists()


def test_warmup_schedule_is_optax_when_valid_and_refused_when_not_shorter():
    mine = lr_schedule.warmup_cosine_decay(peak_value=1e-3, warmup_steps=5, total_steps=40)
    ref = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 40, end_value=0.0)
    assert [float(mine(s)) for s in range(41)] == [float(ref(s)) for s in range(41)]
    no_warmup = lr_schedule.warmup_cosine_decay(peak_value=1.0, warmup_steps=0, total_steps=10)
    assert float(no_warmup(0)) == 1.0 and float(no_warmup(10)) == 0.0
    with pytest.raises(settings.SettingError, match=r"0 <= WARMUP_STEPS < 40"):
        lr_schedule.warmup_cosine_decay(peak_value=1e-3, warmup_steps=200, total_steps=40)


def test_steps_below_an_existing_checkpoint_are_refused(tmp_path, capsys):
    model_dir = tmp_path / "m"
    _write_checkpoint(model_dir / "checkpoints", 30, {"seed": 0, "growth_events": []})
    argv = ["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=20"]
    line = _one_line_error(capsys, argv)
    assert "TRAIN_STEPS=20 is below the latest checkpoint (step 30)" in line
    assert sorted(p.name for p in model_dir.iterdir()) == ["checkpoints"]


# --------------------------------------------------------------- one-line user errors


def test_training_into_a_foreign_directory_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "exported"
    _write_checkpoint(model_dir / "checkpoints", 0, {"system": {"routes": []}})
    argv = ["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{model_dir}'"]
    line = _one_line_error(capsys, argv)
    assert "not written by evogrow's trainer" in line and "exported system" in line
    assert "KeyError" not in line


def _eval_argv(checkpoint_path, output_dir, *extra):
    return [
        "eval",
        "--gin_file=tests/gin/trainer_toy_model.gin",
        "--gin_file=gin/runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{checkpoint_path}'",
        f"--gin.EVAL_OUTPUT_DIR='{output_dir}'",
        "--gin.BATCH_SIZE=16",
        "--gin.MIXTURE_OR_TASK_NAME='trainer_toy_v1'",
        "--gin.MIXTURE_OR_TASK_MODULE='trainer_testlib'",
        "--gin.TASK_FEATURE_LENGTHS=None",
        *extra,
    ]


def test_eval_of_a_missing_checkpoint_step_is_one_line(tmp_path, capsys):
    _write_checkpoint(tmp_path / "run" / "checkpoints", 2, {"seed": 0})
    argv = _eval_argv(tmp_path / "run", tmp_path / "eval", "--gin.CHECKPOINT_STEP=7")
    line = _one_line_error(capsys, argv)
    assert "no checkpoint at step 7" in line and "its steps: 2" in line
    gin.clear_config()
    line = _one_line_error(capsys, _eval_argv(tmp_path / "nowhere", tmp_path / "eval"))
    assert "no checkpoint directory" in line
    assert not (tmp_path / "eval").exists()


def test_export_of_a_system_without_a_task_of_the_mixture_is_one_line(tmp_path, capsys):
    store_dir = tmp_path / "store"
    with sqlite_store.SqliteStore(str(store_dir)) as store:
        seeding.seed_root(store, TINY_VIT, random_params(1), agent="root")
    argv = [
        "export_system",
        "--gin_file=gin/evolution/export_system.gin",
        f"--gin.STORE_DIR='{store_dir}'",
        f"--gin.MODEL_DIR='{tmp_path / 'system'}'",
        "--gin.MIXTURE_OR_TASK_NAME='digits_rgb32_v1'",
    ]
    line = _one_line_error(capsys, argv)
    assert "['digits_rgb32_v1'] have no active path in the store" in line
    assert not (tmp_path / "system" / "checkpoints").exists()


def test_store_location_errors_do_not_repeat_a_password():
    postgres_store = pytest.importorskip("evolution.store.postgres")
    with pytest.raises(ValueError) as raised:
        postgres_store.split_location("postgresql://evogrow:s3cret@db:5432/evo")
    assert "s3cret" not in str(raised.value) and "evogrow:***@db" in str(raised.value)
    query = postgres_store.redacted("postgresql://db/evo?password=s3cret&params_dir=/d")
    assert "s3cret" not in query and "params_dir=/d" in query


def test_batch_size_not_dividing_over_the_devices_is_a_setting_error():
    code = (
        "from training import partitioning, settings\n"
        "try:\n"
        "    partitioning.Partitioner().get_data_layout(30)\n"
        "except settings.SettingError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert "batch size 30 is not divisible by the 8 data replicas" in result.stdout, result.stderr
    assert "use a multiple of 8" in result.stdout
