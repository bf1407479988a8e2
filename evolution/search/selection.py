"""Parent selection (decaying probability with a uniform fallback) and the task order.

muNet walks a task's paths from the best score down and takes each with probability
0.5 ** (times it was already a parent), so good paths are explored first but each use
halves the chance of being chosen again. When the walk takes nothing, the parent is
drawn uniformly among the task's paths and the seeds (the root and other tasks' best
paths), which is also how a new task picks its first parents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DECAY = 0.5


def _candidates(paths_by_score_desc: Sequence[str], seeds: Sequence[str]) -> list[str]:
    """The fallback pool: task paths then seeds, each id once."""
    return list(dict.fromkeys([*paths_by_score_desc, *seeds]))


def _take_probability(path_id: str, offspring_counts: Mapping[str, int]) -> float:
    count = int(offspring_counts.get(path_id, 0))
    if count < 0:
        raise ValueError(f"offspring count of {path_id!r} is {count} < 0.")
    return DECAY**count


def select_parent(
    paths_by_score_desc: Sequence[str],
    offspring_counts: Mapping[str, int],
    seeds: Sequence[str],
    rng: np.random.Generator,
) -> str:
    """Draws the parent of the next candidate.

    Consumes one uniform draw per path visited by the walk, plus one integer draw when
    the walk falls back, so a seeded generator gives a reproducible sequence.

    Args:
      paths_by_score_desc: the task's own path ids, best first
        (`SystemState.active_paths(task)`).
      offspring_counts: path id -> times it was already selected as a parent
        (missing: 0).
      seeds: seed path ids (`SystemState.seed_paths(task)`).
      rng: the generator.

    Returns:
      The chosen path id.

    Raises:
      ValueError: there is neither a task path nor a seed.
    """
    pool = _candidates(paths_by_score_desc, seeds)
    if not pool:
        raise ValueError("No parent to select: the task has no paths and there are no seeds.")
    for path_id in paths_by_score_desc:
        if rng.random() < _take_probability(path_id, offspring_counts):
            return path_id
    return pool[int(rng.integers(len(pool)))]


def selection_probabilities(
    paths_by_score_desc: Sequence[str],
    offspring_counts: Mapping[str, int],
    seeds: Sequence[str],
) -> dict[str, float]:
    """The exact distribution that `select_parent` draws from.

    Path i of the walk is taken with p_i * prod_{j<i} (1 - p_j), p = 0.5 ** offspring;
    the remaining mass prod_j (1 - p_j) is spread evenly over task paths and seeds.

    Args:
      paths_by_score_desc: as for `select_parent`.
      offspring_counts: as for `select_parent`.
      seeds: as for `select_parent`.

    Returns:
      path id -> probability (summing to 1).

    Raises:
      ValueError: there is neither a task path nor a seed.
    """
    pool = _candidates(paths_by_score_desc, seeds)
    if not pool:
        raise ValueError("No parent to select: the task has no paths and there are no seeds.")
    probabilities = dict.fromkeys(pool, 0.0)
    remaining = 1.0
    for path_id in paths_by_score_desc:
        take = _take_probability(path_id, offspring_counts)
        probabilities[path_id] += remaining * take
        remaining *= 1.0 - take
    for path_id in pool:
        probabilities[path_id] += remaining / len(pool)
    return probabilities


def next_task(task_order: Sequence[str], previous: str | None) -> str:
    """The round-robin successor of `previous` among the tasks, in the order they were added.

    Tasks added since `previous` ran get their turn when the round reaches them, so a
    new task joins the rotation without restarting it.

    Args:
      task_order: task names in the order they were added (`SystemState.task_order`).
      previous: the task iterated last; None (or a task no longer listed) starts from
        the first task.

    Returns:
      The task to iterate next.

    Raises:
      ValueError: there are no tasks.
    """
    if not task_order:
        raise ValueError("No tasks to iterate.")
    if previous is None or previous not in task_order:
        return task_order[0]
    return task_order[(list(task_order).index(previous) + 1) % len(task_order)]
