"""Child planning: clone rules, head rules, depth growth, removal, adapters, determinism."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolution.search.paths import candidate as cand
from evolution.search.space import hparams as hp
from evolution.search.space import mutations as mut
from evolution.system import state as system
from models import adapters, vit

CONFIG = vit.vit_tiny(image_shape=(8, 8, 3), patch_size=4, head_zero_init=False)
SPACE = hp.default_space(patch_size=4, image_size=8, image_size_steps=1)
NO_STRUCTURE = mut.MutationOptions(add_blocks=False, remove_layers=False)


def _component(cid, slot, params, task, config=None):
    return system.Component(
        id=cid,
        kind=mut.slot_kind(slot),
        num_params=system.num_params_of(params),
        agent=task,
        task=task,
        config=config or {},
    )


def _random_params(module, example, seed):
    """Random numpy parameters shaped like the module's (tracing only: no compilation)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda leaf: rng.normal(0.0, 0.3, leaf.shape).astype(leaf.dtype),
        nn.unbox(shapes["params"]),
    )


@pytest.fixture(scope="module")
def world():
    """Root ViT shared by t1 (own block_1, final_norm, head); t2 has no path yet.

    t3's path has an adapter before block_1 (frozen for everyone else).
    """
    params = _random_params(vit.ViT(CONFIG), jnp.zeros((1, 8, 8, 3)), seed=0)
    root_components = tuple((slot, f"root:{slot}") for slot in vit.component_slots(CONFIG))
    pool = {cid: params[slot] for slot, cid in root_components}
    components = {cid: _component(cid, slot, pool[cid], "root") for slot, cid in root_components}
    t1_ids = {"block_1": "t1:block_1", "final_norm": "t1:final_norm", "head": "t1:head"}
    for slot, cid in t1_ids.items():
        pool[cid] = jax.tree_util.tree_map(lambda x: x + 0.5, params[slot])
        components[cid] = _component(cid, slot, pool[cid], "t1")
    adapter = adapters.ResidualAdapter(CONFIG, 16)
    pool["t3:adapter_1"] = _random_params(adapter, jnp.zeros((1, 5, 32)), seed=1)
    components["t3:adapter_1"] = _component(
        "t3:adapter_1", "adapter_1", pool["t3:adapter_1"], "t3", {"size": 16}
    )
    root_pairs = root_components
    t1_pairs = tuple((slot, t1_ids.get(slot, cid)) for slot, cid in root_pairs)
    t3_pairs = root_pairs[:4] + (("adapter_1", "t3:adapter_1"),) + root_pairs[4:]
    arch = {"num_layers": CONFIG.num_layers}
    path_list = [
        system.Path(id="root", task="root", components=root_pairs, agent="root", architecture=arch),
        system.Path(id="p1", task="t1", components=t1_pairs, agent="t1", architecture=arch),
        system.Path(id="p3", task="t3", components=t3_pairs, agent="t3", architecture=arch),
    ]
    tasks = {n: system.TaskRecord(n, 10, i) for i, n in enumerate(["root", "t1", "t2", "t3"])}
    state = system.SystemState(components, {p.id: p for p in path_list}, tasks, "root")
    state.validate()
    return state, pool, params


def _plan(state, parent_id, task, seed, options=NO_STRUCTURE, **kwargs):
    return mut.plan_child(
        state,
        state.paths[parent_id],
        task=task,
        agent=task,  # the agent that published the world's paths of `task`
        rng=np.random.default_rng(seed),
        space=SPACE,
        options=options,
        **kwargs,
    )


def _actions(plan):
    return {s.slot: s.action for s in plan.slots}


def test_head_reused_only_within_the_task(world):
    state, _, _ = world
    same = _plan(state, "p1", "t1", 0)
    assert _actions(same)["head"] == mut.CLONE
    assert same.clones[same.path.components[-1][1]] == "t1:head"
    other = _plan(state, "p1", "t2", 0)
    assert _actions(other)["head"] == mut.INIT and "t1:head" not in other.path.component_ids
    from_root = _plan(state, "root", "t1", 0)
    assert _actions(from_root)["head"] == mut.INIT


