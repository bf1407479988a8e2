"""Parent selection: exact probabilities, sampled statistics, determinism; task order."""

import numpy as np
import pytest

from evolution.search import selection

DRAWS = 20_000


def _frequencies(paths, counts, seeds, seed=0, draws=DRAWS):
    rng = np.random.default_rng(seed)
    chosen = [selection.select_parent(paths, counts, seeds, rng) for _ in range(draws)]
    ids, hits = np.unique(chosen, return_counts=True)
    return dict(zip(ids.tolist(), (hits / draws).tolist(), strict=True))


def _assert_close(frequencies, probabilities, draws=DRAWS):
    for path_id, p in probabilities.items():
        # 5 standard deviations of a binomial proportion: fails by chance < 1e-6.
        tolerance = 5 * np.sqrt(p * (1 - p) / draws) + 1e-9
        assert abs(frequencies.get(path_id, 0.0) - p) <= tolerance, (path_id, frequencies, p)
    assert set(frequencies) <= set(probabilities)


def test_exact_probabilities_by_hand():
    probabilities = selection.selection_probabilities(
        ["best", "second"], {"best": 1, "second": 1}, ["root"]
    )
    # best: 0.5; second: 0.5 * 0.5; fallback 0.5 * 0.5 = 0.25 split over three.
    assert probabilities == pytest.approx(
        {"best": 0.5 + 0.25 / 3, "second": 0.25 + 0.25 / 3, "root": 0.25 / 3}
    )
    assert sum(probabilities.values()) == pytest.approx(1.0)


def test_top_path_with_no_offspring_is_always_chosen():
    # 0.5 ** 0 = 1: a path that was never a parent is taken as soon as the walk reaches it.
    probabilities = selection.selection_probabilities(["p0", "p1"], {}, ["root"])
    assert probabilities == {"p0": 1.0, "p1": 0.0, "root": 0.0}
    assert _frequencies(["p0", "p1"], {}, ["root"], draws=500) == {"p0": 1.0}
    later = selection.selection_probabilities(["p0", "p1"], {"p0": 1}, ["root"])
    assert later == {"p0": 0.5, "p1": 0.5, "root": 0.0}


def test_top_path_with_one_offspring_is_chosen_about_half_the_time():
    counts = dict.fromkeys(["p0", "p1", "p2"], 1)
    frequencies = _frequencies(["p0", "p1", "p2"], counts, ["root", "other"])
    probabilities = selection.selection_probabilities(["p0", "p1", "p2"], counts, ["root", "other"])
    assert probabilities["p0"] == pytest.approx(0.5 + 0.125 / 5)
    assert probabilities["root"] == pytest.approx(0.125 / 5)
    _assert_close(frequencies, probabilities)


def test_statistics_match_exact_probabilities_with_offspring_counts():
    paths = ["p0", "p1", "p2", "p3"]
    counts = {"p0": 3, "p1": 0, "p2": 2, "p3": 1}
    seeds = ["root", "q"]
    _assert_close(
        _frequencies(paths, counts, seeds, seed=1),
        selection.selection_probabilities(paths, counts, seeds),
    )


def test_new_task_draws_uniformly_among_seeds():
    seeds = ["root", "a", "b", "c"]
    probabilities = selection.selection_probabilities([], {}, seeds)
    assert probabilities == pytest.approx(dict.fromkeys(seeds, 0.25))
    _assert_close(_frequencies([], {}, seeds, seed=2), probabilities)


def test_a_path_that_is_also_a_seed_is_counted_once():
    probabilities = selection.selection_probabilities(["p"], {"p": 10}, ["p", "root"])
    assert set(probabilities) == {"p", "root"}
    assert sum(probabilities.values()) == pytest.approx(1.0)


def test_selection_is_deterministic_for_a_fixed_seed():
    args = (["p0", "p1", "p2"], {"p0": 2, "p1": 1, "p2": 1}, ["root"])
    first = [selection.select_parent(*args, np.random.default_rng(42)) for _ in range(3)]
    rng_a, rng_b = np.random.default_rng(123), np.random.default_rng(123)
    run_a = [selection.select_parent(*args, rng_a) for _ in range(200)]
    run_b = [selection.select_parent(*args, rng_b) for _ in range(200)]
    assert len(set(first)) == 1
    assert run_a == run_b
    assert len(set(run_a)) == 4  # every candidate does occur


def test_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no paths"):
        selection.select_parent([], {}, [], rng)
    with pytest.raises(ValueError, match="< 0"):
        selection.select_parent(["p"], {"p": -1}, [], rng)


def test_next_task_round_robin_with_a_task_added_mid_round():
    order = ["a", "b", "c"]
    assert selection.next_task(order, None) == "a"
    assert [selection.next_task(order, t) for t in order] == ["b", "c", "a"]
    assert selection.next_task([*order, "d"], "c") == "d"  # a new task joins the rotation
    assert selection.next_task(order, "gone") == "a"
    with pytest.raises(ValueError):
        selection.next_task([], None)
