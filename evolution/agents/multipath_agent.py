"""The multipath agent: a router over P frozen published paths, kept beside the store.

Each cycle (`run_multipath_cycle`, dispatched by `agent_cycle.run_cycle` for the method
"multipath"):

1. reloads the published state, checked (`agent_view.check_state`);
2. takes path_0 = its task's best published single path (of any agent of the task;
   router paths are never members). Without
   one, the cycle trains nothing, says so in its message and waits `wait_seconds`;
3. chooses P - 1 companions among the other tasks' published paths
   (`multipath.choose_companions`);
4. trains the router and the connectors over the frozen paths for `steps` steps
   (`multipath.train_multipath`, a new data order per cycle); its quality is the best
   validation accuracy, never below path_0's on the same batches; score = quality;
5. measures the test accuracy of the multipath model and of path_0 alone when test
   data is given;
6. keeps the best-quality result across cycles (and across restarts: the previous best
   is read back first) in `<local_folder_of(store_dir)>/multipath/<agent>.npz` (router
   and connector parameters plus the report) and `<agent>.json` (the report), each
   written to a temporary file and moved into place (`os.replace`), so a killed agent
   leaves the previous best or the new one, never a mixture. The .npz is the record a
   restart reads; the .json is its readable copy;
7. with `publish` (the default), publishes a new best that beats path_0 on validation
   as the task's router path (`multipath.publish_result`), retiring its earlier one:
   inference, the exported system model and the immunity check then serve it as the
   task's model while it beats the task's best single path (`SystemState.best_path`).

A router path references its members' components, so it locks them like any path of
its task: no other task trains them in place afterwards, and the frozen paths it reads
stay bit-identical (it only reads parameters; the router's inputs are stop-gradient
constants and nothing else is trained). Searches never build on it: parents, seeds and
members are single paths (`SystemState.best_single_path`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from evolution import store as store_lib
from evolution.agents import agent_view, multipath
from evolution.search.loop import TaskData
from evolution.search.paths import candidate
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import model_config_of

logger = logging.getLogger("evogrow")

MULTIPATH = "multipath"
FOLDER = "multipath"  # under the store's local folder
WAITING, NEW_BEST, KEPT = "waiting", "new_best", "kept"
_TEST_BATCH = 256


@dataclasses.dataclass(frozen=True)
class MultipathSettings:
    """A multipath agent's method parameters.

    Attributes:
      num_paths: P in {2, 3}: path_0 plus P - 1 companions.
      steps: router and connector training steps per cycle.
      steps_per_validation: B (steps must be a multiple).
      batch_size: training examples per step.
      hparam_values: optimiser values ("lr", "schedule", "warmup", "momentum",
        "nesterov"); None: `multipath.DEFAULT_HPARAMS`.
      main_weight: w0, the router's initial weight on path_0.
      gradient_scale: m, the router's gradient multiplier.
      wait_seconds: how long a cycle that found nothing to train on sleeps (so a
        waiting agent polls the store instead of spinning).
      seed: mixed with the agent's name and cycle number into each cycle's data order.
      publish: publish a new best that beats path_0 as the task's router path.
    """

    num_paths: int = 2
    steps: int = 200
    steps_per_validation: int = 50
    batch_size: int = 32
    hparam_values: Mapping[str, Any] | None = None
    main_weight: float = multipath.MAIN_WEIGHT
    gradient_scale: float = multipath.GRADIENT_SCALE
    wait_seconds: float = 30.0
    seed: int = 0
    publish: bool = True

    def __post_init__(self):
        if self.num_paths not in multipath.NUM_PATHS:
            raise ValueError(f"num_paths={self.num_paths} not in {multipath.NUM_PATHS}.")
        if (
            self.steps_per_validation < 1
            or self.steps < 1
            or self.steps % self.steps_per_validation
        ):
            raise ValueError(
                f"steps={self.steps} must be a positive multiple of "
                f"steps_per_validation={self.steps_per_validation}."
            )
        if self.batch_size < 1 or self.wait_seconds < 0:
            raise ValueError(f"Need batch_size >= 1 and wait_seconds >= 0; got {self}.")


@dataclasses.dataclass(frozen=True)
class MultipathCycle:
    """What one cycle of a multipath agent did.

    Attributes:
      agent: the agent.
      task: its task.
      method: "multipath".
      cycle: the cycle's index in this run of the agent (0, 1, ...).
      status: "waiting" (nothing to train on), "new_best" (this cycle's model beat the
        previous best and was written) or "kept" (the previous best stays).
      message: one line on what happened (why it waited, or the qualities).
      quality: the best result's validation quality after the cycle (None: none yet).
      score: equal to quality (a multipath model's score is its quality).
      previous_quality: the best quality read back before the cycle (None: none).
      report: the best result's report after the cycle (None: none yet).
      trained: this cycle's report (None when it waited).
      candidates: multipath models trained in the cycle (0 or 1).
      wall_seconds: the cycle's wall time.
      published: the id of the router path the cycle published (None: none).
    """

    agent: str
    task: str
    method: str
    cycle: int
    status: str
    message: str
    quality: float | None
    score: float | None
    previous_quality: float | None
    report: Mapping[str, Any] | None
    trained: Mapping[str, Any] | None
    candidates: int
    wall_seconds: float
    published: str | None = None


# -- the kept best on disk ----------------------------------------------------------------


def report_files(report_dir: str, agent: str) -> tuple[str, str]:
    """(`<report_dir>/<agent>.npz`, `<report_dir>/<agent>.json`): the kept best's files."""
    return os.path.join(report_dir, f"{agent}.npz"), os.path.join(report_dir, f"{agent}.json")


def _flatten(router: Any, connectors: Sequence[Any]) -> dict[str, np.ndarray]:
    tree = {"router": router, "connectors": {str(i): c for i, c in enumerate(connectors)}}
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        "/".join(str(getattr(k, "key", k)) for k in key): np.asarray(leaf) for key, leaf in leaves
    }


