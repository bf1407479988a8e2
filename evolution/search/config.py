"""A task iteration's settings (`SearchConfig`), shared by the search's modules.

They live here, below the loop (`search.loop`) and the modules it calls, so those
modules can name them without importing the loop. The task's data (`TaskData`) is in
`search.data.batches`, beside the batches it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from evolution.search.space import hparams, mutations
from evolution.system import state as system

# Where a generation's candidates train (`SearchConfig.executor`).
EXECUTORS = ("threads", "ray")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """One task iteration's settings (the notebooks' G, D, V, B, s and mutations).

    Attributes:
      generations: G, generations per task iteration.
      candidates_per_generation: D, candidates per generation.
      num_validations: V, validations per candidate.
      steps_per_validation: B, training steps between validations.
      batch_size: training batch size.
      scale: s of the score (1.0: quality only).
      seed: seeds everything random (parents, mutations, ids, initialisation, data).
      mutation_options: which mutations run (`mutations.MutationOptions`); an empty
        `id_prefix` becomes the agent's name.
      space: the hyperparameter space; None uses `iteration.default_search_space`.
      image_size_steps: the default space's image sizes: the root's side and up to
        this many patch sides below and above it (0 fixes the image size; mu3Net
        searches 16 to 112 around 32 with 16-pixel patches). Ignored with `space`.
      starting_values: (hyperparameter, value) pairs a path without hyperparameters
        starts from instead of the space's defaults (a mapping is accepted), e.g. a
        notebook's configuration {"warmup": 0.1, "crop_area_min": 0.05}; each value
        must be one of the space's values for that name. Agent runs give their
        baselines the same values (gin HPARAM_VALUES); elsewhere pass them as
        `baselines.run_baselines`' `hparam_values`.
      warmup_start: the first learning rate of a warmup, as a fraction of the
        learning rate; None keeps mu3Net's lr / 1000 (muNet's and mu2Net's notebooks
        start at lr / 100: 0.01).
      mu: the mutation rate a path without one starts from (the root's children, as
        every new task's first candidates are), a value of `hparams.MU_GRID`; None keeps
        the space's default (0.1, the notebooks'). Children inherit their parent's mu,
        which mu2Net+ then tunes; with a few candidates per task it cannot climb far, so
        a short search may start higher.
      inherit_opt_state: mu2Net+: the optimizer state (momentum) travels with the
        components: a published component is stored with its slice of the state it was
        trained with, and a child's clone starts from its source's state, held in
        memory for parents trained in this iteration, read from the store otherwise
        (other iterations, other agents).
      flops_scale: a compute factor of the score of its own, paid per root-model's
        worth of FLOPs per example (XLA cost analysis, `flops.path_flops`); 1.0 leaves
        it out unless `flops_term`.
      flops_term: mu2Net+'s compute term: the score is further multiplied by
        scale ** (flops / F), the same factor s as for parameters (F: the root path's
        FLOPs per example). Exclusive with a `flops_scale` below 1.
      population_cap: mu2Net+'s per-task population cap (None: unbounded).
      accounting: how shared parameters are paid for in the score
        (`system.state.MUNET`: the root's lock is no user; `MU2NET_PLUS`: the root
        counts as a user).
      seed_sweep: muNet: each task iteration first trains one unmutated clone of every
        seed (the root and other tasks' best paths, in that order), then selects
        parents by decaying probability; the data hyperparameters of a generation that
        holds sweep candidates are the best path's, unmutated.
      private_tasks: muNet's private tasks: their paths are never seeds (nor parents)
        of another task's candidates; they may still start from other tasks' paths.
      devices: how many local devices a generation's candidates train on at once
        (None: all; `placement.search_devices`).
      executor: where a generation's candidates train: "threads" (this process's
        devices) or "ray" (one Ray task per candidate, `ray_executor.train_candidates`).
      ray_address: the Ray cluster of executor "ray" (None: $RAY_ADDRESS, or a local
        cluster started on first use).
    """

    generations: int = 3
    candidates_per_generation: int = 4
    num_validations: int = 4
    steps_per_validation: int = 50
    batch_size: int = 32
    scale: float = 1.0
    seed: int = 0
    mutation_options: mutations.MutationOptions = dataclasses.field(
        default_factory=mutations.MutationOptions
    )
    space: hparams.HParamSpace | None = None
    image_size_steps: int = 4
    starting_values: tuple[tuple[str, Any], ...] = ()
    warmup_start: float | None = None
    mu: float | None = None
    inherit_opt_state: bool = True
    flops_scale: float = 1.0
    flops_term: bool = False
    population_cap: int | None = None
    accounting: str = system.MU2NET_PLUS
    seed_sweep: bool = False
    private_tasks: tuple[str, ...] = ()
    devices: int | None = None
    executor: str = "threads"
    ray_address: str | None = None

    def __post_init__(self):
        for name in (
            "generations",
            "candidates_per_generation",
            "num_validations",
            "steps_per_validation",
            "batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name}={getattr(self, name)} must be >= 1.")
        if self.image_size_steps < 0:
            raise ValueError(f"SearchConfig.image_size_steps={self.image_size_steps} must be >= 0.")
        for name in ("scale", "flops_scale"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"SearchConfig.{name}={getattr(self, name)} must be in (0, 1].")
        if self.warmup_start is not None and not 0.0 < self.warmup_start <= 1.0:
            raise ValueError(
                f"SearchConfig.warmup_start={self.warmup_start} must be in (0, 1]: the "
                "warmup's first learning rate as a fraction of the learning rate."
            )
        if self.mu is not None and self.mu not in hparams.MU_GRID:
            raise ValueError(
                f"SearchConfig.mu={self.mu} is not on the grid of mutation rates "
                f"{list(hparams.MU_GRID)}."
            )
        if self.flops_term and self.flops_scale < 1.0:
            raise ValueError(
                "SearchConfig.flops_term uses the scale for FLOPs; leave flops_scale at 1.0."
            )
        if self.accounting not in system.ACCOUNTINGS:
            raise ValueError(
                f"SearchConfig.accounting={self.accounting!r} is unknown; use one of "
                f"{system.ACCOUNTINGS}."
            )
        object.__setattr__(self, "private_tasks", tuple(str(t) for t in self.private_tasks))
        object.__setattr__(
            self, "starting_values", tuple(sorted(dict(self.starting_values).items()))
        )
        if self.population_cap is not None and self.population_cap < 1:
            raise ValueError(f"SearchConfig.population_cap={self.population_cap} must be >= 1.")
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"SearchConfig.executor={self.executor!r} is unknown; use one of {EXECUTORS}."
            )
