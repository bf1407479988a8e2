"""Reports of the evolved system: picture (SVG / PNG), table, accuracy-vs-params plot,
TensorBoard scalars and the progress line.

The hand-built system has a root path (2 blocks) and three tasks: A has an adapter before
block_1 and its own block_1; B shares A's block_1 and grows a block_2; C references the
root's blocks. A retired path and a worse active path of A must not be drawn or counted.
"""

import os
import xml.etree.ElementTree as ET

import matplotlib.image as mpimg
import numpy as np
import pytest

from evolution.report import summaries, system_picture
from evolution.system import state as system

ROOT = "root"
ROOT_SLOTS = ("embed", "cls", "pos", "block_0", "block_1", "final_norm", "head")
SIZES = {
    "embed": 300_000,
    "cls": 384,
    "pos": 25_000,
    "block": 1_800_000,
    "adapter": 50_000,
    "final_norm": 768,
    "head": 40_000,
}


def _component(cid, slot, task, generation=0):
    kind = system_picture._LAYER_RE.fullmatch(slot)
    kind = kind.group(1) if kind else slot
    return system.Component(
        id=cid, kind=kind, num_params=SIZES[kind], agent="a", task=task, generation=generation
    )


def _path(pid, task, components, *, score, quality, generation=1, status=system.ACTIVE, **kw):
    return system.Path(
        id=pid,
        task=task,
        components=tuple(components),
        agent="a",
        score=score,
        quality=quality,
        generation=generation,
        status=status,
        **kw,
    )


def _hand_state():
    comps = {f"root:{s}": _component(f"root:{s}", s, ROOT) for s in ROOT_SLOTS}
    root_path = system.Path(
        id="root:path", task=ROOT, components=[(s, f"root:{s}") for s in ROOT_SLOTS], agent="r"
    )
    own = {
        "a": ("adapter_1", "block_1", "final_norm", "head"),
        "b": ("cls", "block_2", "final_norm", "head"),
        "c": ("final_norm", "head"),
    }
    for task, slots in own.items():
        for slot in slots:
            comps[f"{task}:{slot}"] = _component(f"{task}:{slot}", slot, f"task_{task}", 2)
    comps["a:old_head"] = _component("a:old_head", "head", "task_a")
    paths = [
        root_path,
        _path(
            "pa",
            "task_a",
            [("embed", "root:embed"), ("cls", "root:cls"), ("pos", "root:pos")]
            + [("block_0", "root:block_0"), ("adapter_1", "a:adapter_1")]
            + [("block_1", "a:block_1"), ("final_norm", "a:final_norm"), ("head", "a:head")],
            score=0.9,
            quality=0.92,
            generation=3,
            metrics={"applied": ["hp:lr", "add:adapter_1", "clone:block_1"]},
        ),
        _path(
            "pa_worse",
            "task_a",
            [(s, f"root:{s}") for s in ROOT_SLOTS[:-1]] + [("head", "a:old_head")],
            score=0.5,
            quality=0.55,
        ),
        _path(
            "pa_retired",
            "task_a",
            [(s, f"root:{s}") for s in ROOT_SLOTS[:-1]] + [("head", "a:old_head")],
            score=0.95,
            quality=0.96,
            status=system.RETIRED,
        ),
        _path(
            "pb",
            "task_b",
            [("embed", "root:embed"), ("cls", "b:cls"), ("pos", "root:pos")]
            + [("block_0", "root:block_0"), ("block_1", "a:block_1"), ("block_2", "b:block_2")]
            + [("final_norm", "b:final_norm"), ("head", "b:head")],
            score=0.8,
            quality=0.81,
            generation=2,
            metrics={"applied": ["add:block"]},
        ),
        _path(
            "pc",
            "task_c",
            [(s, f"root:{s}") for s in ROOT_SLOTS[:-2]]
            + [("final_norm", "c:final_norm"), ("head", "c:head")],
            score=0.7,
            quality=0.7,
        ),
    ]
    tasks = {
        name: system.TaskRecord(name, num_classes=10, order=i)
        for i, name in enumerate((ROOT, "task_a", "task_b", "task_c"))
    }
    state = system.SystemState(comps, {p.id: p for p in paths}, tasks, root_path_id="root:path")
    state.validate()
    return state


