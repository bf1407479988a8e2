"""A randomly initialised root next to the pretrained one, published by its own root agent.

On the tiny root ViT: the random root has the root's architecture and fresh parameters,
is stored as one more root (`SystemState.extra_roots`, read back after reopening), is
frozen by its root agent's locks for every other agent, is a seed of every task, and a
muNet cycle's seed sweep starts candidates from both roots. An agent run with
`random_root` seeds it once.
"""

import dataclasses

import jax
import numpy as np
import pytest
from agents_testlib import SEARCH, _task_data
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.agents import agent_cycle, agent_run, agent_view
from evolution.roots import seeding
from evolution.search import loop as search
from evolution.search.paths import candidate
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

RANDOM_PATH = f"{seeding.RANDOM_ROOT_TASK}:path"


def _seeded(directory):
    store = sqlite_store.SqliteStore(directory)
    seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    return store


def test_random_root_is_one_more_root_of_the_same_architecture(tmp_path):
    directory = str(tmp_path / "store")
    with _seeded(directory) as store:
        random_root = seeding.seed_random_root(store, seed=1)
        state = store.load_state()
        pretrained = state.paths[state.root_path_id]
        assert random_root.id == RANDOM_PATH and state.extra_roots == (RANDOM_PATH,)
        assert state.root_path_ids == (pretrained.id, RANDOM_PATH)
        assert random_root.architecture == pretrained.architecture
        assert [s for s, _ in random_root.components] == [s for s, _ in pretrained.components]
        agent_view.check_state(state)  # agents accept it
        # Fresh parameters, drawn by the family's own initialisers from the seed.
        expected = seeding.random_params(TINY_VIT, jax.random.PRNGKey(1))
        for (slot, cid), (_, root_cid) in zip(
            random_root.components, pretrained.components, strict=True
        ):
            ours = store.load_params(cid)
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected[slot]), strict=True):
                np.testing.assert_array_equal(a, b)
            if slot in ("embed", "block_0"):
                root_leaves = jax.tree.leaves(store.load_params(root_cid))
                pairs = zip(jax.tree.leaves(ours), root_leaves, strict=True)
                assert any(not np.array_equal(a, b) for a, b in pairs)
        # Its root agent's locks freeze it for every other agent.
        holder = system.LockHolder(seeding.RANDOM_ROOT_AGENT, seeding.RANDOM_ROOT_TASK)
        for _, cid in random_root.components:
            assert state.holders_of(cid) == {holder}
            assert not state.is_trainable(cid, "tex_a", "munet-a")
        # Both roots seed every task; the pretrained root stays the scale's unit.
        assert [p.id for p in state.seed_paths("tex_a")][:2] == [pretrained.id, RANDOM_PATH]
        assert state.root_params() == sum(
            state.components[c].num_params for c in pretrained.component_ids
        )
        # Seeding again changes nothing.
        assert seeding.seed_random_root(store, seed=2) == random_root
        assert store.load_state() == state
    with sqlite_store.SqliteStore(directory, read_only=True) as reopened:
        assert reopened.load_state() == state


def test_random_root_needs_the_pretrained_root(tmp_path):
    with sqlite_store.SqliteStore(str(tmp_path / "store")) as store:
        with pytest.raises(ValueError, match="no root"):
            seeding.seed_random_root(store)


def test_paths_start_from_either_root(tmp_path):
    with _seeded(str(tmp_path / "store")) as store:
        seeding.seed_random_root(store)
        state = store.load_state()
        data = _task_data("tex_a")
        sweep = dataclasses.replace(SEARCH, seed_sweep=True)
        result = search.evolve_task(
            agent_view.AgentView(store, agent="munet-a", task="tex_a", for_search=True),
            "tex_a",
            sweep,
            train_batches_fn=data.train_batches_fn,
            validation_batches=data.validation_batches,
            agent="munet-a",
            cache=candidate.default_cache(),
        )
        # The seed sweep trains one unmutated clone of each root.
        assert [c.parent_id for c in result.candidates] == [state.root_path_id, RANDOM_PATH]
        after = store.load_state()
        agent_view.check_state(after)
        best = after.paths[result.best_path.id]
        # muNet's accounting pays no root agent's lock: a root component used by one
        # agent is paid in full by it.
        own = {cid for cid in best.component_ids if after.components[cid].agent == "munet-a"}
        shared = sum(after.components[c].num_params for c in best.component_ids if c not in own)
        fresh = sum(after.components[c].num_params for c in own)
        assert after.accounted_params(best, system.MUNET) == pytest.approx(shared + fresh)


def test_agent_run_seeds_the_random_root_once(tmp_path):
    directory = str(tmp_path / "store")
    _seeded(directory).close()
    config = agent_cycle.AgentConfig("tex_a", "munet", "munet-a", SEARCH)
    for _ in range(2):
        results = agent_run.run_agent(
            store_dir=directory,
            config=config,
            data=_task_data("tex_a"),
            cycles=1,
            random_root=True,
            cache=candidate.default_cache(),
        )
        assert len(results) == 1
    with sqlite_store.SqliteStore(directory, read_only=True) as store:
        state = store.load_state()
    assert state.extra_roots == (RANDOM_PATH,)
    random_ids = [c for c in state.components if c.startswith(seeding.RANDOM_ROOT_TASK + ":")]
    assert len(random_ids) == len(state.paths[RANDOM_PATH].components)
