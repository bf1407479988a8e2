"""An agent's run: its lock, the store's root, and its cycles under a time budget.

`run_agent` runs one agent (`agent_cycle.AgentConfig`) on a shared store, cycle after cycle
(`agent_cycle.run_cycle`), until it has run `cycles` of them or `max_seconds` have passed.
Agents on one machine are separate processes on the embedded SQLite store; a lock file
per agent name (`<store folder>/agents/<name>.lock`, released by the kernel when the
process dies, even by kill -9) keeps two processes from running as the same agent.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from evolution import store as store_lib
from evolution.agents import agent_cycle, baselines, multipath_agent
from evolution.roots import root, seeding
from evolution.search import loop as search
from evolution.search.paths import candidate

logger = logging.getLogger("evogrow")


@contextlib.contextmanager
def agent_lock(store_dir: str, agent: str) -> Iterator[None]:
    """Holds `<store_dir>/agents/<agent>.lock` exclusively (flock; freed when the process dies).

    Raises:
      AgentError: another live process runs as this agent on the store.
    """
    folder = os.path.join(store_dir, agent_cycle.LOCK_FOLDER)
    os.makedirs(folder, exist_ok=True)
    lock_path = os.path.join(folder, f"{agent}.lock")
    handle = open(lock_path, "a+")  # noqa: SIM115 - held for the context
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise agent_cycle.AgentError(
                f"Agent {agent!r} is already running on {store_dir} (pid {owner}); give "
                "this one another name."
            ) from error
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def _retrying(seed: Callable[[], object], done: Callable[[], bool]) -> None:
    """Runs `seed` unless `done()`; a seeder racing another agent retries (a few times)."""
    if done():
        return
    for attempt in range(5):
        try:
            seed()
            return
        except (store_lib.StoreError, ValueError):
            if done():
                return  # another agent seeded it at the same moment: as good as ours
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)


def _ensure_root(store: store_lib.Store, root_dir: str | None, random_root: bool) -> None:
    """Seeds the root of `root_dir` into a store that has none, and the random root if asked.

    The random root takes the root's architecture: without a root there is none (the
    cycle then refuses the store, `agent_view.check_state`).
    """
    if root_dir is not None:
        _retrying(
            lambda: root.seed_store(store, root_dir),
            lambda: store.load_state().root_path_id is not None,
        )
    if random_root and store.load_state().root_path_id is not None:
        path_id = f"{seeding.RANDOM_ROOT_TASK}:path"
        _retrying(
            lambda: seeding.seed_random_root(store),
            lambda: path_id in store.load_state().extra_roots,
        )


def run_agent(
    *,
    store_dir: str,
    config: agent_cycle.AgentConfig,
    data: search.TaskData,
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    cycles: int | None = None,
    max_seconds: float | None = None,
    root_dir: str | None = None,
    random_root: bool = False,
    on_publish: Callable[[agent_cycle.AgentResult], None] | None = None,
    cache: candidate.StepCache | None = None,
) -> list[agent_cycle.AgentResult]:
    """Runs one agent's cycles on a store until `cycles` ran or `max_seconds` passed.

    The agent may be killed at any moment (even by kill -9) and started again: what it
    published stays, the store never shows a half-published cycle, and a muNet cycle
    goes on from its last finished generation (`search.resume`; other staged work is
    dropped at its next cycle).

    Args:
      store_dir: the shared store (created when missing).
      config: the agent.
      data: its task's training stream and validation batches (and classes, metadata).
      test_data: (inputs, labels) for a baseline's (or multipath's) test accuracy.
      cycles: how many cycles to run now (None: no limit).
      max_seconds: start no cycle after this many seconds (None: no limit); with
        neither limit the agent runs until it is stopped.
      root_dir: a pretrained root (`./run.sh pretrain_root`) seeded when the store has
        no root yet (ignored when it has one; None: it must have one).
      random_root: also seed, when the store has none, a randomly initialised root of
        the root's architecture next to it (`seeding.seed_random_root`, its own root
        agent): one more seed of every task.
      on_publish: called with each cycle's result right after its publication (for
        multipath, after the cycle, which may have published a router path).
      cache: compiled steps shared across cycles.

    Returns:
      The cycles' results, in order.

    Raises:
      AgentError: a bad limit, or another process runs as this agent.
      agent_view.AgentStateError: the published state is malformed or foreign.
    """
    if cycles is not None and cycles < 0:
        raise agent_cycle.AgentError(f"cycles={cycles} must be >= 0.")
    if max_seconds is not None and max_seconds <= 0:
        raise agent_cycle.AgentError(f"max_seconds={max_seconds} must be > 0.")
    if config.method in baselines.METHODS and test_data is None:
        raise agent_cycle.AgentError(
            f"The {config.method!r} agent needs test_data (inputs, labels)."
        )
    start = time.monotonic()
    cache = cache or candidate.default_cache()
    results: list[agent_cycle.AgentResult] = []
    lock_folder = store_lib.local_folder_of(store_dir)
    report_dir = os.path.join(lock_folder, multipath_agent.FOLDER)
    with store_lib.open_store(store_dir) as store, agent_lock(lock_folder, config.agent):
        _ensure_root(store, root_dir, random_root)
        run_one = functools.partial(
            agent_cycle.run_cycle,
            store,
            config,
            data,
            test_data=test_data,
            cache=cache,
            report_dir=report_dir,
        )
        logger.info("agent %s (%s on %s): started", config.agent, config.method, config.task)
        while cycles is None or len(results) < cycles:
            if max_seconds is not None and time.monotonic() - start >= max_seconds:
                break
            cycle = len(results)
            result = run_one(cycle=cycle)
            results.append(result)
            minutes = (time.monotonic() - start) / 60.0
            if isinstance(result, multipath_agent.MultipathCycle):
                logger.info(
                    "agent %s: cycle %d %s; %.1fs (%.1f min in all)",
                    *(config.agent, cycle + 1, result.message, result.wall_seconds, minutes),
                )
            else:
                kind = "new" if result.new_path else "kept"
                logger.info(
                    "agent %s: cycle %d published %s (%s): quality %.4f, score %.4f, %d "
                    "candidates, %d new components, %d reused from other agents, %d retired; "
                    "%.1fs (%.1f min in all)",
                    *(config.agent, cycle + 1, result.path.id, kind, result.quality, result.score),
                    *(result.candidates, len(result.published_components)),
                    *(len(result.reused_components), len(result.retired), result.wall_seconds),
                    minutes,
                )
            if on_publish is not None:
                on_publish(result)
    return results