STATE = _hand_state()
TASKS = ("task_a", "task_b", "task_c")


def synthetic_system(task_names, *, num_blocks=8, seed=0):
    """A muNet-like system grown task by task: each task mutates the root's or an earlier
    task's path (references most components, clones some, adds adapters, grows or drops
    the top block, new final norm and head)."""
    rng = np.random.default_rng(seed)
    slots = ["embed", "cls", "pos"] + [f"block_{i}" for i in range(num_blocks)]
    slots += ["final_norm", "head"]
    comps = {f"root:{s}": _component(f"root:{s}", s, ROOT) for s in slots}
    root_path = system.Path(
        id="root:path", task=ROOT, components=[(s, f"root:{s}") for s in slots], agent="r"
    )
    paths = {root_path.id: root_path}
    tasks = {ROOT: system.TaskRecord(ROOT, 10, 0)}
    for order, task in enumerate(task_names, start=1):
        tasks[task] = system.TaskRecord(task, 10, order)
        parent = paths[str(rng.choice(sorted(paths)))]
        pairs = [p for p in parent.components if p[0] not in ("final_norm", "head")]
        blocks = [p for p in pairs if p[0].startswith("block_")]
        if rng.random() < 0.25 and len(blocks) > 2:
            top = blocks[-1][0].split("_")[1]
            pairs = [p for p in pairs if p[0] not in (f"block_{top}", f"adapter_{top}")]
        elif rng.random() < 0.4:
            pairs.append((f"block_{len(blocks)}", f"{task}:block_{len(blocks)}"))
        new = []
        present = {slot for slot, _ in pairs}
        for slot, cid in pairs:
            adapter = f"adapter_{slot[6:]}"
            if slot.startswith("block_") and adapter not in present and rng.random() < 0.2:
                new.append((adapter, f"{task}:{adapter}"))
            own = cid.startswith(f"{task}:") or rng.random() < 0.15
            new.append((slot, f"{task}:{slot}" if own else cid))
        new += [("final_norm", f"{task}:final_norm"), ("head", f"{task}:head")]
        adapters_first = sorted(new, key=lambda p: system_picture.slot_level_key(p[0]))
        for slot, cid in adapters_first:
            if cid.startswith(f"{task}:"):
                comps[cid] = _component(cid, slot, task, order)
        quality = float(rng.uniform(0.6, 0.99))
        path = _path(f"{task}.path", task, adapters_first, score=quality, quality=quality)
        paths[path.id] = path
    state = system.SystemState(comps, paths, tasks, root_path_id="root:path")
    state.validate()
    return state


SEVEN_TASKS = tuple(
    f"{base}_rgb32_v1"
    for base in (
        "digits",
        "lfw_faces",
        "textures",
        "shape_type",
        "shape_count",
        "mnist1d",
        "fashion_mnist",
    )
)


def test_layout_draws_shared_components_once():
    plan = system_picture.layout(STATE)
    assert [p.id for p in plan.paths] == ["root:path", "pa", "pb", "pc"]
    assert plan.levels == (
        "embed",
        "cls",
        "pos",
        "block_0",
        "adapter_1",
        "block_1",
        "block_2",
        "final_norm",
        "head",
    )
    assert plan.users[("embed", "root:embed")] == (0, 1, 2, 3)
    assert plan.users[("block_1", "a:block_1")] == (1, 2)
    assert ("head", "a:old_head") not in plan.x  # worse and retired paths are not drawn
    for level in plan.levels:
        xs = sorted(x for (slot, _), x in plan.x.items() if slot == level)
        assert all(b - a >= 1.0 - 1e-9 for a, b in zip(xs, xs[1:], strict=False))
    assert plan.x[("block_0", "root:block_0")] == pytest.approx(1.5)
    # Both block_1 boxes prefer 1.5 (lanes 0, 3 and 1, 2): moved apart symmetrically.
    assert plan.x[("block_1", "root:block_1")] == pytest.approx(1.0)
    assert plan.x[("block_1", "a:block_1")] == pytest.approx(2.0)


