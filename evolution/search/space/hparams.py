"""The hyperparameter space of the muNet family, and its mutations.

Every hyperparameter is an index into a tuple of allowed values; a mutation moves the
index by +1 or -1 (probability 1/2 each, clipped at the ends of the tuple). Data
hyperparameters (image size, augmentation) are shared by all candidates of one
generation, because they share the input pipeline: the generation starts from the best
path's data values and mutates them once (`generation_data`); every other
hyperparameter is a model hyperparameter, mutated per candidate.

mu2Net+ makes the mutation rates self-tuning: `mu` is itself a hyperparameter (an
index into `MU_GRID`), and every mutation name ("hp:lr", "clone:block_3",
"add:adapter_2", "add:block", "remove:layers") carries its own probability, an index
into the same grid, inherited from the parent and itself moved by +-1 with probability
mu whenever a child consults it (`MutationRates`). A name without an inherited rate
starts at the parent's mu.

Values are stored as JSON (`HParams.to_json`): indices, not the values, so a search
resumes exactly; `HParamSpace.values` resolves them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Mutation-name prefixes (the keys of the self-tuned rates).
HPARAM_PREFIX = "hp:"
MU = "mu"

# mu and every self-tuned rate live on this grid (mu2Net+: 0.02 .. 0.30).
MU_GRID: tuple[float, ...] = tuple(round(0.02 * k, 2) for k in range(1, 16))

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "restarts")
WARMUP_FRACTIONS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
MOMENTA: tuple[float | None, ...] = (None, 0.5, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
NESTEROV: tuple[bool, ...] = (False, True)
ADAPTER_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128)
# Augmentation strengths, weakest first: mu3Net's lists ("ds_area_range_min",
# "ds_aspect_ratio_range_min", "ds_flip_left_right", "ds_*_delta"), reversed where the
# notebook lists them strongest first (a mutation moves to a neighbour either way).
CROP_AREA_MIN: tuple[float, ...] = (1.0, 0.95, 0.5, 0.05)
ASPECT_RATIO_MIN: tuple[float, ...] = (1.0, 0.75, 0.5)
FLIP: tuple[bool, ...] = (False, True)
MIXUP_ALPHA: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0)
COLOUR_DELTA: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
BRIGHTNESS_DELTA = CONTRAST_DELTA = SATURATION_DELTA = HUE_DELTA = COLOUR_DELTA


def learning_rate_grid(smallest: float = 1e-4, largest: float = 0.5) -> tuple[float, ...]:
    """A 1-2-5 logarithmic grid of learning rates (1e-4, 2e-4, 5e-4, 1e-3, ..., 0.5).

    Args:
      smallest: the first value kept.
      largest: the last value kept.

    Returns:
      The ascending grid, values written as decimal literals (e.g. exactly 2e-4).
    """
    grid = []
    for exponent in range(-12, 4):
        for mantissa in (1, 2, 5):
            value = float(f"{mantissa}e{exponent}")
            if smallest * (1 - 1e-9) <= value <= largest * (1 + 1e-9):
                grid.append(value)
    if not grid:
        raise ValueError(f"No learning rate in [{smallest}, {largest}].")
    return tuple(grid)


def image_sizes(patch_size: int, image_size: int, steps: int = 4) -> tuple[int, ...]:
    """Image sides around `image_size` that a ViT with `patch_size` can take.

    Args:
      patch_size: the ViT patch side; every size is a multiple of it.
      image_size: the centre of the range (a multiple of `patch_size`).
      steps: how many patch-size steps the range extends below and above.

    Returns:
      Ascending sizes from max(patch_size, image_size - steps * patch_size) to
      image_size + steps * patch_size.

    Raises:
      ValueError: `image_size` is not a positive multiple of `patch_size`.
    """
    if patch_size < 1 or image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}.")
    low = max(patch_size, image_size - steps * patch_size)
    return tuple(range(low, image_size + steps * patch_size + 1, patch_size))


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its allowed values and the index a new path starts from.

    Attributes:
      name: the hyperparameter's name (its mutation is named "hp:<name>").
      values: the allowed values, JSON-safe, in the order a mutation walks them.
      default: index of the starting value.
      data: True for data hyperparameters (shared by a generation).
    """

    name: str
    values: tuple[Any, ...]
    default: int
    data: bool = False

    def __post_init__(self):
        if not self.name:
            raise ValueError("A hyperparameter needs a name.")
        object.__setattr__(self, "values", tuple(self.values))
        if not self.values:
            raise ValueError(f"Hyperparameter {self.name!r} has no values.")
        if not 0 <= self.default < len(self.values):
            raise ValueError(
                f"Hyperparameter {self.name!r} default {self.default} outside "
                f"0..{len(self.values) - 1}."
            )