def test_final_norm_always_cloned_and_own_components_always_cloned(world):
    state, _, _ = world
    freeze = dataclasses.replace(NO_STRUCTURE, fixed_probabilities={"clone:*": 0.0})
    own = _plan(state, "p1", "t1", 1, options=freeze)
    assert _actions(own) == {
        "embed": mut.REFERENCE,
        "cls": mut.REFERENCE,
        "pos": mut.REFERENCE,
        "block_0": mut.REFERENCE,
        "block_1": mut.CLONE,  # t1's own, unlocked by others: trainable, so cloned
        "final_norm": mut.CLONE,
        "head": mut.CLONE,
    }
    foreign = _plan(state, "p1", "t2", 1, options=freeze)
    assert _actions(foreign)["block_1"] == mut.REFERENCE  # t1's lock freezes it for t2
    assert _actions(foreign)["final_norm"] == mut.CLONE
    clone_all = dataclasses.replace(NO_STRUCTURE, fixed_probabilities={"clone:*": 1.0})
    everything = _plan(state, "p1", "t2", 1, options=clone_all)
    assert everything.referenced == ()
    assert set(everything.clones.values()) == {cid for _, cid in state.paths["p1"].components[:-1]}


def test_nothing_published_is_ever_planned_trainable(world):
    state, _, _ = world
    rng = np.random.default_rng(123)
    options = mut.MutationOptions(adapters=True, max_layers=4)
    for seed in range(150):
        parent = ["root", "p1", "p3"][seed % 3]
        task = ["t1", "t2", "t3", "root"][int(rng.integers(4))]
        plan = _plan(state, parent, task, seed, options=options)
        for slot_plan in plan.slots:
            if slot_plan.action == mut.REFERENCE:
                assert slot_plan.source == slot_plan.component_id
                assert not state.is_trainable(slot_plan.component_id, task)
            else:
                assert slot_plan.component_id not in state.components
        assert set(plan.trainable_ids).isdisjoint(state.components)
        assert set(plan.clones.values()) <= set(state.paths[parent].component_ids)
        assert plan.path.parent == parent and plan.path.task == task
        assert plan.path.architecture["num_layers"] == plan.num_layers
        blocks = [s for s, _ in plan.path.components if s.startswith("block_")]
        assert blocks == [f"block_{i}" for i in range(plan.num_layers)]


def test_plans_are_deterministic(world):
    state, _, _ = world
    options = mut.MutationOptions(adapters=True)
    first = _plan(state, "p3", "t2", 42, options=options, generation=3)
    again = _plan(state, "p3", "t2", 42, options=options, generation=3)
    assert first == again
    other = _plan(state, "p3", "t2", 43, options=options, generation=3)
    assert other.path.id != first.path.id
    assert first.path.generation == 3


def test_clone_statistics_match_mu(world):
    state, _, _ = world
    frozen_slots = ("embed", "cls", "pos", "block_0", "block_1")
    for self_tuning, tolerance in ((False, 0.015), (True, 0.02)):
        options = dataclasses.replace(NO_STRUCTURE, self_tuning=self_tuning)
        clones = draws = 0
        for seed in range(1500):
            actions = _actions(_plan(state, "root", "t1", seed, options=options))
            clones += sum(actions[slot] == mut.CLONE for slot in frozen_slots)
            draws += len(frozen_slots)
        assert abs(clones / draws - 0.1) < tolerance, (self_tuning, clones / draws)


def test_applied_names_and_self_tuned_rates_recorded(world):
    state, _, _ = world
    plan = _plan(state, "root", "t1", 5, options=mut.MutationOptions())
    cloned = {f"clone:{s.slot}" for s in plan.slots if s.action == mut.CLONE}
    assert cloned - {"clone:final_norm"} == {n for n in plan.applied if n.startswith("clone:")}
    rates = plan.hparams.rates
    assert {"hp:lr", "clone:embed", "clone:block_1", "add:block", "remove:layers"} <= set(rates)
    assert "clone:final_norm" not in rates and "clone:head" not in rates
    assert all(0 <= index < len(hp.MU_GRID) for index in rates.values())
    assert hp.HParams.from_json(plan.path.hparams) == plan.hparams
    # The child's rates are inherited by its own child.
    new_components = {c: _fake(c, s.slot) for s in plan.slots for c in [s.component_id]}
    grandchild_state = system.SystemState(
        {**new_components, **state.components},
        {**state.paths, plan.path.id: plan.path},
        state.tasks,
        state.root_path_id,
    )
    child = mut.plan_child(
        grandchild_state,
        plan.path,
        task="t1",
        agent="a",
        rng=np.random.default_rng(6),
        space=SPACE,
        options=NO_STRUCTURE,
    )
    for name, index in plan.hparams.rates.items():
        assert abs(child.hparams.rates[name] - index) <= 1


def _fake(cid, slot):
    return system.Component(id=cid, kind=mut.slot_kind(slot), num_params=1, agent="a", task="t1")


