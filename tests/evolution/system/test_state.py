"""System state (locks, trainability, accounted parameters), scoring and acceptance."""

import dataclasses
import math

import numpy as np
import pytest

from evolution.search import scoring
from evolution.system import state as system

ROOT_SLOTS = ("embed", "block_0", "block_1", "head")


def _component(cid, num_params, task="root", kind="block"):
    return system.Component(id=cid, kind=kind, num_params=num_params, agent="a", task=task)


def _path(pid, task, ids, score=None, generation=0, status=system.ACTIVE, slots=ROOT_SLOTS):
    return system.Path(
        id=pid,
        task=task,
        components=tuple(zip(slots, ids, strict=True)),
        agent="a",
        score=score,
        generation=generation,
        status=status,
    )


@pytest.fixture
def state():
    """Root (embed, b0, b1, root head) shared by t1, t2, t3; each task has its own head."""
    components = {
        c.id: c
        for c in [
            _component("embed", 300, kind="embed"),
            _component("b0", 600),
            _component("b1", 600),
            _component("root_head", 100, kind="head"),
            _component("h1", 10, task="t1", kind="head"),
            _component("h2", 20, task="t2", kind="head"),
            _component("h3", 30, task="t3", kind="head"),
            _component("b1_t3", 600, task="t3"),
        ]
    }
    paths = {
        p.id: p
        for p in [
            _path("root", "root", ["embed", "b0", "b1", "root_head"], score=0.5),
            _path("p1", "t1", ["embed", "b0", "b1", "h1"], score=0.8),
            _path("p2", "t2", ["embed", "b0", "b1", "h2"], score=0.7),
            _path("p3", "t3", ["embed", "b0", "b1_t3", "h3"], score=0.9),
            _path("p3_old", "t3", ["embed", "b0", "b1", "h3"], score=0.95, status=system.RETIRED),
        ]
    }
    tasks = {
        name: system.TaskRecord(name, 10, order)
        for order, name in enumerate(["root", "t1", "t2", "t3"])
    }
    result = system.SystemState(components, paths, tasks, root_path_id="root")
    result.validate()
    return result


def test_locks_are_rebuilt_from_active_paths_only(state):
    locks = state.locks()
    assert locks["embed"] == frozenset({"root", "t1", "t2", "t3"})
    assert locks["b1"] == frozenset({"root", "t1", "t2"})  # p3_old is retired
    assert locks["b1_t3"] == frozenset({"t3"})
    assert locks["h1"] == frozenset({"t1"})
    assert state.locks_of("unused") == frozenset()


def test_trainable_only_without_another_task_lock(state):
    assert state.is_trainable("h1", "t1")
    assert not state.is_trainable("h1", "t2")
    assert not state.is_trainable("embed", "t1")
    assert state.is_trainable("b1_t3", "t3")
    loose = dataclasses.replace(state, components={**state.components, "x": _component("x", 5)})
    assert loose.is_trainable("x", "t1") and loose.is_trainable("x", "t2")
    with pytest.raises(KeyError, match="nope"):
        state.is_trainable("nope", "t1")


def test_accounted_params_split_shared_components_among_users(state):
    # p1: embed (4 users), b0 (4), b1 (root, t1, t2: 3), its own head.
    assert state.accounted_params(state.paths["p1"]) == pytest.approx(
        300 / 4 + 600 / 4 + 600 / 3 + 10
    )
    # A candidate of a new task t4 counts as one more user of what it shares.
    candidate = _path("c", "t4", ["embed", "b0", "b1", "h1"])
    expected = 300 / 5 + 600 / 5 + 600 / 4 + 10 / 2
    assert state.accounted_params(candidate) == pytest.approx(expected)
    with pytest.raises(KeyError, match="ghost"):
        state.accounted_params(_path("d", "t1", ["embed", "b0", "b1", "ghost"]))


def test_component_used_by_three_tasks_costs_a_third_to_each():
    shared = _component("shared", 900)
    components = {"shared": shared}
    paths, tasks = {}, {}
    for i, task in enumerate(["x", "y", "z"]):
        head = _component(f"head_{task}", 0, task=task, kind="head")
        components[head.id] = head
        paths[f"p_{task}"] = _path(
            f"p_{task}", task, ["shared", head.id], slots=("block_0", "head")
        )
        tasks[task] = system.TaskRecord(task, 2, i)
    state = system.SystemState(components, paths, tasks)
    for path in paths.values():
        assert state.accounted_params(path) == pytest.approx(300.0)
    total = sum(state.accounted_params(p) for p in paths.values())
    assert total == pytest.approx(900.0)  # the system pays for each component exactly once


def test_best_path_seeds_and_order(state):
    assert state.best_path("t3").id == "p3"  # the retired p3_old scores higher but is retired
    assert state.best_path("t9") is None
    assert [p.id for p in state.seed_paths("t1")] == ["root", "p2", "p3"]
    assert [p.id for p in state.seed_paths("t4")] == ["root", "p1", "p2", "p3"]
    assert state.task_order() == ["root", "t1", "t2", "t3"]
    assert state.root_params() == 300 + 600 + 600 + 100


