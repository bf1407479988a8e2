"""`./run.sh agent`: one asynchronous agent (a method bound to a task) on a shared store.

    ./run.sh agent --gin_file=gin/runs/agent.gin --task digits_rgb32_v1 \
      --gin.STORE_DIR="'/tmp/store'" --gin.METHOD="'munet'"

Start several (different tasks or methods, or the same task with different methods and
names) as separate processes on one store; each can be stopped (even by kill -9) and
started again. The task's data is read by seqio task name (`evolution.search.data.task_data`).
METHOD='multipath' runs a router over the task's best published path and other tasks'
paths (`evolution.agents.multipath_agent`): start it once the task has a path (it waits until
then); it keeps its best in <store>/multipath/<name>.json/.npz and publishes a best that
beats the task's best single path as the task's router path.
"""

from __future__ import annotations

import logging

from evolution.agents import agent_cycle, agent_run, multipath_agent
from evolution.search import loop as search
from evolution.search.data import task_data

logger = logging.getLogger("evogrow")


def agent(
    *,
    store_dir: str,
    task: str,
    method: str = agent_cycle.MUNET,
    name: str | None = None,
    root_dir: str | None = None,
    random_root: bool = False,
    cycles: int | None = None,
    max_seconds: float | None = None,
    search_config: search.SearchConfig | None = None,
    baseline: agent_cycle.BaselineSettings | None = None,
    multipath: multipath_agent.MultipathSettings | None = None,
    eval_batch_size: int = 256,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    max_test_examples: int | None = None,
) -> list[agent_cycle.AgentResult]:
    """Entry point: runs one agent's cycles on the store in `store_dir`.

    Args:
      store_dir: the shared store (created when missing; it then needs `root_dir`).
      task: the seqio task the agent works on (`import tasks` registers them).
      method: "munet", a baseline ("finetune", "freeze", "adapters") or "multipath".
      name: the agent's name, unique among the store's running agents (None:
        "<method>-<task>").
      root_dir: a pretrained root seeded when the store has none (None: the store
        must have a root).
      random_root: also seed a randomly initialised root of the same architecture
        next to the pretrained one (its own root agent), when the store has none.
      cycles: cycles to run now (None: until `max_seconds`, or until stopped).
      max_seconds: start no cycle after this many seconds (None: no limit).
      search_config: a muNet cycle's settings (baselines use its steps per
        validation, batch size, scale, FLOPs scale and seed); None: the defaults.
      baseline: a baseline agent's method parameters; None: the defaults.
      multipath: a multipath agent's method parameters; None: the defaults.
      eval_batch_size: validation and test batch size.
      max_train_examples: cap on the task's training examples (None: all).
      max_eval_examples: cap on its validation examples (None: all).
      max_test_examples: cap on its test examples, read by baselines and multipath
        (None: all).

    Returns:
      The cycles' results.

    Raises:
      agent_cycle.AgentError: a bad configuration, or an agent of this name is running.
      agent_view.AgentStateError: the store's published state is malformed or foreign.
    """
    config = agent_cycle.AgentConfig(
        task=task,
        method=method,
        name=name,
        search=search_config or search.SearchConfig(),
        baseline=baseline or agent_cycle.BaselineSettings(),
        multipath=multipath or multipath_agent.MultipathSettings(),
    )
    data = task_data.search_task_data(
        task,
        eval_batch_size=eval_batch_size,
        max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples,
    )
    test_data = None
    if method != agent_cycle.MUNET:
        test_data = task_data.load_task_arrays(task, "test", max_examples=max_test_examples)
    results = agent_run.run_agent(
        store_dir=store_dir,
        config=config,
        data=data,
        test_data=test_data,
        cycles=cycles,
        max_seconds=max_seconds,
        root_dir=root_dir,
        random_root=random_root,
    )
    last = results[-1] if results else None
    if isinstance(last, multipath_agent.MultipathCycle):
        print(f"agent {config.agent}: {len(results)} cycles; last: {last.message}")
    elif last is not None:
        new_paths = sum(isinstance(r, agent_cycle.CycleResult) and r.new_path for r in results)
        print(
            f"agent {config.agent}: {len(results)} cycles, "
            f"{new_paths} new paths; live path {last.path.id}: "
            f"quality {last.quality:.4f}, score {last.score:.4f}, "
            f"{len(last.reused_components)} components of other agents"
        )
    return results
