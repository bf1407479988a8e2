"""Hyperparameter space, index moves, data hyperparameters and self-tuned rates."""

import json

import numpy as np
import pytest

from evolution.search.space import hparams as hp
from evolution.system import state as system


@pytest.fixture
def space():
    return hp.default_space(patch_size=4, image_size=32, image_size_steps=2)


def test_learning_rate_grid_is_1_2_5_log_grid():
    grid = hp.learning_rate_grid()
    assert grid[0] == 1e-4 and grid[-1] == 0.5
    assert len(grid) == 12
    assert 2e-4 in grid and 0.05 in grid
    assert list(grid) == sorted(grid)
    ratios = np.array(grid[1:]) / np.array(grid[:-1])
    assert set(np.round(ratios, 6)) == {2.0, 2.5}
    with pytest.raises(ValueError):
        hp.learning_rate_grid(0.6, 0.7)


def test_image_sizes_are_multiples_of_the_patch():
    assert hp.image_sizes(16, 224, 2) == (192, 208, 224, 240, 256)
    assert hp.image_sizes(4, 8, 4) == (4, 8, 12, 16, 20, 24)
    with pytest.raises(ValueError):
        hp.image_sizes(16, 100)


def test_default_space_values_and_split(space):
    values = space.values(space.defaults())
    assert values == {
        "lr": 0.01,
        "schedule": "cosine",
        "warmup": 0.05,
        "momentum": 0.9,
        "nesterov": False,
        "adapter_size": 32,
        "mu": 0.1,
        "image_size": 32,
        "crop_area_min": 1.0,
        "aspect_ratio_min": 1.0,
        "flip": True,
        "mixup": 0.0,
        "brightness": 0.0,
        "contrast": 0.0,
        "saturation": 0.0,
        "hue": 0.0,
    }
    assert space["momentum"].values[0] is None
    assert space.data_names == (
        "image_size",
        "crop_area_min",
        "aspect_ratio_min",
        "flip",
        "mixup",
        "brightness",
        "contrast",
        "saturation",
        "hue",
    )
    assert set(space.model_names) | set(space.data_names) == set(space.names)
    assert hp.MU_GRID[0] == 0.02 and hp.MU_GRID[-1] == 0.3
    assert all(size % 4 == 0 for size in space["image_size"].values)


def test_space_validation():
    mu = hp.HParam("mu", hp.MU_GRID, 4)
    with pytest.raises(ValueError, match="repeat"):
        hp.HParamSpace((mu, mu))
    with pytest.raises(ValueError, match="mu"):
        hp.HParamSpace((hp.HParam("lr", (0.1, 0.2), 0),))
    with pytest.raises(ValueError):
        hp.HParam("lr", (0.1,), 1)


def test_with_default_moves_only_that_start(space):
    started = space.with_default("mu", 0.3)
    assert started.defaults().indices["mu"] == hp.MU_GRID.index(0.3)
    assert space.defaults().indices["mu"] == hp.MU_GRID.index(0.1)
    others = {k: v for k, v in started.defaults().indices.items() if k != "mu"}
    assert others == {k: v for k, v in space.defaults().indices.items() if k != "mu"}
    assert started.with_default("mu", 0.1) == space
    with pytest.raises(ValueError, match="allowed"):
        space.with_default("mu", 0.25)
    with pytest.raises(KeyError):
        space.with_default("bogus", 1)


def test_json_round_trip_through_a_path(space):
    hparams = space.defaults().replace(indices={"lr": 3}, rates={"hp:lr": 7, "clone:embed": 0})
    data = hparams.to_json()
    assert json.loads(json.dumps(data)) == data
    path = system.Path(
        id="p", task="t", components=(("embed", "e"),), agent="a", hparams=hparams.to_json()
    )
    assert hp.HParams.from_json(path.hparams) == hparams
    assert hp.HParams.from_json({}) == hp.HParams({})
    with pytest.raises(ValueError):
        hp.HParams.from_json({"lr": 3})
    with pytest.raises(ValueError):
        hp.HParams({}, {"hp:lr": len(hp.MU_GRID)})


def test_complete_fills_defaults_and_rejects_bad_entries(space):
    complete = space.complete(hp.HParams({"lr": 0}))
    assert complete.indices["lr"] == 0
    assert complete.indices["mu"] == space["mu"].default
    assert set(complete.indices) == set(space.names)
    with pytest.raises(ValueError, match="Unknown"):
        space.complete(hp.HParams({"bogus": 0}))
    with pytest.raises(ValueError, match="outside"):
        space.complete(hp.HParams({"lr": 99}))
    assert space.mu(hp.HParams({"mu": 0})) == 0.02


