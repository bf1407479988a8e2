"""`./run.sh agents_ray`: several agents as Ray tasks on one shared store.

    ./run.sh agents_ray --gin_file=gin/runs/agents_ray.gin \
      --gin.STORE="'postgresql://evogrow@DB_HOST:5432/evogrow?params_dir=/shared/evo'" \
      --gin.TASKS="['digits_rgb32_v1', 'fashion_rgb32_v1']" --gin.METHODS="['munet']"

One agent per (task, method) pair, named "<method>-<task>", each a Ray task with one
CPU on the cluster at $RAY_ADDRESS (or RAY_ADDRESS bound in gin; with neither, a local
cluster on this machine). Multi-machine set-up: `evolution.search.execution.ray_executor`.
"""

from __future__ import annotations

from collections.abc import Sequence

from evolution.agents import agent_cycle, ray_agents
from evolution.search import loop as search


def agents_ray(
    *,
    store: str,
    tasks: Sequence[str],
    methods: Sequence[str] = (agent_cycle.MUNET,),
    root_dir: str | None = None,
    cycles: int | None = 1,
    max_seconds: float | None = None,
    concurrent: bool = True,
    ray_address: str | None = None,
    search_config: search.SearchConfig | None = None,
    baseline: agent_cycle.BaselineSettings | None = None,
    eval_batch_size: int = 256,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    max_test_examples: int | None = None,
) -> list[list[agent_cycle.AgentResult]]:
    """Entry point: runs one agent per (task, method) pair on Ray and waits for them.

    Args:
      store: the shared store location: `postgresql://...?params_dir=/shared/dir`
        across machines, or a directory (the embedded SQLite store, one machine).
      tasks: the seqio tasks (`import tasks` registers them).
      methods: the methods each task gets an agent of (`agent_cycle.METHODS`: "munet",
        "finetune", "freeze", "adapters", ...).
      root_dir: a pretrained root seeded when the store has none (None: the store must
        have a root).
      cycles: cycles per agent (None: until `max_seconds`).
      max_seconds: start no cycle after this many seconds (None: no limit).
      concurrent: all agents at once, or one after another (deterministic outcome).
      ray_address: the Ray cluster (None: $RAY_ADDRESS, else a local cluster).
      search_config: a muNet cycle's settings (baselines use its steps per
        validation, batch size, scale, FLOPs scale and seed); None: the defaults.
      baseline: a baseline agent's method parameters; None: the defaults.
      eval_batch_size: validation and test batch size.
      max_train_examples: cap on each task's training examples (None: all).
      max_eval_examples: cap on its validation examples (None: all).
      max_test_examples: cap on its test examples, read by baselines (None: all).

    Returns:
      Each agent's cycle results, in (task, method) order.

    Raises:
      agent_cycle.AgentError: a bad configuration (no tasks, an unknown method, no limit).
      ImportError: Ray is not installed.
    """
    if not tasks or not methods:
        raise agent_cycle.AgentError("agents_ray needs at least one task and one method.")
    configs = [
        agent_cycle.AgentConfig(
            task=task,
            method=method,
            search=search_config or search.SearchConfig(),
            baseline=baseline or agent_cycle.BaselineSettings(),
        )
        for task in tasks
        for method in methods
    ]
    data_fn = ray_agents.SeqioAgentData(
        eval_batch_size=eval_batch_size,
        max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples,
        max_test_examples=max_test_examples,
    )
    results = ray_agents.run_agents(
        store=store,
        configs=configs,
        data_fn=data_fn,
        cycles=cycles,
        max_seconds=max_seconds,
        root_dir=root_dir,
        concurrent=concurrent,
        ray_address=ray_address,
    )
    for config, cycles_run in zip(configs, results, strict=True):
        if not cycles_run:
            print(f"agent {config.agent}: no cycle ran")
            continue
        last = cycles_run[-1]
        if not isinstance(last, agent_cycle.CycleResult):  # a multipath agent's own record
            print(f"agent {config.agent}: {len(cycles_run)} cycles; last: {last.message}")
            continue
        new_paths = sum(getattr(r, "new_path", False) for r in cycles_run)
        print(
            f"agent {config.agent}: {len(cycles_run)} cycles, {new_paths} new paths; "
            f"live path {last.path.id}: "
            f"quality {last.quality:.4f}, score {last.score:.4f}, "
            f"{len(last.reused_components)} components of other agents"
        )
    return results