@dataclasses.dataclass(frozen=True)
class HParams:
    """A path's hyperparameters: indices into the space plus self-tuned mutation rates.

    Attributes:
      indices: hyperparameter name -> index into its `HParam.values`.
      rates: mutation name -> index into `MU_GRID` (mu2Net+; absent names use mu).
    """

    indices: Mapping[str, int]
    rates: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "indices", {str(k): int(v) for k, v in self.indices.items()})
        object.__setattr__(self, "rates", {str(k): int(v) for k, v in self.rates.items()})
        for name, index in self.rates.items():
            if not 0 <= index < len(MU_GRID):
                raise ValueError(f"Rate of {name!r} has index {index} outside MU_GRID.")

    def to_json(self) -> dict[str, Any]:
        """The JSON-safe form stored with a path (`system.Path.hparams`)."""
        return {
            "indices": dict(sorted(self.indices.items())),
            "rates": dict(sorted(self.rates.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HParams:
        """Reads the form written by `to_json` (an empty mapping gives empty hparams).

        Args:
          data: {"indices": {...}, "rates": {...}}.

        Returns:
          The hyperparameters.
        """
        unknown = set(data) - {"indices", "rates"}
        if unknown:
            raise ValueError(f"Unknown hyperparameter fields {sorted(unknown)}.")
        return cls(dict(data.get("indices", {})), dict(data.get("rates", {})))

    def replace(
        self, indices: Mapping[str, int] | None = None, rates: Mapping[str, int] | None = None
    ) -> HParams:
        """A copy with some indices and/or rates overridden (others kept)."""
        return HParams({**self.indices, **(indices or {})}, {**self.rates, **(rates or {})})


@dataclasses.dataclass(frozen=True)
class HParamSpace:
    """The hyperparameters a method searches, as data.

    Attributes:
      hparams: the hyperparameters, in the (fixed) order mutations visit them; one of
        them must be named "mu" and take its values from `MU_GRID`.
    """

    hparams: tuple[HParam, ...]

    def __post_init__(self):
        object.__setattr__(self, "hparams", tuple(self.hparams))
        names = [h.name for h in self.hparams]
        if len(set(names)) != len(names):
            raise ValueError(f"Hyperparameter names repeat: {names}.")
        by_name = {h.name: h for h in self.hparams}
        if MU not in by_name or by_name[MU].values != MU_GRID:
            raise ValueError(f"The space needs a hyperparameter {MU!r} with values MU_GRID.")

    def __getitem__(self, name: str) -> HParam:
        for hparam in self.hparams:
            if hparam.name == name:
                return hparam
        raise KeyError(f"Unknown hyperparameter {name!r}.")

    @property
    def names(self) -> tuple[str, ...]:
        """All hyperparameter names, in order."""
        return tuple(h.name for h in self.hparams)

    @property
    def data_names(self) -> tuple[str, ...]:
        """The data hyperparameters (shared by a generation), in order."""
        return tuple(h.name for h in self.hparams if h.data)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The per-candidate hyperparameters, in order."""
        return tuple(h.name for h in self.hparams if not h.data)

    def with_default(self, name: str, value: Any) -> HParamSpace:
        """The same space, with hyperparameter `name` starting at `value`.

        Args:
          name: a hyperparameter of the space.
          value: one of its allowed values.

        Returns:
          The space; only that hyperparameter's default index differs.

        Raises:
          KeyError: no hyperparameter `name`.
          ValueError: `value` is not one of its values.
        """
        hparam = self[name]
        if value not in hparam.values:
            raise ValueError(
                f"{value!r} is not an allowed value of {name!r}; allowed: {list(hparam.values)}."
            )
        changed = dataclasses.replace(hparam, default=hparam.values.index(value))
        return HParamSpace(tuple(changed if h.name == name else h for h in self.hparams))

    def defaults(self) -> HParams:
        """The starting hyperparameters of a new path (no inherited rates)."""
        return HParams({h.name: h.default for h in self.hparams})

    def complete(self, hparams: HParams) -> HParams:
        """Checks `hparams` against the space and fills missing names with defaults.

        Args:
          hparams: hyperparameters, e.g. read from a path written by an older space.

        Returns:
          Hyperparameters with an in-range index for every name of the space.

        Raises:
          ValueError: an unknown name or an index out of range.
        """
        unknown = set(hparams.indices) - set(self.names)
        if unknown:
            raise ValueError(f"Unknown hyperparameters {sorted(unknown)}.")
        indices = {}
        for hparam in self.hparams:
            index = hparams.indices.get(hparam.name, hparam.default)
            if not 0 <= index < len(hparam.values):
                raise ValueError(
                    f"Index {index} of {hparam.name!r} outside 0..{len(hparam.values) - 1}."
                )
            indices[hparam.name] = index
        return HParams(indices, hparams.rates)

    def values(self, hparams: HParams) -> dict[str, Any]:
        """Resolves indices to values, e.g. {"lr": 0.01, "schedule": "cosine", ...}."""
        complete = self.complete(hparams)
        return {h.name: h.values[complete.indices[h.name]] for h in self.hparams}

    def mu(self, hparams: HParams) -> float:
        """The path's mutation rate mu."""
        return MU_GRID[self.complete(hparams).indices[MU]]


def default_space(
    *,
    patch_size: int = 16,
    image_size: int = 224,
    image_size_steps: int = 4,
    learning_rates: Sequence[float] | None = None,
) -> HParamSpace:
    """The notebooks' search space (learning rate, schedule, momentum, data, adapters, mu).

    Defaults: lr 0.01, cosine schedule, warmup 0.05, momentum 0.9, no Nesterov, adapter
    size 32, mu 0.1; image size `image_size`, random crop off (area and aspect ratio
    1), flip on, no mixup, no brightness, contrast, saturation or hue jitter. The data
    value lists are mu3Net's (`config_add_auto_tune`).

    Args:
      patch_size: the ViT patch side (image sizes are its multiples).
      image_size: the root model's image side (the default image size).
      image_size_steps: patch-size steps the image size may move below and above.
      learning_rates: the learning-rate grid (default `learning_rate_grid()`).

    Returns:
      The space.
    """
    lrs = tuple(learning_rates) if learning_rates is not None else learning_rate_grid()
    sizes = image_sizes(patch_size, image_size, image_size_steps)
    lr_default = int(np.argmin([abs(np.log(lr / 0.01)) for lr in lrs]))
    return HParamSpace(
        (
            HParam("lr", lrs, lr_default),
            HParam("schedule", SCHEDULES, SCHEDULES.index("cosine")),
            HParam("warmup", WARMUP_FRACTIONS, WARMUP_FRACTIONS.index(0.05)),
            HParam("momentum", MOMENTA, MOMENTA.index(0.9)),
            HParam("nesterov", NESTEROV, 0),
            HParam("adapter_size", ADAPTER_SIZES, ADAPTER_SIZES.index(32)),
            HParam(MU, MU_GRID, MU_GRID.index(0.1)),
            HParam("image_size", sizes, sizes.index(image_size), data=True),
            HParam("crop_area_min", CROP_AREA_MIN, 0, data=True),
            HParam("aspect_ratio_min", ASPECT_RATIO_MIN, 0, data=True),
            HParam("flip", FLIP, 1, data=True),
            HParam("mixup", MIXUP_ALPHA, 0, data=True),
            HParam("brightness", BRIGHTNESS_DELTA, 0, data=True),
            HParam("contrast", CONTRAST_DELTA, 0, data=True),
            HParam("saturation", SATURATION_DELTA, 0, data=True),
            HParam("hue", HUE_DELTA, 0, data=True),
        )
    )


def move_index(index: int, size: int, rng: np.random.Generator) -> int:
    """Moves an index by -1 or +1 (probability 1/2 each), clipped to 0..size-1.

    Consumes exactly one draw from `rng`.

    Args:
      index: the current index.
      size: the number of allowed values.
      rng: the generator.

    Returns:
      The new index (unchanged when the move falls off an end).
    """
    step = 1 if rng.random() < 0.5 else -1
    return int(min(max(index + step, 0), size - 1))


Probabilities = Mapping[str, float] | Callable[[str], float]


def _probability_of(name: str, mu: float, probabilities: Probabilities | None) -> float:
    if probabilities is None:
        return mu
    if callable(probabilities):
        return float(probabilities(name))
    return float(probabilities.get(name, mu))


def mutate_hparams(
    hparams: HParams,
    rng: np.random.Generator,
    mu: float = 0.1,
    probabilities: Probabilities | None = None,
    *,
    space: HParamSpace,
    names: Iterable[str] | None = None,
) -> tuple[HParams, tuple[str, ...]]:
    """Mutates hyperparameters: each moves its index by +-1 with its own probability.

    For each name in order, the probability of "hp:<name>" is looked up (a mapping,
    or a callable such as `MutationRates.probability`, which may itself draw), then one
    uniform draw decides, and a mutation consumes one more draw (`move_index`).

    Args:
      hparams: the parent's hyperparameters.
      rng: the generator.
      mu: the probability of names that `probabilities` does not give.
      probabilities: mutation name -> probability, or a callable of the name.
      space: the hyperparameter space.
      names: the hyperparameters to consider (default: all of the space, in order).

    Returns:
      (the child's hyperparameters, the applied mutation names such as "hp:lr"; a
      mutation clipped at an end of its grid is applied but leaves the index).
    """
    current = space.complete(hparams)
    indices = dict(current.indices)
    applied = []
    for name in space.names if names is None else tuple(names):
        hparam = space[name]
        key = HPARAM_PREFIX + name
        if rng.random() < _probability_of(key, mu, probabilities):
            indices[name] = move_index(indices[name], len(hparam.values), rng)
            applied.append(key)
    return current.replace(indices=indices), tuple(applied)


class MutationRates:
    """The self-tuned mutation probabilities of one child (mu2Net+).

    The first time a child consults a mutation name, the parent's rate index for it
    (or, when the parent has none, the parent's mu index) is inherited and, with
    probability mu (the parent's), moved by +-1 on `MU_GRID`; the result is recorded for
    the child and returned on every later look-up. Names never consulted keep the
    parent's rate. With `self_tuning=False` (muNet, mu2Net) every name has probability
    mu and nothing is drawn or recorded.
    """

    def __init__(
        self,
        parent: HParams,
        space: HParamSpace,
        rng: np.random.Generator,
        *,
        self_tuning: bool = True,
    ):
        """Starts the child's rates from the parent's.

        Args:
          parent: the parent's hyperparameters (its mu and rates).
          space: the hyperparameter space.
          rng: the generator (shared with the rest of the child's planning).
          self_tuning: mu2Net+ self-tuned rates; False gives the constant mu.
        """
        complete = space.complete(parent)
        self._mu_index = complete.indices[MU]
        self._rng = rng
        self._self_tuning = self_tuning
        self._rates = dict(complete.rates)
        self._consulted: set[str] = set()

    @property
    def mu(self) -> float:
        """The parent's mu, the probability with which rates move."""
        return MU_GRID[self._mu_index]

    def probability(self, name: str) -> float:
        """The child's probability of mutation `name` (drawn on first use).

        Args:
          name: a mutation name, e.g. "hp:lr", "clone:block_3", "add:block".

        Returns:
          A value of `MU_GRID`.
        """
        if not self._self_tuning:
            return self.mu
        if name not in self._consulted:
            index = self._rates.get(name, self._mu_index)
            if self._rng.random() < self.mu:
                index = move_index(index, len(MU_GRID), self._rng)
            self._rates[name] = index
            self._consulted.add(name)
        return MU_GRID[self._rates[name]]

    def child_rates(self) -> dict[str, int]:
        """The child's rates: the parent's, with the consulted ones as drawn."""
        return dict(self._rates)


def generation_data(
    best: HParams,
    rng: np.random.Generator,
    *,
    space: HParamSpace,
    mu: float | None = None,
    self_tuning: bool = False,
) -> tuple[HParams, tuple[str, ...]]:
    """The data hyperparameters of one generation: the best path's, mutated once.

    As mu3Net's `sample_ds_hparams`: the best path's data values and (mu2Net+) their
    rates are copied, and each data name mutates with its rate; with `self_tuning` the
    rate itself first moves, as a child's rates do (`MutationRates`), and the
    generation's rates go to every child of the generation with its values.

    Args:
      best: the hyperparameters of the task's best path (or of the parent when the task
        has none).
      rng: the generator.
      space: the hyperparameter space.
      mu: a fixed mutation probability (rates neither used nor moved); None uses the
        best path's own rates (its mu for names it has no rate for).
      self_tuning: mu2Net+'s self-tuned rates (with `mu` None).

    Returns:
      (the generation's data hyperparameters: indices of the data names and, with
      `self_tuning`, the rates of their "hp:" names; the applied mutation names).
    """
    complete = space.complete(best)
    keys = {HPARAM_PREFIX + name for name in space.data_names}
    if mu is None:
        rates = MutationRates(complete, space, rng, self_tuning=self_tuning)
        mutated, applied = mutate_hparams(
            complete, rng, rates.mu, rates.probability, space=space, names=space.data_names
        )
        data_rates = rates.child_rates() if self_tuning else {}
    else:
        mutated, applied = mutate_hparams(complete, rng, mu, space=space, names=space.data_names)
        data_rates = dict(complete.rates) if self_tuning else {}
    indices = {name: mutated.indices[name] for name in space.data_names}
    return HParams(indices, {k: v for k, v in data_rates.items() if k in keys}), applied


def with_data(hparams: HParams, data: HParams, *, space: HParamSpace) -> HParams:
    """A candidate's hyperparameters with its generation's data hyperparameters.

    Args:
      hparams: the candidate's hyperparameters.
      data: from `generation_data` (its indices and rates replace the candidate's).
      space: the hyperparameter space.

    Returns:
      The hyperparameters, data names (and their rates) replaced.

    Raises:
      ValueError: `data` names a model hyperparameter or misses a data one.
    """
    if set(data.indices) != set(space.data_names):
        raise ValueError(
            f"Data hyperparameters {sorted(data.indices)} != "
            f"the space's {sorted(space.data_names)}."
        )
    return space.complete(hparams.replace(indices=data.indices, rates=data.rates))