def test_move_index_is_plus_minus_one_and_clipped():
    rng = np.random.default_rng(0)
    middle = [hp.move_index(3, 7, rng) for _ in range(4000)]
    assert set(middle) == {2, 4}
    assert abs(np.mean(np.array(middle) == 4) - 0.5) < 0.03
    low = [hp.move_index(0, 7, rng) for _ in range(2000)]
    assert set(low) == {0, 1}
    assert abs(np.mean(np.array(low) == 0) - 0.5) < 0.04
    high = [hp.move_index(6, 7, rng) for _ in range(2000)]
    assert set(high) == {5, 6}
    assert {hp.move_index(0, 1, rng) for _ in range(10)} == {0}


def test_mutate_hparams_probability_zero_and_one(space):
    start = space.defaults()
    unchanged, applied = hp.mutate_hparams(start, np.random.default_rng(1), 0.0, space=space)
    assert unchanged == space.complete(start) and applied == ()
    moved, applied = hp.mutate_hparams(start, np.random.default_rng(1), 1.0, space=space)
    assert applied == tuple("hp:" + name for name in space.names)
    for name in space.names:
        size = len(space[name].values)
        delta = abs(moved.indices[name] - start.indices[name])
        assert delta == 1 or (delta == 0 and start.indices[name] in (0, size - 1))


def test_mutate_hparams_clipped_at_grid_ends(space):
    rng = np.random.default_rng(2)
    lowest = hp.HParams({name: 0 for name in space.names})
    highest = hp.HParams({h.name: len(h.values) - 1 for h in space.hparams})
    for start in (lowest, highest):
        current = start
        for _ in range(200):
            current, _ = hp.mutate_hparams(current, rng, 1.0, space=space)
            for h in space.hparams:
                assert 0 <= current.indices[h.name] < len(h.values)
    for _ in range(50):
        mutated, _ = hp.mutate_hparams(lowest, rng, 1.0, space=space)
        assert all(mutated.indices[name] in (0, 1) for name in space.names)


def test_mutate_hparams_per_name_probabilities_and_names(space):
    start = space.defaults()
    rng = np.random.default_rng(3)
    for _ in range(20):
        child, applied = hp.mutate_hparams(start, rng, 0.0, {"hp:lr": 1.0}, space=space)
        assert applied == ("hp:lr",)
        changed = [n for n in space.names if child.indices[n] != start.indices[n]]
        assert changed == ["lr"]
    child, applied = hp.mutate_hparams(start, rng, 1.0, space=space, names=["flip"])
    assert applied == ("hp:flip",)
    assert child.indices["flip"] in (0, 1)  # the default, True, is the top: moved or clipped
    assert {n for n in space.names if child.indices[n] != start.indices[n]} <= {"flip"}
    callable_child, _ = hp.mutate_hparams(
        start, np.random.default_rng(4), 0.0, lambda name: float(name == "hp:mu"), space=space
    )
    assert {n for n in space.names if callable_child.indices[n] != start.indices[n]} <= {"mu"}


def test_mutate_hparams_rate_statistics(space):
    rng = np.random.default_rng(5)
    start = space.defaults()
    hits = sum("hp:lr" in hp.mutate_hparams(start, rng, 0.1, space=space)[1] for _ in range(3000))
    assert abs(hits / 3000 - 0.1) < 0.02


def test_mutate_hparams_is_deterministic(space):
    def run(seed):
        rng = np.random.default_rng(seed)
        current, log = space.defaults(), []
        for _ in range(30):
            current, applied = hp.mutate_hparams(current, rng, 0.3, space=space)
            log.append(applied)
        return current, log

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_mutation_rates_constant_without_self_tuning(space):
    rng = np.random.default_rng(0)
    parent = space.defaults().replace(rates={"hp:lr": 0})
    rates = hp.MutationRates(parent, space, rng, self_tuning=False)
    state = rng.bit_generator.state
    assert rates.probability("hp:lr") == 0.1
    assert rates.probability("clone:embed") == 0.1
    assert rng.bit_generator.state == state  # nothing drawn
    assert rates.child_rates() == {"hp:lr": 0}


