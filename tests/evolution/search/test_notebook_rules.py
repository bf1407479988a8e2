"""The muNet family's rules as the reference notebooks run them.

- both parameter accountings on a hand-built system (muNet's: the root's lock is no
  user; mu2Net+'s: the root counts as one);
- mu2Net+'s FLOPs term pays the parameters' scale and reorders paths as the formula says;
- muNet's seed sweep: an iteration's first candidates are unmutated clones of every
  seed, in order; a private task is never a seed or parent of another task;
- mu2Net+'s optimizer state: published components store their momentum, and a clone
  of one read from the store starts from exactly that momentum;
- the three gin experiments parse and bind their method's settings.

The store tests use the tiny ViT of tiny_vit_testlib and one short task iteration.
"""

import dataclasses
import pathlib

import gin
import jax
import numpy as np
import pytest
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.roots import seeding
from evolution.search import iteration, scoring
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.paths import candidate as cand
from evolution.search.space import hparams as hp
from evolution.search.space import mutations as mut
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

REPO = pathlib.Path(__file__).resolve().parents[3]

# -- accounting on a hand-built system ----------------------------------------------------


def _component(cid, num_params, task):
    return system.Component(id=cid, kind="block", num_params=num_params, agent="a", task=task)


def _hand_built():
    """Root (r1: 100, r2: 50); task A uses r1 and owns a1 (10); B uses r1, r2, owns b1 (20)."""
    components = {
        c.id: c
        for c in (
            _component("r1", 100, "root"),
            _component("r2", 50, "root"),
            _component("a1", 10, "A"),
            _component("b1", 20, "B"),
        )
    }
    paths = {
        "root-path": system.Path("root-path", "root", (("s1", "r1"), ("s2", "r2")), "root"),
        "pa": system.Path("pa", "A", (("s1", "r1"), ("s3", "a1")), "x"),
        "pb": system.Path("pb", "B", (("s1", "r1"), ("s2", "r2"), ("s3", "b1")), "x"),
    }
    tasks = {
        name: system.TaskRecord(name, num_classes=2, order=i)
        for i, name in enumerate(("root", "A", "B"))
    }
    return system.SystemState(components, paths, tasks, "root-path")


def test_accounting_both_ways_on_a_hand_built_system():
    state = _hand_built()
    pa, pb, root = state.paths["pa"], state.paths["pb"], state.paths["root-path"]
    # mu2Net+: r1 has users {root, A, B}, r2 {root, B}.
    assert state.accounted_params(pa, system.MU2NET_PLUS) == pytest.approx(100 / 3 + 10)
    assert state.accounted_params(pb, system.MU2NET_PLUS) == pytest.approx(100 / 3 + 50 / 2 + 20)
    # muNet: the root's lock is no user: r1 is split by A and B, r2 is B's alone (in full).
    assert state.accounted_params(pa, system.MUNET) == pytest.approx(100 / 2 + 10)
    assert state.accounted_params(pb, system.MUNET) == pytest.approx(100 / 2 + 50 + 20)
    # The root path itself: under muNet's its components are split among the tasks using
    # them (as the notebook's NOT_TRAINABLE lock is dropped), under mu2Net+'s with it too.
    assert state.accounted_params(root, system.MUNET) == pytest.approx(100 / 2 + 50)
    assert state.accounted_params(root, system.MU2NET_PLUS) == pytest.approx(100 / 3 + 50 / 2)
    # The default is mu2Net+'s (what the search scored with before), and muNet's is stricter.
    assert state.accounted_params(pb) == state.accounted_params(pb, system.MU2NET_PLUS)
    for path in (pa, pb):
        assert state.accounted_params(path, system.MUNET) > state.accounted_params(path)
    with pytest.raises(ValueError, match="accounting"):
        state.accounted_params(pa, "both")


def test_scorer_uses_its_accounting():
    state = _hand_built()
    pb = state.paths["pb"]
    for accounting in system.ACCOUNTINGS:
        scorer = iteration.Scorer(
            root_params=150, root_flops=None, scale=0.9, flops_scale=1.0, accounting=accounting
        )
        expected = 0.8 * 0.9 ** (state.accounted_params(pb, accounting) / 150)
        assert scorer.of_path(pb, 0.8, state, params_of=None) == pytest.approx(expected)
    with pytest.raises(ValueError, match="accounting"):
        search.SearchConfig(accounting="stricter")


