"""Locks per agent, as the multiagent framework defines them, and what an agent's view hides.

A store holds the tiny root ViT and three published paths sharing munet-a's block: munet-a's
and finetune-a's (two agents of task tex_a) and munet-b's (task tex_b). A component is
trainable only for the agent that alone holds its locks: another agent of the same task,
and every agent for the root's components, find it frozen. munet-a's search view shows
finetune-a's path retired, yet its locks still count.
"""

import dataclasses

import numpy as np
import pytest
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.agents import agent_view
from evolution.roots import seeding
from evolution.search import iteration
from evolution.search.space import mutations as mut
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

A = system.LockHolder("munet-a", "tex_a")
F = system.LockHolder("finetune-a", "tex_a")
B = system.LockHolder("munet-b", "tex_b")
ROOT = system.LockHolder("root", "root")


def _component(store, cid, holder, kind, params):
    record = system.Component(
        id=cid,
        kind=kind,
        num_params=system.num_params_of(params),
        agent=holder.agent,
        task=holder.task,
    )
    store.put_component(record, params)


@pytest.fixture
def store(tmp_path):
    with sqlite_store.SqliteStore(str(tmp_path / "store")) as db:
        root = seeding.seed_root(db, TINY_VIT, random_params(), agent="root")
        root_params = {slot: db.load_params(cid) for slot, cid in root.components}
        for task in ("tex_a", "tex_b"):
            db.add_task(task, num_classes=4)
        _component(db, "a-block", A, "block", root_params["block_0"])
        for holder, name in ((A, "a-head"), (F, "f-head"), (B, "b-head")):
            _component(db, name, holder, "head", root_params["head"])
        db.publish("munet-a", components=["a-block", "a-head"])
        for holder, head in ((A, "a-head"), (F, "f-head"), (B, "b-head")):
            components = dict(root.components, block_0="a-block", head=head)
            path = system.Path(
                id=f"{holder.agent}-path",
                task=holder.task,
                components=tuple(components.items()),
                agent=holder.agent,
                architecture=root.architecture,
                quality=0.5,
            )
            db.publish(holder.agent, paths=[path], components=[] if holder == A else [head])
        yield db


def test_locks_are_per_agent(store):
    state = store.load_state()
    assert state.holders_of("a-block") == {A, F, B}
    assert state.locks_of("a-block") == {"tex_a", "tex_b"}
    assert state.holders_of("a-head") == {A}
    # munet-a's own head is trainable for it alone; finetune-a (same task) finds it frozen.
    assert state.is_trainable("a-head", "tex_a", "munet-a")
    assert not state.is_trainable("a-head", "tex_a", "finetune-a")
    assert state.is_trainable("a-head", "tex_a")  # by task, as muNet's single agent sees it
    # The root agent's locks freeze the root for every other agent.
    assert state.holders_of("root:block_0") == {ROOT}
    assert not state.is_trainable("root:block_0", "tex_a", "munet-a")
    assert state.is_trainable("root:block_0", "root", "root")
    assert not state.is_trainable("root:embed", "root", "root")  # the agents share it
    # Shared parameters are split among the agents holding them, plus the path's own.
    block = state.components["a-block"].num_params
    head = state.components["a-head"].num_params
    root_rest = sum(
        state.components[f"root:{slot}"].num_params
        for slot in ("embed", "cls", "pos", "final_norm")
    )
    path = state.paths["munet-a-path"]
    expected = block / 3 + head + root_rest / 4  # the root agent and three agents
    assert state.accounted_params(path, system.MU2NET_PLUS) == pytest.approx(expected)
    assert state.accounted_params(path, system.MUNET) == pytest.approx(
        block / 3 + head + root_rest / 3
    )


def test_view_hides_other_agents_paths_of_the_task_but_keeps_their_locks(store):
    published = store.load_state()
    view = agent_view.AgentView(store, agent="munet-a", task="tex_a", for_search=True)
    state = view.load_state()
    assert state.paths["finetune-a-path"].status == system.RETIRED
    assert [p.id for p in state.active_paths("tex_a")] == ["munet-a-path"]
    assert state.hidden_locks["a-block"] == {F} and state.hidden_locks["f-head"] == {F}
    for cid in published.components:
        assert state.holders_of(cid) == published.holders_of(cid)
    for path_id in ("munet-a-path", "munet-b-path"):
        path = published.paths[path_id]
        assert state.accounted_params(path) == published.accounted_params(path)
    # The search's working states keep the hidden locks.
    working = dataclasses.replace(state, paths={**state.paths})
    assert working.holders_of("f-head") == {F}
    # Without the search's narrowing the view is the published state.
    plain = agent_view.AgentView(store, agent="munet-a", task="tex_a", for_search=False)
    assert plain.load_state() == published


def _plan(state, parent, agent, task):
    space = iteration.default_search_space(TINY_VIT)
    options = mut.MutationOptions(
        add_blocks=False, remove_layers=False, fixed_probabilities={"clone:*": 0.0}
    )
    return mut.plan_child(
        state,
        state.paths[parent],
        task=task,
        agent=agent,
        rng=np.random.default_rng(0),
        space=space,
        options=options,
        data=None,
    )


def test_children_clone_only_what_their_agent_alone_locks(store):
    state = store.load_state()
    actions = lambda plan: {s.slot: s.action for s in plan.slots}  # noqa: E731
    own = actions(_plan(state, "munet-a-path", "munet-a", "tex_a"))
    # munet-a's head is its own (trainable): always cloned; the shared block is frozen.
    assert own["head"] == mut.CLONE and own["block_0"] == mut.REFERENCE
    other = actions(_plan(state, "munet-a-path", "finetune-a", "tex_a"))
    # For finetune-a, munet-a's head is another agent's: frozen, so it may be shared.
    assert other["head"] == mut.REFERENCE and other["embed"] == mut.REFERENCE
    assert other["final_norm"] == mut.CLONE
    trainable = _plan(state, "munet-a-path", "finetune-a", "tex_a").trainable_ids
    assert not set(trainable) & set(state.components)
