"""t5x's own train / eval / infer binaries run an evogrow tiny model (gin/t5x/tiny_*.gin).

Skipped unless t5x is importable (it is not on PyPI; docs/usage.md, "Using t5x"). Each binary runs
as `python -m t5x.<binary>` in a subprocess with the repository on PYTHONPATH, exactly as
a user would launch it, for a few steps on the offline `digits_v1` task.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import pytest

pytestmark = pytest.mark.multiprocess  # t5x's binaries in subprocesses

t5x = pytest.importorskip("t5x")

ROOT = Path(__file__).resolve().parents[2]
TRAIN_STEPS = 4  # tiny_train.gin saves every 2 steps
NUM_CLASSES = 10  # digits_v1


def _run(binary: str, gin_file: str, *bindings: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable,
        "-m",
        f"t5x.{binary}",
        "--gin_search_paths=gin",
        f"--gin_file=gin/t5x/{gin_file}",
        *(f"--gin.{b}" for b in bindings),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.parametrize("binary", ["train", "eval", "infer"])
def test_gin_file_parses(binary, monkeypatch):
    # t5x's run files bind `__main__.<fn>` of the binary, so parse as that binary would.
    monkeypatch.setitem(sys.modules, "__main__", importlib.import_module(f"t5x.{binary}"))
    monkeypatch.chdir(ROOT)
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(Path(t5x.__file__).parents[1]))
        gin.parse_config_file(f"gin/t5x/tiny_{binary}.gin")
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "digits_v1"
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Trains the tiny model with t5x.train; returns its MODEL_DIR."""
    path = tmp_path_factory.mktemp("t5x_tiny")
    _run("train", "tiny_train.gin", f"MODEL_DIR='{path}'", f"TRAIN_STEPS={TRAIN_STEPS}")
    return path


def test_train_writes_checkpoints_and_metrics(model_dir):
    checkpoints = sorted(p.name for p in model_dir.glob("checkpoint_*"))
    assert f"checkpoint_{TRAIN_STEPS}" in checkpoints, checkpoints
    assert (model_dir / "config.gin").is_file()
    assert any((model_dir / "train").iterdir()), "no train summaries written"
    # Inference eval during training (ClassificationEvaluator) every 2 steps.
    lines = (model_dir / "inference_eval" / "digits_v1-metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]


def test_eval_reports_accuracy(model_dir, tmp_path):
    _run(
        "eval",
        "tiny_eval.gin",
        f"CHECKPOINT_PATH='{model_dir / f'checkpoint_{TRAIN_STEPS}'}'",
        f"EVAL_OUTPUT_DIR='{tmp_path}'",
    )
    lines = (tmp_path / "inference_eval" / "digits_v1-metrics.jsonl").read_text().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics["step"] == TRAIN_STEPS
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["log_likelihood"] <= 0.0
    assert metrics["num_examples"] > 0


def test_infer_writes_one_line_per_example(model_dir, tmp_path):
    # mode 'score' runs score_batch, which test_eval_reports_accuracy already exercises.
    mode = "predict"
    _run(
        "infer",
        "tiny_infer.gin",
        f"CHECKPOINT_PATH='{model_dir / f'checkpoint_{TRAIN_STEPS}'}'",
        f"INFER_OUTPUT_DIR='{tmp_path}'",
        f"INFER_MODE='{mode}'",
    )
    import tasks  # imported here: a skipped module should not load TensorFlow

    (output,) = tmp_path.glob(f"digits_v1-{mode}.jsonl-*-of-*[0-9]")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == tasks.info("digits_v1").num_examples["test"]
    assert all(row["prediction"] in range(NUM_CLASSES) for row in rows)


def test_grown_t5x_checkpoint_keeps_the_function_and_trains_on(model_dir, tmp_path):
    """`grow --t5x` grows checkpoint_4; the logits are kept; t5x.train continues it."""
    import dataclasses

    import numpy as np
    import orbax.checkpoint as ocp

    from evogrow import main as evogrow_main
    from models import vit

    out = tmp_path / "grown"
    requests = "mlp_dim=192,num_heads=6,add_layer@1"
    args = ["grow", "--t5x", "--gin_file=gin/t5x/tiny_model.gin", f"--out={out}"]
    assert evogrow_main.main([*args, f"--checkpoint={model_dir}", f"--expand={requests}"]) == 0
    gin.clear_config()

    def load(step_dir):
        with ocp.PyTreeCheckpointer() as ckpt:
            return ckpt.restore(str(step_dir / "state"))["target"]

    before = load(model_dir / f"checkpoint_{TRAIN_STEPS}")
    after = load(out / f"checkpoint_{TRAIN_STEPS}")
    small = vit.ViTConfig(
        image_shape=(8, 8, 1),
        num_classes=NUM_CLASSES,
        hidden=64,
        mlp_dim=128,
        num_heads=4,
        qk_dim=16,
        v_dim=16,
        num_layers=2,
        patch_size=2,
    )
    big = dataclasses.replace(small, mlp_dim=192, num_heads=6, num_layers=3)
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    logits = vit.ViT(small).apply({"params": before}, images, deterministic=True)
    grown = vit.ViT(big).apply({"params": after}, images, deterministic=True)
    np.testing.assert_allclose(grown, logits, atol=1e-5 * float(np.abs(logits).max()))

    _run(
        "train",
        "tiny_train.gin",
        f"MODEL_DIR='{out}'",
        f"TRAIN_STEPS={TRAIN_STEPS + 2}",
        "vit.ViTConfig.mlp_dim=192",
        "vit.ViTConfig.num_heads=6",
        "vit.ViTConfig.num_layers=3",
    )
    assert (out / f"checkpoint_{TRAIN_STEPS + 2}").is_dir()
    # Resumed at step 4 (a fresh start would also have evaluated at steps 2 and 4).
    lines = (out / "inference_eval" / "digits_v1-metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [TRAIN_STEPS + 2]