def test_data_indices_come_from_the_generation(world):
    state, _, _ = world
    data = hp.HParams({name: 0 for name in SPACE.data_names}, {"hp:flip": 1})
    plan = _plan(state, "root", "t1", 0, data=data)
    assert {n: plan.hparams.indices[n] for n in SPACE.data_names} == data.indices
    assert plan.hparams.rates["hp:flip"] == 1
    untouched = _plan(state, "root", "t1", 0)
    defaults = SPACE.defaults().indices
    assert {n: untouched.hparams.indices[n] for n in SPACE.data_names} == {
        n: defaults[n] for n in SPACE.data_names
    }


def test_remove_layers_drops_top_block_and_keeps_order(world):
    state, _, _ = world
    remove = mut.MutationOptions(fixed_probabilities={"remove:layers": 1.0})
    plan = _plan(state, "p3", "t2", 0, options=remove)
    assert "remove:layers" in plan.applied and "add:block" not in plan.applied
    assert plan.num_layers == 1
    assert [s for s, _ in plan.path.components] == [
        "embed",
        "cls",
        "pos",
        "block_0",
        "final_norm",
        "head",
    ]
    assert "t3:adapter_1" not in plan.path.component_ids  # the top block's adapter goes too
    assert plan.path.architecture == {"num_layers": 1}
    floor = dataclasses.replace(remove, min_layers=2)
    assert _plan(state, "p3", "t2", 0, options=floor).num_layers == 2
    # Removal keeps the references of the remaining blocks.
    freeze = dataclasses.replace(remove, fixed_probabilities={"remove:layers": 1.0, "clone:*": 0.0})
    kept = dict(_plan(state, "p1", "t2", 0, options=freeze).path.components)
    assert kept["block_0"] == "root:block_0"


def test_add_block_plan(world):
    state, _, _ = world
    grow = mut.MutationOptions(fixed_probabilities={"add:block": 1.0, "remove:layers": 0.0})
    plan = _plan(state, "p1", "t1", 0, options=grow)
    assert plan.num_layers == 3 and "add:block" in plan.applied
    top = plan.slots[[s.slot for s in plan.slots].index("block_2")]
    assert top.action == mut.GROW and top.source is None
    assert plan.fresh == {top.component_id: "block_2"}
    assert [s for s, _ in plan.path.components][-3:] == ["block_2", "final_norm", "head"]
    capped = dataclasses.replace(grow, max_layers=2)
    assert _plan(state, "p1", "t1", 0, options=capped).num_layers == 2


def test_grown_child_computes_the_parent_function_bit_for_bit(world):
    state, pool, _ = world
    parent_id, task = "p1", "t1"  # references frozen root blocks, clones its own
    grow = mut.MutationOptions(fixed_probabilities={"add:block": 1.0, "remove:layers": 0.0})
    plan = _plan(state, parent_id, task, 9, options=grow)
    child_config, created = mut.materialize(plan, pool, CONFIG)
    assert child_config.num_layers == CONFIG.num_layers + 1
    assert set(created) == set(plan.trainable_ids)
    parent = dict(state.paths[parent_id].components)
    child = dict(plan.path.components)
    child_pool = {**pool, **created}
    tree = {slot: child_pool[cid] for slot, cid in child.items()}  # keyed by slot
    images = np.random.default_rng(2).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    parent_logits = jax.jit(
        lambda x: cand.forward(CONFIG, list(parent), {s: pool[c] for s, c in parent.items()}, x)
    )(images)
    assert float(jnp.max(jnp.abs(parent_logits))) > 0  # a meaningful comparison
    child_logits = jax.jit(lambda t, x: cand.forward(child_config, list(child), t, x))(tree, images)
    np.testing.assert_array_equal(child_logits, parent_logits)

    # The grown child as one plain ViT model (its parameters keyed by slot), too.
    whole = jax.jit(lambda t, x: vit.ViT(child_config).apply({"params": t}, x))(tree, images)
    np.testing.assert_array_equal(whole, parent_logits)
    # The new block is not trivially zero: only its output projections are.
    block = created[next(iter(plan.fresh))]
    assert np.all(np.asarray(block["attn"]["out"]["kernel"]) == 0)
    assert np.any(np.asarray(block["attn"]["query"]["kernel"]) != 0)


def test_grow_top_block_directly(world):
    _, _, params = world
    new_config, block = mut.grow_top_block(CONFIG, params, rng=jax.random.PRNGKey(3))
    assert new_config.num_layers == 3
    assert jax.tree_util.tree_structure(block) == jax.tree_util.tree_structure(params["block_0"])
    assert np.all(np.asarray(block["mlp"]["wo"]["kernel"]) == 0)


