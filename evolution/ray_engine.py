r"""Agents and candidate training on Ray, across the machines of a Ray cluster.

Two things run on Ray (https://docs.ray.io), which schedules them on the cluster's CPUs
(or accelerators) and moves their inputs through its object store:

- A generation's candidates (`train_candidates`, used by `search.evolve_task` when
  `SearchConfig.executor == "ray"`): each candidate is one Ray task (one CPU) running
  `placement.CandidateJob.train`, as the in-process path does; its training
  stream is built inside the task from the search's `train_batches_fn`, data
  hyperparameters and seed, and the generation's shared inputs (validation batches,
  the parameter pool) go to the object store once. Results come back in order as host
  (numpy) trees, so the search goes on exactly as with executor "threads".
- Agents (`run_agents`; `./run.sh agents_ray`): each agent (a method bound to a task,
  `agents.AgentConfig`) is one Ray task running `agent_run.run_agent` on a shared store.

Ray is imported only when one of these runs; without it they raise an ImportError that
says how to install it.

On several machines (each with this repository at the same path and the same Python
environment):

    # machine 1 (the head), using its address on the cluster's private network:
    ray start --head --port=6379 --num-cpus=8 --node-ip-address=HEAD_HOST
    # every other machine:
    ray start --address=HEAD_HOST:6379 --num-cpus=8
    # then, from any machine of the cluster (database password in ~/.pgpass or
    # PGPASSWORD, never in the URL):
    RAY_ADDRESS=HEAD_HOST:6379 ./run.sh agents_ray --gin_file=gin/runs/agents_ray.gin \
      --gin.STORE="'postgresql://evogrow@DB_HOST:5432/evogrow?params_dir=/shared/dir'" \
      --gin.TASKS="['digits_rgb32_v1', 'fashion_rgb32_v1']"

A Ray cluster has no authentication and its head listens on every interface, so whoever
reaches its ports can run code on the cluster: HEAD_HOST must be an address of a private
network, and a firewall must admit only the cluster's machines to Ray's ports.

The store location must be reachable from every machine: metadata in PostgreSQL
(`postgresql://user@host:port/db?params_dir=/shared/dir`, `evolution.postgres_store`)
with parameters on a shared path (NFS or similar) mounted at the same place everywhere.
A plain directory (the embedded SQLite store) is for one machine only: SQLite's locking
is not safe over network file systems. Ray connects to $RAY_ADDRESS (or the
`ray_address` given); with neither it starts a local cluster on this machine. Workers
compute with their own environment: set XLA_FLAGS and JAX settings the same on every
machine (or pass them in Ray's runtime_env) for results identical to one process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
import numpy as np

from evolution import agent_run, agents, candidate, placement, search
from evolution import store as store_lib
from evolution.batches import Batch, TrainBatchesFn

_INSTALL_HINT = (
    "evolution.ray_engine needs Ray: pip install 'ray[default]' (or use the in-process "
    "executor 'threads' and one agent per process, ./run.sh agent)."
)

# (data) -> (the task's TaskData, the (inputs, labels) test split or None); runs in the
# agent's Ray task, so it must be picklable and read data reachable from every machine.
AgentDataFn = Callable[[agents.AgentConfig], tuple[search.TaskData, Any]]


def import_ray() -> ModuleType:
    """Imports Ray.

    Returns:
      The `ray` module.

    Raises:
      ImportError: Ray is not installed (the message says how to install it).
    """
    try:
        import ray  # noqa: PLC0415 - optional dependency
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return ray


def connect(address: str | None = None) -> ModuleType:
    """Connects this process to a Ray cluster unless it is connected already.

    Args:
      address: the cluster ("HOST:PORT", "auto", "ray://..."); None: $RAY_ADDRESS, or a
        new local cluster on this machine when that is unset.

    Returns:
      The `ray` module, initialised.
    """
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    return ray


_REMOTE: dict[str, Any] = {}


def _remote(name: str, function: Callable[..., Any], **options: Any) -> Any:
    """`ray.remote(**options)(function)`, made once per process (registration ships code)."""
    if name not in _REMOTE:
        _REMOTE[name] = import_ray().remote(**options)(function)
    return _REMOTE[name]


# -- candidates ----------------------------------------------------------------------------


def _host(tree: Any) -> Any:
    """The tree with its arrays as plain, writable numpy arrays (device or store memory freed)."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _train_one(
    job: placement.CandidateJob,
    shared_pool: Mapping[str, Any],
    validation_batches: Sequence[Batch],
    train_batches_fn: TrainBatchesFn,
    settings: placement.StepSettings,
) -> candidate.CandidateResult:
    """A Ray task: trains one candidate in the worker (its compiled steps kept per worker)."""
    result = job.train(
        train_batches_fn,
        validation_batches,
        settings,
        cache=candidate.default_cache(),
        device=jax.local_devices()[0],  # as the in-process search's first device
        shared_pool=shared_pool,
    )
    return dataclasses.replace(
        result, params=_host(result.params), opt_state=_host(result.opt_state)
    )