def _unflatten(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tree: dict[str, Any] = {}
    for name, value in arrays.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    connectors = tree.get("connectors", {})
    return tree["router"], [connectors[str(i)] for i in range(len(connectors))]


def _replace_atomically(path: str, write: Any) -> None:
    folder = os.path.dirname(path)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_best(
    report_dir: str,
    agent: str,
    report: Mapping[str, Any],
    router_params: Any,
    connector_params: Sequence[Any],
) -> tuple[str, str]:
    """Writes a multipath result: the .npz (parameters and report) first, then the .json.

    Each file is written to a temporary file in `report_dir` and moved into place.

    Args:
      report_dir: the folder (created when missing).
      agent: the agent's name.
      report: the JSON-safe report.
      router_params: the router's parameters.
      connector_params: the connectors' parameters.

    Returns:
      (npz path, json path).
    """
    os.makedirs(report_dir, exist_ok=True)
    npz_path, json_path = report_files(report_dir, agent)
    arrays = _flatten(router_params, connector_params)
    text = json.dumps(dict(report), indent=1, sort_keys=True)
    payload: dict[str, Any] = {"__report__": np.array(text), **arrays}
    _replace_atomically(npz_path, lambda f: np.savez(f, **payload))
    _replace_atomically(json_path, lambda f: f.write(text.encode() + b"\n"))
    return npz_path, json_path


def load_best(report_dir: str, agent: str) -> tuple[dict[str, Any], Any, list[Any]] | None:
    """The kept best of an agent, read from its .npz (None when there is none).

    Returns:
      (report, router parameters, connector parameters) or None.
    """
    npz_path, _ = report_files(report_dir, agent)
    if not os.path.exists(npz_path):
        return None
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    report = json.loads(str(arrays.pop("__report__")))
    router, connectors = _unflatten(arrays)
    return report, router, connectors


# -- test accuracy ----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _jitted_predict(
    layout: tuple[tuple[families.ModelConfig, tuple[str, ...]], ...], gradient_scale: float
) -> Any:
    def run(frozen_params, router, connectors, inputs):
        config, slots = layout[0]
        logits_0 = candidate.forward(config, slots, frozen_params[0], inputs)
        features = [
            multipath.path_features(c, s, params, inputs)
            for (c, s), params in zip(layout[1:], frozen_params[1:], strict=True)
        ]
        y, _ = multipath.multipath_logits(
            router, connectors, logits_0, features, gradient_scale=gradient_scale
        )
        return y, logits_0

    return jax.jit(run)