def test_materialize_clones_and_fresh_head(world):
    state, pool, _ = world
    plan = _plan(state, "p1", "t2", 4, options=NO_STRUCTURE)
    config, created = mut.materialize(plan, pool, CONFIG, num_classes=7)
    assert config.num_classes == 7
    for new_id, source in plan.clones.items():
        jax.tree_util.tree_map(np.testing.assert_array_equal, created[new_id], pool[source])
    head_id = dict(plan.path.components)["head"]
    assert np.asarray(created[head_id]["dense"]["kernel"]).shape == (32, 7)
    numpy_pool = jax.tree_util.tree_map(np.asarray, pool)
    _, copied = mut.materialize(plan, numpy_pool, CONFIG, num_classes=7)
    some_clone, its_source = next(iter(plan.clones.items()))
    copied_leaf = jax.tree_util.tree_leaves(copied[some_clone])[0]
    assert copied_leaf is not jax.tree_util.tree_leaves(numpy_pool[its_source])[0]
    records = mut.component_records(plan, created, agent="agent-t2")
    assert [r.id for r in records] == list(plan.trainable_ids)
    by_id = {r.id: r for r in records}
    assert by_id[head_id].kind == "head" and by_id[head_id].parent is None
    assert by_id[head_id].num_params == 32 * 7 + 7
    for new_id, source in plan.clones.items():
        assert by_id[new_id].parent == source and by_id[new_id].task == "t2"


def test_adapters_are_planned_sized_and_identity(world):
    state, pool, _ = world
    add = mut.MutationOptions(
        adapters=True,
        add_blocks=False,
        remove_layers=False,
        fixed_probabilities={"add:adapter_0": 1.0, "add:adapter_1": 1.0},
    )
    plan = _plan(state, "root", "t1", 0, options=add)
    slots = [s for s, _ in plan.path.components]
    assert slots == [
        "embed", "cls", "pos", "adapter_0", "block_0", "adapter_1", "block_1", "final_norm", "head"
    ]  # fmt: skip
    size = SPACE.values(plan.hparams)["adapter_size"]
    assert plan.path.architecture["adapters"] == {"adapter_0": size, "adapter_1": size}
    assert {"add:adapter_0", "add:adapter_1"} <= set(plan.applied)
    _, created = mut.materialize(plan, pool, CONFIG)
    adapter_id = dict(plan.path.components)["adapter_1"]
    assert np.asarray(created[adapter_id]["down"]["kernel"]).shape == (32, size)
    x = np.random.default_rng(5).normal(size=(2, 5, 32)).astype(np.float32)
    y = jax.jit(adapters.ResidualAdapter(CONFIG, size).apply)({"params": created[adapter_id]}, x)
    np.testing.assert_array_equal(y, x)
    # An inherited adapter follows the clone rules and keeps its size.
    inherited = _plan(state, "p3", "t2", 0, options=add)
    slot = next(s for s in inherited.slots if s.slot == "adapter_1")
    assert slot.source == "t3:adapter_1" and slot.config == {"size": 16}
    assert inherited.path.architecture["adapters"]["adapter_1"] == 16
    assert dict(inherited.path.components)["adapter_0"] not in state.components


def test_residual_adapter_identity_at_init_and_trainable_after():
    module = adapters.ResidualAdapter(CONFIG, 8)
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    params = jax.jit(module.init)(jax.random.PRNGKey(1), x)["params"]
    np.testing.assert_array_equal(jax.jit(module.apply)({"params": params}, x), x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2)))(params)
    assert float(jnp.abs(nn.unbox(grads)["up"]["kernel"]).sum()) > 0


def test_bad_parent_layouts_are_refused(world):
    state, _, _ = world
    shuffled = system.Path(
        id="bad",
        task="t1",
        components=(("embed", "root:embed"), ("block_1", "root:block_1"), ("head", "t1:head")),
        agent="a",
    )
    with pytest.raises(ValueError, match="out of order"):
        mut.plan_child(
            state, shuffled, task="t1", agent="a", rng=np.random.default_rng(0), space=SPACE
        )
    unknown = system.Path(id="u", task="t1", components=(("embed", "nope"),), agent="a")
    with pytest.raises(KeyError):
        mut.plan_child(
            state, unknown, task="t1", agent="a", rng=np.random.default_rng(0), space=SPACE
        )
    with pytest.raises(ValueError):
        mut.MutationOptions(fixed_probabilities={"add:block": 2.0})
    assert math.isclose(hp.MU_GRID[4], 0.1)