def test_mutation_rates_inherit_move_and_stay_on_grid(space):
    parent = space.defaults().replace(rates={"hp:lr": 0, "clone:embed": len(hp.MU_GRID) - 1})
    mu_index = space["mu"].default
    moved = 0
    trials = 2000
    for seed in range(trials):
        rates = hp.MutationRates(parent, space, np.random.default_rng(seed))
        p_lr = rates.probability("hp:lr")
        p_embed = rates.probability("clone:embed")
        p_new = rates.probability("add:block")
        assert rates.probability("hp:lr") == p_lr  # drawn once per child
        assert p_lr in hp.MU_GRID[:2]
        assert p_embed in hp.MU_GRID[-2:]
        assert hp.MU_GRID.index(p_new) in (mu_index - 1, mu_index, mu_index + 1)
        moved += p_new != hp.MU_GRID[mu_index]
        child = rates.child_rates()
        assert set(child) == {"hp:lr", "clone:embed", "add:block"}
        assert hp.MU_GRID[child["add:block"]] == p_new
    assert abs(moved / trials - 0.1) < 0.02  # a rate moves with probability mu


def test_self_tuned_rates_stay_on_grid_over_generations(space):
    rng = np.random.default_rng(11)
    current = space.defaults().replace(indices={"mu": len(hp.MU_GRID) - 1})
    names = ["hp:lr", "clone:block_3", "add:adapter_2", "add:block", "remove:layers"]
    for _ in range(300):
        rates = hp.MutationRates(current, space, rng)
        for name in names:
            assert rates.probability(name) in hp.MU_GRID
        mutated, _ = hp.mutate_hparams(current, rng, rates.mu, rates.probability, space=space)
        current = mutated.replace(rates=rates.child_rates())
        assert all(0 <= i < len(hp.MU_GRID) for i in current.rates.values())
        assert space.mu(current) in hp.MU_GRID
    assert hp.HParams.from_json(json.loads(json.dumps(current.to_json()))) == current


def test_generation_data(space):
    best = space.defaults().replace(indices={"image_size": 0, "lr": 2})
    same, applied = hp.generation_data(best, np.random.default_rng(0), space=space, mu=0.0)
    assert applied == () and same.rates == {}
    assert same.indices == {name: space.complete(best).indices[name] for name in space.data_names}
    moved, applied = hp.generation_data(best, np.random.default_rng(0), space=space, mu=1.0)
    assert applied == tuple("hp:" + name for name in space.data_names)
    assert set(moved.indices) == set(space.data_names)
    # Without a fixed mu the best path's own rates decide.
    certain = best.replace(indices={"mu": len(hp.MU_GRID) - 1})
    hits = [
        bool(hp.generation_data(certain, np.random.default_rng(s), space=space)[1])
        for s in range(300)
    ]
    expected = 1 - (1 - 0.3) ** len(space.data_names)
    assert abs(np.mean(hits) - expected) < 0.08

    candidate = space.defaults().replace(indices={"lr": 5})
    shared = hp.with_data(candidate, moved, space=space)
    assert {n: shared.indices[n] for n in space.data_names} == moved.indices
    assert shared.indices["lr"] == 5
    with pytest.raises(ValueError):
        hp.with_data(candidate, hp.HParams({"image_size": 0}), space=space)


def test_data_rates_tune_themselves_and_reach_every_child_of_the_generation(space):
    """mu2Net+ (mu3Net's `sample_ds_hparams`): each data name's rate is the best path's,
    moved with probability mu, before it decides; the generation's rates go with its
    values to its children; without self-tuning no data rate exists."""
    top = len(hp.MU_GRID) - 1
    best = space.defaults().replace(indices={"mu": top}, rates={"hp:lr": 2, "hp:flip": 3})
    keys = {"hp:" + name for name in space.data_names}
    moved = 0
    for seed in range(50):
        data, _ = hp.generation_data(
            best, np.random.default_rng(seed), space=space, self_tuning=True
        )
        assert set(data.rates) == keys  # every data name consulted, no model name
        start = {key: best.rates.get(key, top) for key in keys}
        assert all(abs(data.rates[k] - start[k]) <= 1 for k in keys)
        moved += sum(data.rates[k] != start[k] for k in keys)
        child = hp.with_data(space.defaults().replace(rates={"hp:lr": 0}), data, space=space)
        assert child.rates == {"hp:lr": 0, **data.rates}
    assert moved > 0
    # Rates move over generations: a chain of best paths drifts away from mu.
    current = best
    for seed in range(40):
        data, _ = hp.generation_data(
            current, np.random.default_rng(seed), space=space, self_tuning=True
        )
        current = hp.with_data(current, data, space=space)
    assert any(current.rates[k] != top for k in keys if k != "hp:flip")
    # muNet and mu2Net: constant mu, no rates; a sweep (mu 0) carries the best's rates.
    plain, _ = hp.generation_data(best, np.random.default_rng(0), space=space)
    assert plain.rates == {}
    swept, applied = hp.generation_data(
        best, np.random.default_rng(0), space=space, mu=0.0, self_tuning=True
    )
    assert applied == () and swept.rates == {"hp:flip": 3}
