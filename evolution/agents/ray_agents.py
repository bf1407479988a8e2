"""Agents as Ray tasks on one shared store (`./run.sh agents_ray`).

Each agent (a method bound to a task, `agent_cycle.AgentConfig`) is one Ray task running
`agent_run.run_agent` on a shared store; agents meet only through what they publish.
Cluster set-up, and what the store location must be on several machines:
`evolution.search.execution.ray_executor`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from evolution import store as store_lib
from evolution.agents import agent_cycle, agent_run
from evolution.search import loop as search
from evolution.search.data import task_data
from evolution.search.execution import ray_executor

# (data) -> (the task's TaskData, the (inputs, labels) test split or None); runs in the
# agent's Ray task, so it must be picklable and read data reachable from every machine.
AgentDataFn = Callable[[agent_cycle.AgentConfig], tuple[search.TaskData, Any]]


@dataclasses.dataclass(frozen=True)
class SeqioAgentData:
    """An agent's data read by seqio task name, as `./run.sh agent` reads it (picklable).

    Attributes:
      eval_batch_size: validation and test batch size.
      max_train_examples: cap on the task's training examples (None: all).
      max_eval_examples: cap on its validation examples (None: all).
      max_test_examples: cap on its test examples, read by baselines (None: all).
    """

    eval_batch_size: int = 256
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_test_examples: int | None = None

    def __call__(self, config: agent_cycle.AgentConfig) -> tuple[search.TaskData, Any]:
        """Reads the agent's task data (and its test split for a baseline).

        Args:
          config: the agent.

        Returns:
          (its `search.TaskData`, (test inputs, labels) for a baseline or None).
        """
        data = task_data.search_task_data(
            config.task,
            eval_batch_size=self.eval_batch_size,
            max_train_examples=self.max_train_examples,
            max_eval_examples=self.max_eval_examples,
        )
        test = None
        if config.method != agent_cycle.MUNET:
            test = task_data.load_task_arrays(
                config.task, "test", max_examples=self.max_test_examples
            )
        return data, test


def _run_agent_task(
    store: str,
    config: agent_cycle.AgentConfig,
    data_fn: AgentDataFn,
    cycles: int | None,
    max_seconds: float | None,
    root_dir: str | None,
) -> list[agent_cycle.AgentResult]:
    """A Ray task: one agent's run on the shared store, in the worker."""
    logging.getLogger("evogrow").setLevel(logging.INFO)
    data, test = data_fn(config)
    return agent_run.run_agent(
        store_dir=store,
        config=config,
        data=data,
        test_data=test,
        cycles=cycles,
        max_seconds=max_seconds,
        root_dir=root_dir,
    )


def _shared_location(store: str) -> str:
    if store_lib.is_server_location(store):
        return store
    return os.path.abspath(store)


def run_agents(
    *,
    store: str,
    configs: Sequence[agent_cycle.AgentConfig],
    data_fn: AgentDataFn | None = None,
    cycles: int | None = 1,
    max_seconds: float | None = None,
    root_dir: str | None = None,
    concurrent: bool = True,
    ray_address: str | None = None,
    num_cpus: float = 1.0,
) -> list[list[agent_cycle.AgentResult]]:
    """Runs agents as Ray tasks on one shared store and waits for them.

    Each agent is one Ray task (`num_cpus` CPUs) running `agent_run.run_agent` with its
    data from `data_fn`; agents meet only through what they publish in the store.

    Args:
      store: the store location every worker reaches (`store.open_store`): a
        postgresql:// location with a shared params_dir, or a directory (one machine).
      configs: the agents (names unique).
      data_fn: config -> (its task data, test split or None), called in the agent's
        task; None: `SeqioAgentData()` (seqio tasks by name).
      cycles: cycles per agent (None: until `max_seconds`).
      max_seconds: start no cycle after this many seconds (None: no limit).
      root_dir: a pretrained root seeded when the store has none.
      concurrent: run all agents at once (True), or one after another in `configs`
        order, each starting when the previous finished (deterministic outcome).
      ray_address: the cluster (None: $RAY_ADDRESS or a local one; `connect`).
      num_cpus: CPUs Ray reserves per agent.

    Returns:
      Each agent's cycle results, in `configs` order.

    Raises:
      agent_cycle.AgentError: duplicate agent names, or no limit on the agents' run.
      ImportError: Ray is not installed.
    """
    names = [config.agent for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise agent_cycle.AgentError(f"Agent names must be unique; repeated: {duplicates}.")
    if cycles is None and max_seconds is None:
        raise agent_cycle.AgentError(
            "run_agents needs cycles or max_seconds (agents would not end)."
        )
    location = _shared_location(store)
    data_fn = data_fn or SeqioAgentData()
    ray = ray_executor.connect(ray_address)
    task = ray_executor.remote_function("run_agent", _run_agent_task, num_cpus=1, max_retries=0)
    task = task.options(num_cpus=num_cpus)
    args = (data_fn, cycles, max_seconds, root_dir)
    if concurrent:
        refs = [task.remote(location, config, *args) for config in configs]
        return [list(results) for results in ray.get(refs)]
    return [list(ray.get(task.remote(location, config, *args))) for config in configs]
