"""The scale-controlled score of a path and the acceptance rule of a candidate.

muNet scores a path by its quality discounted for the parameters it adds to the
system: score = quality * s ** (accounted_params / P), with P the root model's
parameter count and s in (0, 1] (1.0: quality only; 0.9 .. 0.99 trade quality for
size). mu2Net+ may further discount compute: * s_f ** (flops / F) with F the root's.
"""

from __future__ import annotations

import math


def _check_scale(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value} must be in (0, 1]; 1.0 disables the penalty.")


def score(
    quality: float,
    accounted_params: float,
    root_params: float,
    *,
    scale: float = 1.0,
    flops: float | None = None,
    root_flops: float | None = None,
    flops_scale: float = 1.0,
) -> float:
    """The scale-controlled score of a path.

    Args:
      quality: the best validation quality of the path (e.g. accuracy in [0, 1]).
      accounted_params: the parameters the path pays for
        (`SystemState.accounted_params`).
      root_params: P, the root model's parameter count.
      scale: s, the factor paid per root-model's worth of accounted parameters.
      flops: the path's FLOPs per example; None leaves compute out of the score.
      root_flops: F, the root model's FLOPs per example (required with `flops`).
      flops_scale: the factor paid per root-model's worth of FLOPs.

    Returns:
      quality * scale ** (accounted_params / root_params)
      [* flops_scale ** (flops / root_flops)].

    Raises:
      ValueError: non-finite quality, negative sizes, non-positive units, a scale
        outside (0, 1], or `flops` without `root_flops`.
    """
    if not math.isfinite(quality):
        raise ValueError(f"quality={quality} must be finite.")
    if accounted_params < 0:
        raise ValueError(f"accounted_params={accounted_params} must be >= 0.")
    if root_params <= 0:
        raise ValueError(f"root_params={root_params} must be > 0.")
    _check_scale(scale, "scale")
    result = quality * scale ** (accounted_params / root_params)
    if flops is None:
        return result
    if root_flops is None or root_flops <= 0:
        raise ValueError(f"root_flops={root_flops} must be > 0 when flops is given.")
    if flops < 0:
        raise ValueError(f"flops={flops} must be >= 0.")
    _check_scale(flops_scale, "flops_scale")
    return result * flops_scale ** (flops / root_flops)


def accept(child_score: float, parent_score: float | None, same_task: bool) -> bool:
    """Whether a trained candidate joins its task's population.

    A candidate whose parent belongs to the same task must score at least as well as
    the parent; a candidate grown from another task's path or the root (a task's first
    candidates) is always accepted.

    Args:
      child_score: the candidate's score.
      parent_score: the parent's score (ignored when not `same_task`; None counts as
        an unscored parent, which any candidate beats).
      same_task: whether the parent path belongs to the candidate's task.

    Returns:
      True when the candidate is accepted.
    """
    if not same_task or parent_score is None:
        return True
    return child_score >= parent_score
