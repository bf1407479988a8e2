"""The muNet benchmarks' shared report (steps per task, the methods' table and summary), and
the benchmark's refusal of bad settings before any work."""

import os
import types

import pytest

from benchmarks import methods, munet


def _result(task, method, acc, params):
    return types.SimpleNamespace(
        task=task, method=method, test_accuracy=acc, accounted_params=params
    )


def test_evolution_steps_count_every_candidate_of_every_iteration():
    results = [
        types.SimpleNamespace(task="a", candidates=[1, 2, 3]),
        types.SimpleNamespace(task="b", candidates=[1]),
        types.SimpleNamespace(task="a", candidates=[1, 2]),
    ]
    assert methods.evolution_steps(results, 40) == {"a": 200, "b": 40}


def test_compare_methods_table_plot_and_summary(tmp_path):
    evolved = {"a": (0.9, 100.0), "b": (0.5, 300.0)}
    baseline = [
        _result("a", "finetune", 0.8, 1000.0),
        _result("b", "finetune", 0.6, 1000.0),
        _result("a", "freeze", 0.7, 500.0),
        _result("b", "freeze", 0.4, 500.0),
        _result("a", "adapters", 0.75, 200.0),
        _result("b", "adapters", 0.45, 200.0),
    ]
    got = methods.compare_methods(
        ["a", "b"], evolved, baseline, str(tmp_path), table_name="t.md", title="x"
    )
    assert got.summary["evolved_mean_acc"] == pytest.approx(0.7)
    assert got.summary["finetune_mean_acc"] == pytest.approx(0.7)
    assert got.summary["freeze_mean_acc"] == pytest.approx(0.55)
    assert got.summary["adapters_mean_acc"] == pytest.approx(0.6)
    assert got.summary["params_ratio"] == pytest.approx(0.2)  # 200 / 1000
    lines = got.table.splitlines()
    assert lines[0].startswith("| task | evolved acc | evolved params | finetune acc")
    assert lines[2] == ("| a | 0.9000 | 0.1k | 0.8000 | 1.0k | 0.7000 | 0.5k | 0.7500 | 0.2k |")
    assert lines[-1].startswith("| mean | 0.7000 | 0.2k | 0.7000 | 1.0k |")
    with open(got.table_file) as f:
        assert f.read() == got.table + "\n"
    assert os.path.getsize(got.plot) > 0


def test_start_run_makes_the_folder(tmp_path):
    folder = methods.start_run(str(tmp_path / "run"), "bench_x")
    assert os.path.isdir(folder) and os.path.isabs(folder)


def test_munet_refuses_a_mutation_rate_off_the_grid_before_any_work(tmp_path):
    out = tmp_path / "bench"
    with pytest.raises(ValueError, match="grid of mutation rates"):
        munet.main(["--mu", "0.25", "--out", str(out), "--root_dir", str(tmp_path / "root")])
    assert not out.exists() and not (tmp_path / "root").exists()
