"""`./run.sh evolve` and the main job through the real entry point (evogrow.main).

A root ViT pretrained for a few steps on 512 Fashion-MNIST images; the system evolves on
digits and then introduces lfw_faces with `--add_task`; every iteration is one
generation of one candidate of 2 x 2 steps on at most 128 training examples. Checks:
the report files, immunity of the earlier task across the introduction, resume of a
finished run (nothing re-run), and clear one-line errors for bad requests.
"""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from evogrow import main
from evolution.export import inference
from evolution.roots import root
from evolution.search.data import task_data
from evolution.store import sqlite as sqlite_store

pytestmark = pytest.mark.slow  # pretrains a root and evolves end to end

TINY_SEARCH = [
    "--gin.GENERATIONS=1",
    "--gin.CANDIDATES=1",
    "--gin.VALIDATIONS=2",
    "--gin.STEPS_PER_VALIDATION=2",
    "--gin.BATCH_SIZE=16",
    "--gin.MAX_TRAIN_EXAMPLES=128",
    "--gin.MAX_EVAL_EXAMPLES=64",
    "--gin.EVAL_BATCH_SIZE=64",
]


def _main(argv):
    """One launcher call on a clean gin configuration (as a fresh process would have)."""
    gin.clear_config()
    try:
        return main.main(argv)
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def root_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("root"))
    root.pretrain_root(
        root_dir=directory,
        steps=3,
        batch_size=16,
        learning_rate=2e-3,  # the main job's settings, so that it reuses this root
        warmup_steps=1,
        weight_decay=0.05,
        max_train_examples=512,
    )
    return directory


def _evolve(store_dir, root_dir, *extra):
    argv = [
        "evolve",
        "--gin_file=gin/runs/evolve.gin",
        f"--gin.STORE_DIR='{store_dir}'",
        f"--gin.ROOT_DIR='{root_dir}'",
        "--gin.TASKS=['digits_rgb32_v1']",
        *TINY_SEARCH,
        *extra,
    ]
    return _main(argv)


def _digits_logits(store_dir):
    store = sqlite_store.SqliteStore(str(store_dir))
    try:
        images, _ = task_data.load_task_arrays("digits_rgb32_v1", "test")
        return inference.predict(store, "digits_rgb32_v1", images)
    finally:
        store.close()


def test_evolve_then_add_task(tmp_path, root_dir, capsys):
    store_dir = tmp_path / "store"
    assert _evolve(store_dir, root_dir) == 0
    out = capsys.readouterr().out
    assert "| digits_rgb32_v1" in out and "evolution overhead:" in out
    report = tmp_path / "store_report"
    for name in ("system.png", "system.svg", "accuracy_vs_params.png", "system.md"):
        assert (report / name).stat().st_size > 0, name
    summary = json.loads((report / "evolve_summary.json").read_text())
    assert summary["plan"] == ["digits_rgb32_v1"]
    assert 0.0 <= summary["overhead_share"] < 1.0
    before = _digits_logits(store_dir)

    # Running the finished plan again skips its iteration: the progress is in the store,
    # so it survives the loss of the report folder.
    shutil.rmtree(report)
    assert _evolve(store_dir, root_dir) == 0
    again = json.loads((report / "evolve_summary.json").read_text())
    assert again["iterations"] == []

    added = tmp_path / "added"
    flags = ["--add_task", "lfw_faces_rgb32_v1", f"--gin.REPORT_DIR='{added}'"]
    assert _evolve(store_dir, root_dir, *flags) == 0
    summary = json.loads((added / "evolve_summary.json").read_text())
    assert summary["plan"] == ["lfw_faces_rgb32_v1"]
    assert set(summary["test_accuracy"]) == {"digits_rgb32_v1", "lfw_faces_rgb32_v1"}
    np.testing.assert_array_equal(_digits_logits(store_dir), before)  # immunity

    # Adding it again (even with the same report folder) is refused, not a silent no-op.
    capsys.readouterr()
    assert _evolve(store_dir, root_dir, *flags) == 2
    err = capsys.readouterr().err
    assert "already in the system" in err and err.count("\n") == 1


def test_recreated_store_is_not_taken_as_finished(tmp_path, root_dir):
    store_dir = tmp_path / "store"
    assert _evolve(store_dir, root_dir) == 0
    shutil.rmtree(store_dir)  # the report folder (and any old progress file) stays
    assert _evolve(store_dir, root_dir) == 0
    summary = json.loads((tmp_path / "store_report" / "evolve_summary.json").read_text())
    assert [i["task"] for i in summary["iterations"]] == ["digits_rgb32_v1"]


def test_unknown_task_creates_nothing(tmp_path, root_dir, capsys):
    store_dir = tmp_path / "store"
    assert _evolve(store_dir, root_dir, "--gin.TASKS=['digits_rgb32_v9']") == 2
    assert "digits_rgb32_v9" in capsys.readouterr().err
    assert _evolve(store_dir, root_dir, "--add_task", "nope_v1") == 2
    assert "nope_v1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []  # no store, no report folder


def test_add_existing_task_is_refused(tmp_path, root_dir, capsys):
    store_dir = tmp_path / "store"
    assert _evolve(store_dir, root_dir) == 0
    capsys.readouterr()
    flags = ["--add_task", "digits_rgb32_v1", f"--gin.REPORT_DIR='{tmp_path / 'again'}'"]
    assert _evolve(store_dir, root_dir, *flags) == 2
    assert "already in the system" in capsys.readouterr().err


def test_missing_root_and_misplaced_flag_are_clear_errors(tmp_path, capsys):
    assert _evolve(tmp_path / "store", tmp_path / "no_root") == 2
    assert "pretrain_root" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # nothing created before the root was found
    assert _main(["train", "--add_task", "x", "--gin_file=gin/runs/train.gin"]) == 2
    assert "--add_task is a flag of 'evolve'" in capsys.readouterr().err


def test_main_job_tiny_through_real_entry_point(tmp_path, root_dir, capsys):
    argv = [
        "main",
        f"--gin.RUN_DIR='{tmp_path / 'demo'}'",
        f"--gin.ROOT_DIR='{root_dir}'",
        "--gin.ROOT_STEPS=3",
        "--gin.ROOT_BATCH_SIZE=16",
        "--gin.ROOT_WARMUP_STEPS=1",
        "--gin.ROOT_MAX_TRAIN_EXAMPLES=512",
        "--gin.TASKS=['digits_rgb32_v1', 'lfw_faces_rgb32_v1']",
        "--gin.NEW_TASK='textures_rgb32_v1'",
        *TINY_SEARCH,
    ]
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert "(reused:" in out  # the module's root, same settings: not pretrained again
    assert "test predictions are bit-identical after adding textures_rgb32_v1" in out
    assert (tmp_path / "demo" / "report" / "system.png").stat().st_size > 10_000
    # Again on the same RUN_DIR: the store says the demonstration is done; only a report.
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert "was added by an earlier run" in out and "== evolving" not in out