def predict(
    store: store_lib.Store,
    paths: Sequence[system.Path],
    router_params: Any,
    connector_params: Sequence[Any],
    inputs: np.ndarray,
    *,
    gradient_scale: float = multipath.GRADIENT_SCALE,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a multipath model and of its path_0 alone, on inputs.

    Args:
      store: where the paths' components are read from.
      paths: path_0, then the companions.
      router_params: the router's parameters.
      connector_params: one connector per companion.
      inputs: the family's input feature [N, ...].
      gradient_scale: m (it does not change the value).

    Returns:
      (multipath logits [N, C], path_0's logits [N, C]), float32 numpy.
    """
    layout = tuple((model_config_of(p), tuple(s for s, _ in p.components)) for p in paths)
    family = families.family_of(layout[0][0])
    frozen = [{slot: store.load_params(cid) for slot, cid in p.components} for p in paths]
    frozen = jax.tree_util.tree_map(jnp.asarray, frozen)
    trainable = jax.tree_util.tree_map(jnp.asarray, (router_params, list(connector_params)))
    run = _jitted_predict(layout, float(gradient_scale))
    outputs: list[tuple[np.ndarray, np.ndarray]] = []
    for begin in range(0, len(inputs), _TEST_BATCH):
        chunk = np.asarray(inputs[begin : begin + _TEST_BATCH])
        real = len(chunk)
        pad = np.zeros((_TEST_BATCH - real, *chunk.shape[1:]), chunk.dtype)
        batch = jnp.asarray(np.concatenate([chunk, pad]), family.input_dtype)
        y, z_0 = run(frozen, trainable[0], trainable[1], batch)
        outputs.append((np.asarray(y)[:real], np.asarray(z_0)[:real]))
    return (
        np.concatenate([y for y, _ in outputs]).astype(np.float32),
        np.concatenate([z for _, z in outputs]).astype(np.float32),
    )


def measure_test_accuracy(
    store: store_lib.Store,
    paths: Sequence[system.Path],
    router_params: Any,
    connector_params: Sequence[Any],
    test_data: tuple[np.ndarray, np.ndarray],
) -> tuple[float, float]:
    """(multipath test accuracy, path_0's test accuracy) on (inputs, labels)."""
    inputs, labels = test_data
    y, z_0 = predict(store, paths, router_params, connector_params, inputs)
    labels = np.asarray(labels)
    return float(np.mean(y.argmax(-1) == labels)), float(np.mean(z_0.argmax(-1) == labels))


# -- one cycle ----------------------------------------------------------------------------


def _cycle_seed(seed: int, agent: str, number: int) -> int:
    entropy = [seed, zlib.crc32(agent.encode()), number]
    return int(np.random.default_rng(np.random.SeedSequence(entropy)).integers(0, 2**31 - 1))


def _why_waiting(state: system.SystemState, task: str, num_paths: int) -> str | None:
    main = state.best_single_path(task) if task in state.tasks else None
    if main is None:
        return (
            f"task {task!r} has no published path yet: a multipath agent needs one as "
            "path_0 (start a muNet or baseline agent on the task); nothing trained"
        )
    if not multipath.choose_companions(state, task, num_paths, main_path=main):
        return (
            f"no other task has a published path with features path_0 {main.id!r} lacks "
            "(same input, different body); nothing trained"
        )
    return None


def run_multipath_cycle(
    store: store_lib.Store,
    *,
    agent: str,
    task: str,
    settings: MultipathSettings,
    data: TaskData,
    report_dir: str,
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    cycle: int = 0,
) -> MultipathCycle:
    """One multipath cycle: reload (checked), train router and connectors, keep the best.

    Args:
      store: the shared store (written only to publish a router path).
      agent: the agent's name (its files are `<report_dir>/<agent>.npz/.json`).
      task: its task.
      settings: the method's parameters.
      data: the task's training stream and validation batches.
      report_dir: where the kept best lives.
      test_data: (inputs, labels) for the test accuracies (None: not measured).
      cycle: the cycle's index in the agent's run.

    Returns:
      What the cycle did.

    Raises:
      agent_view.AgentStateError: the published state is malformed or foreign.
    """
    start = time.perf_counter()
    state = agent_view.AgentView(store, agent=agent, task=task, for_search=False).load_state()
    previous = load_best(report_dir, agent)
    best = previous[0] if previous else None
    before = None if best is None else float(best["quality"])
    waiting = _why_waiting(state, task, settings.num_paths)
    if waiting is not None:
        time.sleep(settings.wait_seconds)
        return MultipathCycle(
            agent=agent,
            task=task,
            method=MULTIPATH,
            cycle=cycle,
            status=WAITING,
            message=f"waiting: {waiting}; waited {settings.wait_seconds:g}s",
            quality=before,
            score=before,
            previous_quality=before,
            report=best,
            trained=None,
            candidates=0,
            wall_seconds=time.perf_counter() - start,
        )
    main = state.best_single_path(task)
    assert main is not None  # _why_waiting checked it
    companions = multipath.choose_companions(state, task, settings.num_paths, main_path=main)
    number = 1 + int(best["cycles_run"]) if best else 1
    seed = _cycle_seed(settings.seed, agent, number)
    result = multipath.train_multipath(
        store=store,
        task=task,
        main_path=main,
        other_paths=companions,
        train_batches=data.train_batches_fn({}, batch_size=settings.batch_size, seed=seed),
        validation_batches=data.validation_batches,
        steps=settings.steps,
        steps_per_validation=settings.steps_per_validation,
        hparam_values=settings.hparam_values,
        main_weight=settings.main_weight,
        gradient_scale=settings.gradient_scale,
    )
    trained = {
        **result.report(),
        "agent": agent,
        "score": result.quality,
        "cycle_number": number,
        "seed": seed,
        "companion_tasks": [p.task for p in companions],
        "main_path_quality": main.quality,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
    }
    if test_data is not None:
        paths = [main, *companions]
        accuracy, single = measure_test_accuracy(
            store, paths, result.router_params, result.connector_params, test_data
        )
        trained.update(
            test_accuracy=accuracy,
            single_path_test_accuracy=single,
            test_gain=accuracy - single,
            test_examples=len(test_data[1]),
        )
    if best is None or result.quality > float(best["quality"]):
        status, router, connectors = NEW_BEST, result.router_params, list(result.connector_params)
        best = {**trained, "best_cycle_number": number}
    else:
        assert previous is not None
        status, router, connectors = KEPT, previous[1], previous[2]
    published = None
    if status == NEW_BEST and settings.publish:
        path = multipath.publish_result(
            store,
            state,
            agent=agent,
            result=result,
            # Ids differ from any earlier publication's, a crashed cycle's replay included.
            rng=np.random.default_rng([seed, len(state.paths), len(state.components)]),
            gradient_scale=settings.gradient_scale,
        )
        published = None if path is None else path.id
        best = {**best, "published": published}
    best = {**best, "cycles_run": number}
    save_best(report_dir, agent, best, router, connectors)
    message = (
        f"{status}: trained P={len(result.path_ids)} over {list(result.path_ids)} "
        f"(companions of tasks {trained['companion_tasks']}): validation quality "
        f"{result.quality:.4f} vs path_0 alone {result.single_path_quality:.4f}"
    )
    if test_data is not None:
        message += (
            f"; test {trained['test_accuracy']:.4f} vs path_0 alone "
            f"{trained['single_path_test_accuracy']:.4f}"
        )
    message += f"; best so far {float(best['quality']):.4f} (cycle {best['best_cycle_number']})"
    if published is not None:
        message += f"; published router path {published}"
    return MultipathCycle(
        agent=agent,
        task=task,
        method=MULTIPATH,
        cycle=cycle,
        status=status,
        message=message,
        quality=float(best["quality"]),
        score=float(best["quality"]),
        previous_quality=before,
        report=best,
        trained=trained,
        candidates=1,
        wall_seconds=time.perf_counter() - start,
        published=published,
    )