def test_a_router_path_runs_through_its_members_boxes_with_its_router_on_top(tmp_path):
    """Task C served by a router path over its own path (member 0) and A's (member 1):
    the members' components are the boxes their own paths draw, at their own levels;
    the connector and the router stand above the heads."""
    comps = dict(STATE.components)
    for cid, kind in (("c:connector_1", "connector"), ("c:router", "router")):
        comps[cid] = system.Component(
            id=cid, kind=kind, num_params=100, agent="a", task="task_c", generation=3
        )
    members = (STATE.paths["pc"], STATE.paths["pa"])
    components = [(f"m0/{slot}", cid) for slot, cid in members[0].components]
    components += [(f"m1/{slot}", cid) for slot, cid in members[1].components if slot != "head"]
    components += [("connector_1", "c:connector_1"), ("router", "c:router")]
    routed = _path(
        "pc_router",
        "task_c",
        components,
        score=0.75,
        quality=0.75,
        architecture={"model": system.ROUTER_MODEL},
    )
    state = system.SystemState(
        comps, {**STATE.paths, routed.id: routed}, STATE.tasks, root_path_id="root:path"
    )
    assert state.best_path("task_c") is routed
    plan = system_picture.layout(state)
    assert [p.id for p in plan.paths] == ["root:path", "pa", "pb", "pc_router"]
    assert plan.levels[-3:] == ("head", "connector_1", "router")
    assert not any("/" in level for level in plan.levels)
    assert plan.users[("adapter_1", "a:adapter_1")] == (1, 3)  # A's box, used by both
    assert plan.users[("head", "c:head")] == (3,)
    assert plan.users[("embed", "root:embed")] == (0, 1, 2, 3)  # once, though both use it
    assert ("head", "a:head") in plan.x and plan.users[("head", "a:head")] == (1,)
    svg, _ = summaries.render_system_files(state, str(tmp_path / "pic"))
    assert "task_c" in " ".join(ET.parse(svg).getroot().itertext())


def test_spread_keeps_order_and_gaps():
    positions = system_picture._spread([1.0, 1.0, 1.2, 5.0], 1.0)
    assert positions[1] - positions[0] == pytest.approx(1.0)
    assert positions[2] - positions[1] == pytest.approx(1.0)
    assert positions[3] == pytest.approx(5.0)
    assert np.mean(positions[:3]) == pytest.approx(np.mean([1.0, 1.0, 1.2]))


def test_render_svg_and_png(tmp_path):
    svg, png = summaries.render_system_files(
        STATE, str(tmp_path / "pic"), task_metrics={t: {"acc": 0.9} for t in TASKS}
    )
    assert os.path.exists(svg) and os.path.exists(png)
    text = " ".join(ET.parse(svg).getroot().itertext())
    for task in (ROOT, *TASKS):
        assert task in text
    assert "acc 0.900" in text
    image = mpimg.imread(png)
    height, width = image.shape[:2]
    assert 400 < width < 5000 and 300 < height < 5000
    assert image.std() > 0.05  # something was drawn


def test_render_seven_tasks_stays_readable(tmp_path):
    state = synthetic_system(SEVEN_TASKS, num_blocks=8)
    png = summaries.render_system(state, str(tmp_path / "seven.png"))
    plan = system_picture.layout(state)
    assert len(plan.paths) == 8 and len(plan.levels) >= 12
    height, width = mpimg.imread(png).shape[:2]
    assert width < 3000 and height < 3000
    # Task labels over the heads do not overlap: heads are one lane apart.
    heads = sorted(x for (slot, _), x in plan.x.items() if slot == "head")
    assert min(b - a for a, b in zip(heads, heads[1:], strict=False)) >= 1.0 - 1e-9
    assert all(
        len(line) <= system_picture._LABEL_CHARS for line in system_picture._wrap(SEVEN_TASKS[-1])
    )