def _split_pools(
    jobs: Sequence[placement.CandidateJob],
) -> tuple[dict[str, Any], list[placement.CandidateJob]]:
    """The pool entries shared by the jobs (one object in the store), and each job's own.

    An id whose parameters are the same object in every job that references it goes to
    the shared pool once; anything else stays with its job.
    """
    seen: dict[str, Any] = {}
    users: dict[str, int] = {}
    conflicting: set[str] = set()
    for job in jobs:
        for cid, tree in job.pool.items():
            if cid in seen and seen[cid] is not tree:
                conflicting.add(cid)
            seen.setdefault(cid, tree)
            users[cid] = users.get(cid, 0) + 1
    shared_ids = {cid for cid, n in users.items() if n > 1 and cid not in conflicting}
    shared = {cid: _host(seen[cid]) for cid in sorted(shared_ids)}
    own = [
        dataclasses.replace(
            job,
            pool={cid: _host(t) for cid, t in job.pool.items() if cid not in shared_ids},
            parent_opt_state=_host(job.parent_opt_state),
        )
        for job in jobs
    ]
    return shared, own


def train_candidates(
    jobs: Sequence[placement.CandidateJob],
    *,
    train_batches_fn: TrainBatchesFn,
    validation_batches: Sequence[Batch],
    settings: placement.StepSettings,
    ray_address: str | None = None,
) -> list[candidate.CandidateResult]:
    """Trains a generation's candidates as Ray tasks (one CPU each); results in order.

    Each result is what `CandidateJob.train` returns for the same inputs in this
    process: the training stream is made inside the task.

    Args:
      jobs: the planned candidates.
      train_batches_fn: makes a candidate's training stream (picklable: it is shipped
        to the workers, which must be able to import what it references).
      validation_batches: the task's validation batches (shared by all candidates).
      settings: batch size, V and B.
      ray_address: the cluster (None: $RAY_ADDRESS or a local one; `connect`).

    Returns:
      One `candidate.CandidateResult` per job, in order, with numpy parameters and
      optimizer states.

    Raises:
      ImportError: Ray is not installed.
    """
    if not jobs:
        return []
    ray = connect(ray_address)
    shared, own = _split_pools(jobs)
    shared_ref = ray.put(shared)
    validation_ref = ray.put([dict(batch) for batch in validation_batches])
    fn_ref = ray.put(train_batches_fn)
    task = _remote("train_candidate", _train_one, num_cpus=1, max_retries=0)
    refs = [task.remote(job, shared_ref, validation_ref, fn_ref, settings) for job in own]
    return list(ray.get(refs))


# -- agents --------------------------------------------------------------------------------


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

    def __call__(self, config: agents.AgentConfig) -> tuple[search.TaskData, Any]:
        """Reads the agent's task data (and its test split for a baseline).

        Args:
          config: the agent.

        Returns:
          (its `search.TaskData`, (test inputs, labels) for a baseline or None).
        """
        from evolution import task_data  # noqa: PLC0415 - reads seqio data; in the worker

        data = task_data.search_task_data(
            config.task,
            eval_batch_size=self.eval_batch_size,
            max_train_examples=self.max_train_examples,
            max_eval_examples=self.max_eval_examples,
        )
        test = None
        if config.method != agents.MUNET:
            test = task_data.load_task_arrays(
                config.task, "test", max_examples=self.max_test_examples
            )
        return data, test


def _run_agent_task(
    store: str,
    config: agents.AgentConfig,
    data_fn: AgentDataFn,
    cycles: int | None,
    max_seconds: float | None,
    root_dir: str | None,
) -> list[agents.AgentResult]:
    """A Ray task: one agent's run on the shared store, in the worker."""
    import logging  # noqa: PLC0415

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
    configs: Sequence[agents.AgentConfig],
    data_fn: AgentDataFn | None = None,
    cycles: int | None = 1,
    max_seconds: float | None = None,
    root_dir: str | None = None,
    concurrent: bool = True,
    ray_address: str | None = None,
    num_cpus: float = 1.0,
) -> list[list[agents.AgentResult]]:
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
      agents.AgentError: duplicate agent names, or no limit on the agents' run.
      ImportError: Ray is not installed.
    """
    names = [config.agent for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise agents.AgentError(f"Agent names must be unique; repeated: {duplicates}.")
    if cycles is None and max_seconds is None:
        raise agents.AgentError("run_agents needs cycles or max_seconds (agents would not end).")
    location = _shared_location(store)
    data_fn = data_fn or SeqioAgentData()
    ray = connect(ray_address)
    task = _remote("run_agent", _run_agent_task, num_cpus=1, max_retries=0)
    task = task.options(num_cpus=num_cpus)
    args = (data_fn, cycles, max_seconds, root_dir)
    if concurrent:
        refs = [task.remote(location, config, *args) for config in configs]
        return [list(results) for results in ray.get(refs)]
    return [list(ray.get(task.remote(location, config, *args))) for config in configs]