def test_private_task_is_never_a_seed():
    state = _hand_built()
    assert [p.id for p in state.seed_paths("B")] == ["root-path", "pa"]
    assert [p.id for p in state.seed_paths("B", private=("A",))] == ["root-path"]
    # A private task still starts from the others' paths.
    assert [p.id for p in state.seed_paths("A", private=("A",))] == ["root-path", "pb"]


# -- the FLOPs term -----------------------------------------------------------------------


def test_flops_term_pays_the_parameters_scale_and_changes_the_ranking():
    s, params, flops_root = 0.9, 1000.0, 5e6
    scorer = iteration.Scorer(
        root_params=1000, root_flops=flops_root, scale=s, flops_scale=s, accounting="munet"
    )
    # A: better quality at twice the root's compute; B: a bit worse at the root's compute.
    score_a = scorer.of_values(0.80, params, 2 * flops_root)
    score_b = scorer.of_values(0.78, params, flops_root)
    assert score_a == pytest.approx(0.80 * s ** (params / 1000) * s**2.0)
    assert score_b == pytest.approx(0.78 * s ** (params / 1000) * s**1.0)
    assert score_b > score_a
    # Without the compute term the order is the other way round.
    no_flops = dataclasses.replace(scorer, flops_scale=1.0)
    assert no_flops.of_values(0.80, params, 2 * flops_root) > no_flops.of_values(
        0.78, params, flops_root
    )
    assert scoring.score(0.8, params, 1000, scale=s) == pytest.approx(0.8 * s)
    with pytest.raises(ValueError, match="flops_scale"):
        search.SearchConfig(flops_term=True, flops_scale=0.5)


# -- the search on a store ----------------------------------------------------------------

SEARCH = search.SearchConfig(
    generations=1,
    candidates_per_generation=2,
    num_validations=1,
    steps_per_validation=3,
    batch_size=16,
    scale=0.99,
    seed=3,
    mutation_options=mut.MutationOptions(max_layers=2),
)


def _data(seed):
    rng = np.random.default_rng(seed)
    out = {}
    for split, rows in (("train", 64), ("validation", 32)):
        labels = rng.integers(0, 4, rows).astype(np.int32)
        images = (labels[:, None, None, None] / 4.0 + rng.normal(0, 0.3, (rows, 8, 8, 1))).astype(
            np.float32
        )
        out[split] = (images, labels)
    return out


DATA = {"tex_a": _data(1), "tex_b": _data(2)}


def _evolve(store, task, cache, config):
    return search.evolve_task(
        store,
        task,
        config,
        train_batches_fn=batches.array_train_batches(*DATA[task]["train"]),
        validation_batches=batches.array_eval_batches(*DATA[task]["validation"], 32),
        agent="munet",
        cache=cache,
    )


