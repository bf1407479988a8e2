r"""A generation's candidates as Ray tasks, across the machines of a Ray cluster.

Ray (https://docs.ray.io) schedules tasks on the cluster's CPUs (or accelerators) and
moves their inputs through its object store. With `SearchConfig.executor == "ray"`
(`executors.train_generation`) each candidate is one Ray task (one CPU) running
`placement.CandidateJob.train`, as the in-process path does; its training stream is
built inside the task from the search's `train_batches_fn`, data hyperparameters and
seed, and the generation's shared inputs (validation batches, the parameter pool) go to
the object store once. Results come back in order as host (numpy) trees, so the search
goes on exactly as with executor "threads". Agents run on Ray through
`evolution.agents.ray_agents`, which shares `connect` and `remote_function` from here.

Ray is imported only when one of these runs (it is an optional dependency); without it
they raise an ImportError that says how to install it.
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
(`postgresql://user@host:port/db?params_dir=/shared/dir`, `evolution.store.postgres`)
with parameters on a shared path (NFS or similar) mounted at the same place everywhere.
A plain directory (the embedded SQLite store) is for one machine only: SQLite's locking
is not safe over network file systems. Ray connects to $RAY_ADDRESS (or the
`ray_address` given); with neither it starts a local cluster on this machine. Workers
compute with their own environment: set XLA_FLAGS and JAX settings the same on every
machine (or pass them in Ray's runtime_env) for results identical to one process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
import numpy as np

from evolution.search.data.batches import Batch, TrainBatchesFn
from evolution.search.execution import placement
from evolution.search.paths import candidate

_INSTALL_HINT = (
    "Ray runs need Ray: pip install 'ray[default]' (or use the in-process "
    "executor 'threads' and one agent per process, ./run.sh agent)."
)


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


def remote_function(name: str, function: Callable[..., Any], **options: Any) -> Any:
    """`ray.remote(**options)(function)`, made once per process (registration ships code).

    Args:
      name: the key it is kept under in this process.
      function: the function Ray runs remotely.
      **options: `ray.remote` options (num_cpus, max_retries, ...).

    Returns:
      The remote function.
    """
    if name not in _REMOTE:
        _REMOTE[name] = import_ray().remote(**options)(function)
    return _REMOTE[name]


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
    task = remote_function("train_candidate", _train_one, num_cpus=1, max_retries=0)
    refs = [task.remote(job, shared_ref, validation_ref, fn_ref, settings) for job in own]
    return list(ray.get(refs))