def test_router_path_is_served_only_while_it_beats_the_best_single_path(state):
    # t1's router path over p1 (its members' components) and t3's body, with its own
    # connector and router: it locks what it uses like any path of t1.
    router = system.Path(
        id="r1",
        task="t1",
        components=(
            ("m0/embed", "embed"),
            ("m0/block_0", "b0"),
            ("m0/block_1", "b1"),
            ("m0/head", "h1"),
            ("m1/embed", "embed"),
            ("m1/block_0", "b0"),
            ("m1/block_1", "b1_t3"),
            ("connector_1", "h2"),
            ("router", "h3"),
        ),
        agent="multipath",
        score=0.75,
        quality=0.75,
        architecture={"model": system.ROUTER_MODEL},
    )
    single = dataclasses.replace(state.paths["p1"], quality=0.7)
    paths = {**state.paths, "p1": single, "r1": router}
    with_router = system.SystemState(state.components, paths, state.tasks, "root")
    assert system.is_router_path(router) and not system.is_router_path(single)
    assert with_router.best_path("t1").id == "r1"  # quality 0.75 > 0.7 (its score is lower)
    assert with_router.best_single_path("t1").id == "p1"
    assert "t1" in with_router.locks_of("b1_t3") and not with_router.is_trainable("b1_t3", "t3")
    assert [p.id for p in with_router.seed_paths("t2")] == ["root", "p1", "p3"]
    # A better single path is served instead; without a single path the router path is.
    better = dataclasses.replace(single, quality=0.8)
    paths = {**paths, "p1": better}
    assert system.SystemState(state.components, paths, state.tasks).best_path("t1").id == "p1"
    paths = {**paths, "p1": dataclasses.replace(better, status=system.RETIRED)}
    only_router = system.SystemState(state.components, paths, state.tasks)
    assert only_router.best_path("t1").id == "r1" and only_router.best_single_path("t1") is None


def test_rank_by_score_is_deterministic_with_ties():
    paths = [
        _path("b", "t", ["e", "0", "1", "h"], score=0.5, generation=2),
        _path("a", "t", ["e", "0", "1", "h"], score=0.5, generation=2),
        _path("c", "t", ["e", "0", "1", "h"], score=0.5, generation=1),
        _path("d", "t", ["e", "0", "1", "h"], score=None),
        _path("e", "t", ["e", "0", "1", "h"], score=0.9),
    ]
    assert [p.id for p in system.rank_by_score(paths)] == ["e", "c", "a", "b", "d"]


def test_validate_names_dangling_references(state):
    broken = dataclasses.replace(
        state, paths={**state.paths, "bad": _path("bad", "t1", ["embed", "b0", "b1", "gone"])}
    )
    with pytest.raises(ValueError, match="gone"):
        broken.validate()


def test_values_are_canonical_json_and_checked():
    path = system.Path(
        id="p",
        task="t",
        components=[["embed", "e"], ["head", "h"]],
        agent="a",
        hparams={"lr": (1, 2), 3: "x"},
    )
    assert path.components == (("embed", "e"), ("head", "h"))
    assert path.hparams == {"lr": [1, 2], "3": "x"}
    with pytest.raises(ValueError, match="JSON"):
        system.Component(
            id="c", kind="block", num_params=1, agent="a", task="t", config={"f": object()}
        )
    with pytest.raises(ValueError, match="NaN"):
        dataclasses.replace(path, score=math.nan)
    with pytest.raises(ValueError, match="not a valid id"):
        _component(".tmp-x", 1)
    with pytest.raises(ValueError, match="not a valid id"):
        _component("a/b", 1)
    with pytest.raises(ValueError, match="repeats a slot"):
        system.Path(id="p", task="t", components=[("head", "a"), ("head", "b")], agent="a")


def test_new_id_is_deterministic_for_a_seed():
    first = [system.new_id(np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1] and len(first[0]) == 32
    rng = np.random.default_rng(7)
    assert system.new_id(rng, "agent_1") != system.new_id(rng, "agent_1")
    assert system.new_id(np.random.default_rng(7), "agent_1").startswith("agent_1-")


def test_num_params_of_counts_leaves():
    tree = {"a": {"kernel": np.zeros((3, 4)), "bias": np.zeros(4)}, "b": [np.zeros(2), None]}
    assert system.num_params_of(tree) == 18


# -- scoring ------------------------------------------------------------------------


def test_score_with_scale_control():
    assert scoring.score(0.9, 1000, 1000) == pytest.approx(0.9)  # scale 1.0: quality only
    assert scoring.score(0.9, 1000, 1000, scale=0.9) == pytest.approx(0.81)
    assert scoring.score(0.8, 500, 1000, scale=0.9) == pytest.approx(0.8 * 0.9**0.5)
    assert scoring.score(0.8, 0, 1000, scale=0.5) == pytest.approx(0.8)
    # Sharing pays: the same quality with a third of the parameters scores higher.
    assert scoring.score(0.8, 300, 900, scale=0.95) > scoring.score(0.8, 900, 900, scale=0.95)


def test_score_with_flops():
    value = scoring.score(0.9, 1000, 1000, scale=0.9, flops=2e9, root_flops=1e9, flops_scale=0.99)
    assert value == pytest.approx(0.9 * 0.9 * 0.99**2)
    with pytest.raises(ValueError, match="root_flops"):
        scoring.score(0.9, 1, 1, flops=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(quality=math.nan, accounted_params=1, root_params=1),
        dict(quality=0.5, accounted_params=-1, root_params=1),
        dict(quality=0.5, accounted_params=1, root_params=0),
        dict(quality=0.5, accounted_params=1, root_params=1, scale=0.0),
        dict(quality=0.5, accounted_params=1, root_params=1, scale=1.5),
    ],
)
def test_score_rejects_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        scoring.score(**kwargs)


def test_accept_rule():
    assert scoring.accept(0.8, 0.8, same_task=True)  # ties are accepted
    assert scoring.accept(0.81, 0.8, same_task=True)
    assert not scoring.accept(0.79, 0.8, same_task=True)
    assert scoring.accept(0.1, 0.9, same_task=False)  # grown from another task or the root
    assert scoring.accept(0.1, None, same_task=True)