def test_table_rows_and_markdown():
    rows = summaries.task_rows(
        STATE, test_accuracy={"task_a": 0.91}, baselines={"finetune": {"task_a": 0.93}}
    )
    assert [r["task"] for r in rows] == list(TASKS)
    root_params = STATE.root_params()
    by_task = {r["task"]: r for r in rows}
    for task in TASKS:
        best = STATE.best_path(task)
        row = by_task[task]
        assert row["path"] == best.id
        assert row["accounted_params"] == STATE.accounted_params(best)
        assert row["params_over_root"] == pytest.approx(row["accounted_params"] / root_params)
        assert row["accounted_params_munet"] == STATE.accounted_params(best, system.MUNET)
        assert row["params_over_root_munet"] == pytest.approx(
            row["accounted_params_munet"] / root_params
        )
    assert (by_task["task_a"]["owned"], by_task["task_a"]["shared"]) == (4, 4)
    assert (by_task["task_b"]["owned"], by_task["task_b"]["shared"]) == (4, 4)
    assert (by_task["task_c"]["owned"], by_task["task_c"]["shared"]) == (2, 5)
    assert by_task["task_a"]["applied"] == ["hp:lr", "add:adapter_1", "clone:block_1"]
    assert by_task["task_b"]["baselines"] == {"finetune": None}

    table = summaries.system_table(
        STATE, test_accuracy={"task_a": 0.91}, baselines={"finetune": {"task_a": 0.93}}
    )
    lines = table.splitlines()
    assert "test accuracy" in lines[0] and "finetune accuracy" in lines[0]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["task_a", "pa", "3"]
    assert cells[3:6] == ["0.9200", "0.9100", "0.9300"]
    pa = STATE.paths["pa"]
    assert cells[6] == f"{STATE.accounted_params(pa, system.MUNET):,.0f}"
    assert cells[8] == f"{STATE.accounted_params(pa, system.MU2NET_PLUS):,.0f}"
    # muNet's accounting is the stricter: the root's lock is no user of what it shares.
    assert STATE.accounted_params(pa, system.MUNET) > STATE.accounted_params(pa)
    assert cells[10] == "4 / 4"
    assert cells[11] == "hp:lr, add:adapter_1, clone:block_1"
    assert len([ln for ln in lines if ln.startswith("| task_")]) == 3
    live = {cid for p in system_picture.drawn_paths(STATE) for cid in p.component_ids}
    total = sum(STATE.components[c].num_params for c in live)
    assert f"{len(live)} components in use" in table and f"{total:,} params" in table


def test_plot_accuracy_vs_params(tmp_path):
    points = [
        (task, method, 0.5 + 0.1 * i + 0.01 * j, 1e5 * (j + 1) * (i + 1))
        for i, task in enumerate(TASKS)
        for j, method in enumerate(("evolved", "finetune", "freeze", "adapters"))
    ]
    out = summaries.plot_accuracy_vs_params(points, str(tmp_path / "plots" / "acc.png"))
    assert os.path.getsize(out) > 0 and mpimg.imread(out).shape[0] > 100
    with pytest.raises(ValueError):
        summaries.plot_accuracy_vs_params([("a", "m", 0.5, 0.0)], str(tmp_path / "bad.png"))


def test_write_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    log_dir = str(tmp_path / "tb")
    summaries.write_tensorboard(log_dir, STATE, step=4, test_accuracy={"task_b": 0.77})
    events = event_accumulator.EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    expected = summaries.tensorboard_scalars(STATE, test_accuracy={"task_b": 0.77})
    assert tags == set(expected)
    assert {"quality/task_a", "test_accuracy/task_b", "system/params"} <= tags

    def value(tag):
        (event,) = events.Tensors(tag)
        assert event.step == 4
        return float(tensor_util.make_ndarray(event.tensor_proto))

    assert value("quality/task_a") == pytest.approx(0.92)
    assert value("test_accuracy/task_b") == pytest.approx(0.77)
    assert value("accounted_params/task_c") == pytest.approx(
        STATE.accounted_params(STATE.paths["pc"])
    )
    assert value("system/tasks") == 3.0


def test_format_progress():
    line = summaries.format_progress("digits", 3, 10, 0.91234, 0.93, 42.04, eta_seconds=754)
    assert line == (
        "digits: generation 3/10 | best score 0.9123 (quality 0.9300) | "
        "42.0 candidates/hour | ETA 0:12:34"
    )
    assert "best score - (quality -)" in summaries.format_progress("t", 0, 2, None, None, 0.0)
