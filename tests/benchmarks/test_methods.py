"""The muNet benchmarks' shared report (a baseline replica's steps are one chain's, the
methods' table and summary with mean and standard deviation over seeds), and the
benchmark's refusal of bad settings before any work."""

import os
import types

import pytest

from benchmarks import methods, munet


def _figures(acc, params, flops=1e6):
    return methods.TaskFigures(acc, params, params * 2, flops)


def test_evolution_steps_count_every_candidate_of_every_iteration():
    results = [
        types.SimpleNamespace(task="a", candidates=[1, 2, 3]),
        types.SimpleNamespace(task="b", candidates=[1]),
        types.SimpleNamespace(task="a", candidates=[1, 2]),
    ]
    assert methods.evolution_steps(results, 40) == {"a": 200, "b": 40}


def _iteration(task, generations, per_generation):
    records = [
        types.SimpleNamespace(generation=g) for g in generations for _ in range(per_generation)
    ]
    return types.SimpleNamespace(task=task, candidates=records)


def test_chain_steps_are_task_iterations_x_generations_x_v_x_b():
    """muNet's baseline replica trains as long as one chain: iterations x G x V x B."""
    results = [
        _iteration("a", [0, 1, 2], per_generation=4),
        _iteration("b", [0, 1, 2], per_generation=4),
        _iteration("a", [3, 4, 5], per_generation=4),  # a's second iteration goes on
    ]
    chain = methods.chain_steps(results, 3 * 40)
    assert chain == {"a": 2 * 3 * 120, "b": 3 * 120}
    # D replicas of one chain's steps spend what the evolution spent on the task.
    total = methods.evolution_steps(results, 3 * 40)
    assert {task: 4 * steps for task, steps in chain.items()} == total


def _seed_rows(shift):
    return {
        "evolved": {"a": _figures(0.9 + shift, 100.0), "b": _figures(0.5 + shift, 300.0)},
        "finetune": {"a": _figures(0.8, 1000.0), "b": _figures(0.6, 1000.0)},
        "freeze": {"a": _figures(0.7, 500.0), "b": _figures(0.4, 500.0)},
        "adapters": {"a": _figures(0.75, 200.0, 2e6), "b": _figures(0.45, 200.0, 2e6)},
    }


def test_compare_methods_table_plot_and_summary(tmp_path):
    got = methods.compare_methods(
        ["a", "b"], [_seed_rows(0.0)], str(tmp_path), table_name="t.md", title="x"
    )
    assert got.summary["evolved_mean_acc"] == pytest.approx(0.7)
    assert got.summary["finetune_mean_acc"] == pytest.approx(0.7)
    assert got.summary["freeze_mean_acc"] == pytest.approx(0.55)
    assert got.summary["adapters_mean_acc"] == pytest.approx(0.6)
    assert got.summary["params_ratio"] == pytest.approx(0.2)  # 200 / 1000
    assert got.summary["params_ratio_mu2net_plus"] == pytest.approx(0.2)
    assert got.summary["adapters_flops_per_task"] == pytest.approx(2e6)
    assert got.summary["params_ratio_std"] == 0.0
    lines = got.table.splitlines()
    assert lines[0].startswith(
        "| task | evolved acc | evolved params (muNet / mu2Net+) | evolved MFLOPs | finetune"
    )
    # Each method's parameters by both accountings (mu2Net+'s are twice muNet's here).
    assert lines[2] == (
        "| a | 0.9000 | 0.1k / 0.2k | 1.00 | 0.8000 | 1.0k / 2.0k | 1.00 | 0.7000 | 0.5k / 1.0k "
        "| 1.00 | 0.7500 | 0.2k / 0.4k | 2.00 |"
    )
    assert lines[-1].startswith("| mean | 0.7000 | 0.2k / 0.4k | 1.00 | 0.7000 | 1.0k / 2.0k |")
    with open(got.table_file) as f:
        assert f.read() == got.table + "\n"
    assert os.path.getsize(got.plot) > 0


def test_seeds_give_means_and_standard_deviations(tmp_path):
    got = methods.compare_methods(
        ["a", "b"],
        [_seed_rows(0.0), _seed_rows(0.1)],
        str(tmp_path),
        table_name="t.md",
        title="x",
    )
    assert got.summary["evolved_mean_acc"] == pytest.approx(0.75)
    assert got.summary["evolved_mean_acc_std"] == pytest.approx(0.05)
    assert got.summary["finetune_mean_acc_std"] == pytest.approx(0.0)
    assert got.table.splitlines()[2].startswith(
        "| a | 0.9500 ± 0.0500 | 0.1k ± 0.0k / 0.2k ± 0.0k |"
    )
    assert methods.mean_and_std([{"x": 1.0}, {"x": 3.0}]) == {"x": 2.0, "x_std": 1.0}


def test_start_run_makes_the_folder(tmp_path):
    folder = methods.start_run(str(tmp_path / "run"), "bench_x")
    assert os.path.isdir(folder) and os.path.isabs(folder)


def test_munet_refuses_bad_settings_before_any_work(tmp_path):
    out = tmp_path / "bench"
    root = ["--out", str(out), "--root_dir", str(tmp_path / "root")]
    with pytest.raises(ValueError, match="grid of mutation rates"):
        munet.main(["--mu", "0.25", *root])
    with pytest.raises(ValueError, match="--seeds=0 < 1"):
        munet.main(["--seeds", "0", *root])
    assert not out.exists() and not (tmp_path / "root").exists()
