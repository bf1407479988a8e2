"""The launcher: every gin file parses, clear errors for bad bindings and task names, and
train -> eval -> infer end to end through `python -m evogrow.main`'s entry point."""

import json
import pathlib
import subprocess

import gin
import pytest
import trainer_testlib  # noqa: F401 - registers the toy task the toy gin files use

from evogrow import gin_utils, main
from training import checkpoints, reporting

REPO = pathlib.Path(__file__).resolve().parents[2]
# Every gin file of the repo (tracked or new, not ignored), except gin/t5x/: those bind
# t5x's own binaries and are parsed and run by tests/models/test_t5x_binaries.py (with t5x).
GIN_FILES = sorted(
    pathlib.Path(path)
    for path in subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.gin"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not path.startswith("gin/t5x/")
)
TOY = "tests/gin/trainer_toy.gin"


def test_gin_files_are_found():
    assert pathlib.Path("gin/experiments/digits_vit.gin") in GIN_FILES
    assert pathlib.Path("tests/gin/trainer_toy.gin") in GIN_FILES


@pytest.mark.parametrize("gin_file", GIN_FILES, ids=str)
def test_every_gin_file_parses(gin_file):
    gin.add_config_file_search_path(str(REPO))
    gin.parse_config_file(str(REPO / gin_file))
    required = "%gin.REQUIRED" in (REPO / gin_file).read_text()
    assert not required or gin_file.parts[:2] == ("gin", "runs"), (
        "%gin.REQUIRED belongs only in gin/runs/*.gin"
    )


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("--gin.TRAIN_STEPS", "malformed gin binding '--gin.TRAIN_STEPS'"),
        ("--gin.TRAIN_STEPS=(3", "malformed gin binding 'TRAIN_STEPS = (3'"),
        ("--gin.no_such.thing=1", "malformed gin binding 'no_such.thing = 1'"),
    ],
)
def test_malformed_binding_is_a_clear_error(binding, expected, capsys):
    assert main.main(["train", f"--gin_file={TOY}", "--gin.MODEL_DIR='/tmp/x'", binding]) == 2
    assert expected in capsys.readouterr().err


def test_missing_required_macro_is_a_clear_error(capsys):
    assert main.main(["train", f"--gin_file={TOY}"]) == 2
    err = capsys.readouterr().err
    assert "incomplete gin configuration" in err and "MODEL_DIR" in err


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    argv = [
        "train",
        f"--gin_file={TOY}",
        f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='trainer_toy_v2'",
    ]
    assert main.main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown task or mixture 'trainer_toy_v2'" in err
    assert "close matches: trainer_toy_v1" in err and len(err.strip().splitlines()) == 1


def test_rewrite_gin_args():
    rest, bindings = gin_utils.rewrite_gin_args(["train", "--gin.A=1", "--gin.b.c='x=y'"])
    assert rest == ["train"] and bindings == ["A = 1", "b.c = 'x=y'"]


@pytest.mark.slow
def test_train_eval_infer_end_to_end(tmp_path):
    model_dir = tmp_path / "run"
    common = ["--gin.MIXTURE_OR_TASK_NAME='trainer_toy_v1'", "--gin.TASK_FEATURE_LENGTHS=None"]
    assert main.main(["train", f"--gin_file={TOY}", f"--gin.MODEL_DIR='{model_dir}'"]) == 0
    history = reporting.read_history(str(model_dir))
    train_losses = [r["loss"] for r in history if r["kind"] == "train"]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
    assert (model_dir / "config.gin").exists()
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "20",
        "40",
    ]

    gin.clear_config()
    eval_dir = tmp_path / "eval"
    argv = [
        "eval",
        "--gin_file=tests/gin/trainer_toy_model.gin",
        "--gin_file=gin/runs/eval.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'",
        "--gin.BATCH_SIZE=16",
        "--gin.MIXTURE_OR_TASK_MODULE='trainer_testlib'",
        *common,
    ]
    assert main.main(argv) == 0
    (record,) = reporting.read_history(str(eval_dir))
    final_train_eval = [r for r in history if r["kind"] == "inference_eval"][-1]
    assert record["accuracy"] == final_train_eval["accuracy"]  # test split both times
    assert record["num_examples"] == 100 and record["step"] == 40

    gin.clear_config()
    infer_dir = tmp_path / "infer"
    argv = [
        "infer",
        "--gin_file=tests/gin/trainer_toy_model.gin",
        "--gin_file=gin/runs/infer.gin",
        f"--gin.CHECKPOINT_PATH='{model_dir}'",
        f"--gin.INFER_OUTPUT_DIR='{infer_dir}'",
        "--gin.BATCH_SIZE=24",
        "--gin.CHECKPOINT_STEP=20",
        "--gin.MIXTURE_OR_TASK_MODULE='trainer_testlib'",
        *common,
    ]
    assert main.main(argv) == 0
    lines = (infer_dir / "trainer_toy_v1-000020.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["index"] for r in records] == list(range(100))
    assert set(records[0]) == {"index", "label", "prediction"}


@pytest.mark.slow
def test_digits_experiment_few_steps_through_real_entry_point(tmp_path, monkeypatch):
    model_dir = tmp_path / "digits"
    monkeypatch.chdir(tmp_path)  # a relative MODEL_DIR, as users write it
    argv = [
        "train",
        "--gin_file=gin/experiments/digits_vit.gin",
        "--gin.MODEL_DIR='digits'",
        "--gin.TRAIN_STEPS=4",
        "--gin.WARMUP_STEPS=2",
        "--gin.EVAL_PERIOD=2",
        "--gin.train.eval_steps=1",
        "--gin.train.stats_period=2",
    ]
    assert main.main(argv) == 0
    final = [r for r in reporting.read_history(str(model_dir)) if r["kind"] == "inference_eval"]
    assert final[-1]["step"] == 4 and int(final[-1]["num_examples"]) == 179
    assert (model_dir / "training_curves.png").stat().st_size > 10_000
    meta = checkpoints.Checkpointer(str(model_dir / "checkpoints"), read_only=True).read_metadata()
    assert meta["step"] == 4
    config = checkpoints.architecture_config(meta["architecture"])
    assert (config.hidden, config.num_layers, config.image_shape) == (64, 2, (8, 8, 1))