def _open(store, task, config):
    return iteration.TaskIteration.open(
        store,
        task,
        config,
        agent="munet",
        validation_batches=batches.array_eval_batches(*DATA[task]["validation"], 32),
        num_classes=4,
        metadata=None,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A root and one published iteration of tex_a (its components store their momentum)."""
    directory = str(tmp_path_factory.mktemp("rules") / "store")
    store = sqlite_store.SqliteStore(directory)
    seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    result = _evolve(store, "tex_a", cand.StepCache(), SEARCH)
    yield dict(store=store, result=result)
    store.close()


def test_flops_term_binds_the_scale_for_flops(world):
    store = world["store"]
    state = store.load_state()
    scorer = iteration.Scorer.of_system(
        state, store.load_params, scale=0.95, flops_scale=1.0, flops_term=True
    )
    assert scorer.flops_scale == 0.95 and scorer.root_flops > 0
    off = iteration.Scorer.of_system(state, store.load_params, scale=0.95, flops_scale=1.0)
    assert off.flops_scale == 1.0 and off.root_flops is None


def test_seed_sweep_first_samples_unmutated_clones_of_every_seed(world):
    store = world["store"]
    config = dataclasses.replace(SEARCH, seed_sweep=True, candidates_per_generation=3)
    it = _open(store, "tex_b", config)
    state = store.load_state()
    seeds = [p.id for p in state.seed_paths("tex_b")]
    assert seeds == [state.root_path_id, world["result"].best_path.id]
    planned = it.plan_generation(1)
    assert [item.parent.id for item in planned[: len(seeds)]] == seeds
    space = it.space
    best_data = space.complete(space.defaults()).indices  # tex_b has no path yet
    for item in planned:
        assert {n: item.plan.hparams.indices[n] for n in space.data_names} == {
            n: best_data[n] for n in space.data_names
        }
    for item in planned[: len(seeds)]:
        parent, plan = item.parent, item.plan
        assert plan.applied == ()
        parent_indices = space.complete(hp.HParams.from_json(parent.hparams)).indices
        for name in space.model_names:
            assert plan.hparams.indices[name] == parent_indices[name], name
        assert plan.num_layers == len([s for s, _ in parent.components if s.startswith("block")])
        child = dict(plan.path.components)
        for slot, cid in parent.components:
            if slot not in ("head", "final_norm") and not state.is_trainable(cid, "tex_b"):
                assert child[slot] == cid, slot  # referenced, not cloned
    # Without the sweep, the same iteration does not start from a forced seed order.
    plain = _open(store, "tex_b", SEARCH)
    assert plain._sweep == []


def test_private_task_is_never_a_parent_of_another_task(world):
    store = world["store"]
    config = dataclasses.replace(
        SEARCH, seed_sweep=True, candidates_per_generation=8, private_tasks=("tex_a",)
    )
    it = _open(store, "tex_b", config)
    parents = [item.parent for item in it.plan_generation(1)]
    assert parents and all(p.task != "tex_a" for p in parents)
    assert parents[0].id == store.load_state().root_path_id


def _trace_subtrees(opt_state, keys):
    is_param_tree = lambda node: isinstance(node, dict) and frozenset(node) == frozenset(keys)  # noqa: E731
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=is_param_tree)
    return [node for node in nodes if is_param_tree(node)]


def test_a_published_child_carries_its_generations_self_tuned_data_rates(world):
    best = world["result"].best_path
    assert best.parent is not None  # a child of this iteration, not the root
    space = iteration.default_search_space(TINY_VIT)
    rates = hp.HParams.from_json(best.hparams).rates
    assert {"hp:" + name for name in space.data_names} <= set(rates)


def _published_slices(store, best):
    """The stored momentum of the best path's own components (not all zero)."""
    state = store.load_state()
    fresh = [cid for cid in best.component_ids if state.components[cid].task == "tex_a"]
    assert fresh
    slices = {cid: store.load_opt_state(cid) for cid in fresh}
    assert all(s is not None and "0" in s for s in slices.values())
    # Momentum after training is not all zero (so the checks below can fail).
    assert any(
        np.abs(leaf).sum() > 0 for s in slices.values() for leaf in jax.tree_util.tree_leaves(s)
    )
    return slices


def _clones_checked(items, slices):
    """Asserts each planned child's clone of a component in `slices` starts from exactly its
    slice (the child's initial state, as `train_candidate` builds it); returns how many."""
    checked = 0
    for item in items:
        job = item.job
        if job.hparam_values.get("momentum") is None or not job.clone_sources:
            continue
        steps = SEARCH.num_validations * SEARCH.steps_per_validation
        optimizer = cand.make_optimizer(
            job.hparam_values, steps, cycle_steps=SEARCH.steps_per_validation
        )
        trainable = {cid: job.pool[cid] for cid in job.trainable_ids}
        initial = cand.inherit_opt_state(
            optimizer.init(trainable),
            job.parent_opt_state,
            job.clone_sources,
            child_ids=job.trainable_ids,
            parent_ids=job.parent_trainable_ids,
        )
        (trace,) = _trace_subtrees(initial, job.trainable_ids)
        for child_id, source in job.clone_sources.items():
            if source in slices:
                got, want = trace[child_id], slices[source]["0"]
                assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
                for a, b in zip(
                    jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
                ):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                checked += 1
    return checked


def test_momentum_from_the_store_reaches_the_child(world):
    store, best = world["store"], world["result"].best_path
    slices = _published_slices(store, best)
    it = _open(store, "tex_a", dataclasses.replace(SEARCH, candidates_per_generation=8))
    items = it.plan_generation(2)
    for item in items:
        if item.parent.id != best.id:
            # The root's components were stored without an optimizer state.
            assert item.job.parent_opt_state is None
    assert _clones_checked([i for i in items if i.parent.id == best.id], slices) > 0

    # With inheritance off, nothing is read from the store.
    off = _open(store, "tex_a", dataclasses.replace(SEARCH, inherit_opt_state=False))
    assert all(item.job.parent_opt_state is None for item in off.plan_generation(2))


def test_momentum_reaches_the_clone_of_a_component_its_parent_only_referenced(world):
    """mu3Net's components carry their own momentum: a parent trained in this iteration
    that referenced a published component frozen still hands the component's stored
    momentum to a child that clones it."""
    store, best = world["store"], world["result"].best_path
    slices = _published_slices(store, best)
    it = _open(store, "tex_a", dataclasses.replace(SEARCH, candidates_per_generation=8))
    # A path of this iteration that trained none of the published components it uses.
    referencing = dataclasses.replace(best, id="trained-here", parent=best.id)
    it.population.paths = {referencing.id: referencing}
    it.population.offspring = {referencing.id: 0}
    it.population.opt_states = {referencing.id: (None, ())}
    items = [i for i in it.plan_generation(2) if i.parent.id == referencing.id]
    assert _clones_checked(items, slices) > 0


def test_starting_values_are_where_a_new_tasks_paths_start(world):
    store = world["store"]
    values = {"warmup": 0.1, "crop_area_min": 0.05, "aspect_ratio_min": 0.75}
    config = dataclasses.replace(SEARCH, starting_values=values, candidates_per_generation=4)
    assert config.starting_values == tuple(sorted(values.items()))
    it = _open(store, "tex_b", config)
    start = it.space.values(it.space.defaults())
    assert {name: start[name] for name in values} == values
    # The sweep's first child, an unmutated clone of the root with the best path's data
    # values unmutated, trains at them.
    swept = _open(store, "tex_b", dataclasses.replace(config, seed_sweep=True))
    first = swept.plan_generation(1)[0]
    assert first.parent.id == store.load_state().root_path_id
    assert first.job.hparam_values["warmup"] == 0.1
    assert first.job.data_values["crop_area_min"] == 0.05
    assert first.job.data_values["aspect_ratio_min"] == 0.75
    # muNet's warmup start reaches every candidate's optimizer values; by default none.
    lr100 = _open(store, "tex_b", dataclasses.replace(config, warmup_start=0.01))
    assert all(item.job.hparam_values["warmup_start"] == 0.01 for item in lr100.plan_generation(1))
    assert all("warmup_start" not in item.job.hparam_values for item in it.plan_generation(1))
    with pytest.raises(ValueError, match="warmup_start=2.0 must be in"):
        dataclasses.replace(SEARCH, warmup_start=2.0)
    with pytest.raises(ValueError, match="'warmup_ratio', which is not a hyperparameter"):
        _open(store, "tex_b", dataclasses.replace(SEARCH, starting_values={"warmup_ratio": 0.1}))
    with pytest.raises(ValueError, match="0.15 is not an allowed value of 'warmup'"):
        _open(store, "tex_b", dataclasses.replace(SEARCH, starting_values={"warmup": 0.15}))


# -- gin experiments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "munet",
            dict(
                accounting="munet",
                seed_sweep=True,
                flops_term=False,
                inherit_opt_state=False,
                starting_values=dict(
                    warmup=0.1, crop_area_min=0.05, aspect_ratio_min=0.75, flip=True
                ),
                warmup_start=0.01,
            ),
        ),
        (
            "mu2net",
            dict(
                accounting="munet",
                seed_sweep=False,
                flops_term=False,
                inherit_opt_state=False,
                starting_values=dict(
                    warmup=0.05, crop_area_min=0.05, aspect_ratio_min=0.75, flip=True
                ),
                warmup_start=0.01,
            ),
        ),
        (
            "mu2net_plus",
            dict(
                accounting="mu2net_plus",
                seed_sweep=False,
                flops_term=True,
                inherit_opt_state=True,
                population_cap=7,
                starting_values=dict(
                    warmup=0.1, crop_area_min=1.0, aspect_ratio_min=1.0, flip=False
                ),
                warmup_start=None,
            ),
        ),
    ],
)
def test_gin_experiments_bind_their_method(name, expected):
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(REPO))
        gin.parse_config_file(str(REPO / "gin" / "experiments" / f"{name}.gin"))
        config = gin.get_configurable(search.SearchConfig)()
    finally:
        gin.clear_config()
    expected["starting_values"] = tuple(sorted(expected["starting_values"].items()))
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    # Each starting value is one the space can take.
    space = iteration.default_search_space(TINY_VIT)
    for hparam, value in config.starting_values:
        space = space.with_default(hparam, value)
    assert config.mutation_options.self_tuning == (name == "mu2net_plus")
