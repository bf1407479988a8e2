"""Planning a child path from a parent path (muNet / mu2Net / mu2Net+ mutations).

`plan_child` is pure and deterministic for a numpy Generator: it mutates the
hyperparameters, may remove the top block (with its adapter), add a new block on top or
insert residual adapters, and decides for every inherited component whether the child
references it (frozen, shared) or trains a fresh clone of it:

- a component no other task holds a lock on is always cloned (a task trains only its
  own fresh clones, so a published path never changes);
- the final norm is always cloned;
- the head is inherited (cloned, by the rule above) only from a parent of the same
  task, else the child gets a fresh head;
- any other frozen component is cloned with probability p("clone:<slot>"), else
  referenced.

The plan (`MutationPlan`) names the child path and, for each slot, what the caller must
do: reference, copy from a parent component (and, per mu2Net+, its optimizer state),
initialise from scratch, or take from function-preserving depth growth
(`grow_top_block`, spec/growth.md), so a grown child starts with its parent's exact
function. `materialize` does that for the parameters of any `evolution.system.families` model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import growth
from evolution.search.space.hparams import (
    HParams,
    HParamSpace,
    MutationRates,
    mutate_hparams,
    with_data,
)
from evolution.system import families
from evolution.system import state as system
from models import adapters

REFERENCE = "reference"
CLONE = "clone"
INIT = "init"
GROW = "grow"
ACTIONS = (REFERENCE, CLONE, INIT, GROW)

ADD_BLOCK = "add:block"
REMOVE_LAYERS = "remove:layers"
CLONE_PREFIX = "clone:"
ADD_PREFIX = "add:"

_BLOCK_RE = re.compile(r"block_(\d+)")
_ADAPTER_RE = re.compile(r"adapter_(\d+)")


def slot_kind(slot: str) -> str:
    """The component kind of a slot: "block_3" -> "block", "adapter_1" -> "adapter", else itself."""
    if _BLOCK_RE.fullmatch(slot):
        return "block"
    if _ADAPTER_RE.fullmatch(slot):
        return "adapter"
    return slot


@dataclasses.dataclass(frozen=True)
class MutationOptions:
    """Which mutations a method uses (muNet, mu2Net, mu2Net+ and the baselines).

    Attributes:
      self_tuning: mu2Net+ self-tuned per-name rates; False uses the path's mu for all.
      add_blocks: allow a new block on top (mu2Net on).
      remove_layers: allow dropping the top block.
      adapters: allow inserting residual adapters before blocks.
      min_layers: removal never goes below this many blocks.
      max_layers: adding never goes above this many blocks (None: no limit).
      fixed_probabilities: probabilities that bypass mu and the rates, by exact name
        ("add:block") or by prefix ("clone:*"); e.g. {"clone:*": 0.0} freezes every
        shared component.
      id_prefix: prefix of every new id (the agent's name keeps agents' ids apart).
    """

    self_tuning: bool = True
    add_blocks: bool = True
    remove_layers: bool = True
    adapters: bool = False
    min_layers: int = 1
    max_layers: int | None = None
    fixed_probabilities: Mapping[str, float] = dataclasses.field(default_factory=dict)
    id_prefix: str = ""

    def __post_init__(self):
        if self.min_layers < 0:
            raise ValueError(f"min_layers={self.min_layers} < 0.")
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ValueError(f"max_layers={self.max_layers} < min_layers={self.min_layers}.")
        for name, p in self.fixed_probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Fixed probability of {name!r} is {p}, outside [0, 1].")


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """What the child does for one slot.

    Attributes:
      slot: the slot name ("embed", "adapter_2", "block_2", "head", ...).
      component_id: the component the child path references there (a parent's id
        when referenced, else a new id).
      action: "reference" (shared, frozen), "clone" (copy `source`'s parameters and
        optimizer state, then train), "init" (fresh initialisation: a new head or
        adapter) or "grow" (a new block from function-preserving depth growth).
      source: the parent component referenced or cloned, else None.
      config: the new component's architecture, JSON-safe (e.g. {"size": 32} for an
        adapter).
    """

    slot: str
    component_id: str
    action: str
    source: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown action {self.action!r}; expected one of {ACTIONS}.")
        if (self.action in (REFERENCE, CLONE)) != (self.source is not None):
            raise ValueError(f"Slot {self.slot!r}: action {self.action!r} and source disagree.")

    @property
    def kind(self) -> str:
        """The component kind ("block", "adapter", "head", ...)."""
        return slot_kind(self.slot)

    @property
    def trainable(self) -> bool:
        """Whether the child trains this slot (only its own new components)."""
        return self.action != REFERENCE


@dataclasses.dataclass(frozen=True)
class MutationPlan:
    """A planned child: its path and how to obtain each of its components.

    Attributes:
      path: the child path (new id, parent id, task, agent, hparams JSON, components,
        generation, architecture with the new "num_layers").
      slots: one `SlotPlan` per child slot, in path order.
      hparams: the child's hyperparameters (also in `path.hparams`).
      applied: the mutation names applied, in the order they were drawn ("hp:lr",
        "remove:layers", "add:block", "add:adapter_2", "clone:block_3", ...).
      num_layers: the child's number of blocks.
      init_seed: seed of the fresh and grown components' initialisation (`materialize`).
      skipped: mutation name -> why the parent's model family cannot take it (e.g.
        "add:block" on a post-norm encoder: `families.add_block_refusal`); not drawn.
    """

    path: system.Path
    slots: tuple[SlotPlan, ...]
    hparams: HParams
    applied: tuple[str, ...]
    num_layers: int
    init_seed: int
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def referenced(self) -> tuple[str, ...]:
        """Ids of the parent components the child shares (frozen for it)."""
        return tuple(s.component_id for s in self.slots if s.action == REFERENCE)

    @property
    def clones(self) -> dict[str, str]:
        """New component id -> the parent component it copies (parameters and optimizer state)."""
        return {s.component_id: s.source for s in self.slots if s.source and s.action == CLONE}

    @property
    def fresh(self) -> dict[str, str]:
        """New component id -> slot, for components initialised from scratch or by growth."""
        return {s.component_id: s.slot for s in self.slots if s.action in (INIT, GROW)}

    @property
    def trainable_ids(self) -> tuple[str, ...]:
        """Ids the child trains: all new (cloned, fresh or grown), never a parent's."""
        return tuple(s.component_id for s in self.slots if s.trainable)


def _split_layers(path: system.Path) -> tuple[list, list, list]:
    """Splits a path's slots into prefix, per-block (adapter pair or None, block pair), suffix.

    Raises:
      ValueError: blocks not numbered 0..L-1 in order, or an adapter not directly before
        its block.
    """
    prefix: list[tuple[str, str]] = []
    layers: list[tuple[tuple[str, str] | None, tuple[str, str]]] = []
    suffix: list[tuple[str, str]] = []
    pending_adapter: tuple[str, str] | None = None
    for slot, cid in path.components:
        adapter = _ADAPTER_RE.fullmatch(slot)
        block = _BLOCK_RE.fullmatch(slot)
        if adapter or block:
            if suffix:
                raise ValueError(f"Path {path.id!r}: {slot!r} after {suffix[0][0]!r}.")
            if adapter:
                if pending_adapter is not None or int(adapter.group(1)) != len(layers):
                    raise ValueError(f"Path {path.id!r}: misplaced adapter {slot!r}.")
                pending_adapter = (slot, cid)
            else:
                assert block is not None
                if int(block.group(1)) != len(layers):
                    raise ValueError(f"Path {path.id!r}: block {slot!r} out of order.")
                layers.append((pending_adapter, (slot, cid)))
                pending_adapter = None
        elif layers or pending_adapter:
            suffix.append((slot, cid))
        else:
            prefix.append((slot, cid))
    if pending_adapter is not None:
        raise ValueError(f"Path {path.id!r}: adapter {pending_adapter[0]!r} without its block.")
    return prefix, layers, suffix


class _Decider:
    """Draws mutation decisions with the plan's rates and records the applied names."""

    def __init__(self, rates: MutationRates, options: MutationOptions, rng: np.random.Generator):
        self._rates = rates
        self._fixed = options.fixed_probabilities
        self._rng = rng
        self.applied: list[str] = []

    def probability(self, name: str) -> float:
        if name in self._fixed:
            return float(self._fixed[name])
        wildcard = name.split(":", 1)[0] + ":*"
        if wildcard in self._fixed:
            return float(self._fixed[wildcard])
        return self._rates.probability(name)

    def draw(self, name: str) -> bool:
        """One uniform draw against the name's probability; records it when applied."""
        hit = bool(self._rng.random() < self.probability(name))
        if hit:
            self.applied.append(name)
        return hit


def plan_child(
    state: system.SystemState,
    parent: system.Path,
    *,
    task: str,
    agent: str,
    rng: np.random.Generator,
    space: HParamSpace,
    options: MutationOptions | None = None,
    data: HParams | None = None,
    generation: int = 0,
) -> MutationPlan:
    """Plans a child of `parent` for `task`.

    Draw order (fixed, so a seeded generator reproduces the plan): model
    hyperparameters in space order; layer removal, else block addition; adapters
    before blocks 0..L-1; clone decisions in slot order; the path id and new
    component ids in slot order; the initialisation seed. Self-tuned rates are drawn
    when a name is first consulted.

    Args:
      state: the published system (locks decide what is trainable for `task`).
      parent: the parent path (its hparams may be empty: the space's defaults).
      task: the child's task (the parent's, or another one for a seed parent).
      agent: the agent publishing the child.
      rng: the generator.
      space: the hyperparameter space.
      options: the method's mutations (default `MutationOptions()`).
      data: the generation's data hyperparameters and their rates
        (`hparams.generation_data`); None keeps the parent's.
      generation: the child's generation.

    Returns:
      The plan.

    Raises:
      KeyError: the parent references a component unknown to `state`, or adapters are
        enabled and the space has no "adapter_size".
      ValueError: the parent's slots are not a prefix, ordered blocks (each optionally
        preceded by its adapter) and a suffix.
    """
    options = options or MutationOptions()
    parent_hparams = space.complete(HParams.from_json(parent.hparams))
    rates = MutationRates(parent_hparams, space, rng, self_tuning=options.self_tuning)
    decider = _Decider(rates, options, rng)

    hparams, hp_applied = mutate_hparams(
        parent_hparams,
        rng,
        rates.mu,
        decider.probability,
        space=space,
        names=space.model_names,
    )
    decider.applied.extend(hp_applied)

    prefix, layers, suffix = _split_layers(parent)
    layers, grown, skipped = _change_depth(parent, layers, options, decider)
    child_layers = len(layers) + int(grown)
    adapter_size = int(space.values(hparams)["adapter_size"]) if options.adapters else 0
    new_adapters = set()
    if options.adapters:
        for index in range(child_layers):
            has_adapter = index < len(layers) and layers[index][0] is not None
            if not has_adapter and decider.draw(f"{ADD_PREFIX}adapter_{index}"):
                new_adapters.add(index)

    # Every decision is drawn (in slot order) before any id.
    inherit = functools.partial(_inherit, state, parent, task, agent, decider)
    drafts: list[_Draft] = [inherit(slot, cid) for slot, cid in prefix]
    for index in range(child_layers):
        if index in new_adapters:
            drafts.append(_Draft(f"adapter_{index}", INIT, None, {"size": adapter_size}))
        if index < len(layers):
            adapter_pair, block_pair = layers[index]
            if adapter_pair is not None:
                drafts.append(inherit(*adapter_pair))
            drafts.append(inherit(*block_pair))
        else:
            drafts.append(_Draft(f"block_{index}", GROW, None, {}))
    drafts.extend(inherit(slot, cid) for slot, cid in suffix)

    path_id = system.new_id(rng, options.id_prefix)
    slots = [_slot_plan(draft, state, rng, options.id_prefix) for draft in drafts]
    init_seed = int(rng.integers(0, 2**31 - 1))

    if options.self_tuning:
        hparams = hparams.replace(rates=rates.child_rates())
    if data is not None:
        hparams = with_data(hparams, data, space=space)
    child = system.Path(
        id=path_id,
        task=task,
        components=tuple((s.slot, s.component_id) for s in slots),
        agent=agent,
        hparams=hparams.to_json(),
        parent=parent.id,
        generation=generation,
        architecture=_with_resolution(
            _child_architecture(parent.architecture, child_layers, slots), space, hparams
        ),
    )
    return MutationPlan(
        path=child,
        slots=tuple(slots),
        hparams=hparams,
        applied=tuple(decider.applied),
        num_layers=child_layers,
        init_seed=init_seed,
        skipped=skipped,
    )


class _Draft(NamedTuple):
    """A slot of the child before ids are drawn: its action, source and config."""

    slot: str
    action: str
    source: str | None
    config: dict[str, Any]


def _change_depth(
    parent: system.Path, layers: list, options: MutationOptions, decider: _Decider
) -> tuple[list, bool, dict[str, str]]:
    """Draws the layer removal, else the block addition (mutations 3 and 2).

    Returns:
      The parent's layers the child keeps, whether a block is added on top, and the
      mutations skipped because the model family cannot take them.
    """
    skipped: dict[str, str] = {}
    add_blocks = options.add_blocks
    if add_blocks:
        refusal = families.add_block_refusal(parent.architecture)
        if refusal is not None:  # e.g. a post-norm encoder: no exact identity block
            skipped[ADD_BLOCK] = refusal
            add_blocks = False
    num_layers = len(layers)
    if options.remove_layers and num_layers > options.min_layers and decider.draw(REMOVE_LAYERS):
        return layers[:-1], False, skipped
    grown = (
        add_blocks
        and num_layers > 0
        and (options.max_layers is None or num_layers < options.max_layers)
        and decider.draw(ADD_BLOCK)
    )
    return layers, bool(grown), skipped


def _inherit(
    state: system.SystemState,
    parent: system.Path,
    task: str,
    agent: str,
    decider: _Decider,
    slot: str,
    cid: str,
) -> _Draft:
    """What the child does with a parent's component: reference, clone or re-initialise.

    A component locked by another agent (`SystemState.is_trainable`) is frozen: the child
    references it or clones it; one that only the agent itself locks is always cloned.

    Raises:
      KeyError: the component is unknown to `state`.
    """
    if cid not in state.components:
        raise KeyError(f"Parent {parent.id!r} references unknown component {cid!r}.")
    if slot == "head" and parent.task != task:
        return _Draft(slot, INIT, None, {})
    if slot == "final_norm" or state.is_trainable(cid, task, agent):
        return _Draft(slot, CLONE, cid, {})
    if decider.draw(CLONE_PREFIX + slot):
        return _Draft(slot, CLONE, cid, {})
    return _Draft(slot, REFERENCE, cid, {})


def _slot_plan(
    draft: _Draft, state: system.SystemState, rng: np.random.Generator, id_prefix: str
) -> SlotPlan:
    """The slot's plan: a referenced component keeps its id, a new one draws an id."""
    slot, action, source, config = draft
    if action == REFERENCE:
        assert source is not None
        component_id = source
    else:
        component_id = system.new_id(rng, id_prefix)
    if action in (REFERENCE, CLONE) and slot_kind(slot) == "adapter":
        assert source is not None
        config = dict(state.components[source].config)
    return SlotPlan(slot, component_id, action, source, config)


def _child_architecture(
    parent_architecture: Mapping[str, Any], num_layers: int, slots: Sequence[SlotPlan]
) -> dict[str, Any]:
    """The parent's architecture with the child's depth and adapter sizes."""
    architecture = dict(parent_architecture)
    architecture["num_layers"] = num_layers
    adapter_sizes = {s.slot: int(s.config["size"]) for s in slots if s.kind == "adapter"}
    if adapter_sizes:
        architecture["adapters"] = adapter_sizes
    else:
        architecture.pop("adapters", None)
    return architecture


def _with_resolution(
    architecture: dict[str, Any], space: HParamSpace, hparams: HParams
) -> dict[str, Any]:
    """The child's architecture at its hyperparameters' image size (`with_image_size`)."""
    if "image_size" not in space.names:
        return architecture
    return with_image_size(architecture, int(space.values(hparams)["image_size"]))


def with_image_size(architecture: dict[str, Any], size: int | None) -> dict[str, Any]:
    """A path's architecture at image side `size` (`vit.ViTConfig.resolution`).

    The resolution is the image size, left out at the images' own side (None, as
    `families.architecture_of` writes it); models without images keep the architecture.

    Args:
      architecture: the path's architecture record (`families.architecture_of`).
      size: the image side the model sees; None: the images' own.

    Returns:
      The architecture with `config.resolution` set or left out.
    """
    fields = dict(architecture.get("config") or {})
    shape = fields.get("image_shape")
    if "patch_size" not in fields or not shape:
        return architecture
    if size is None or int(size) == int(shape[0]):
        fields.pop("resolution", None)  # as `families.architecture_of` writes None
    else:
        fields["resolution"] = int(size)
    return {**architecture, "config": fields}


def grow_top_block(
    config: families.ModelConfig, params: Mapping[str, Any], *, rng: jax.Array
) -> tuple[families.ModelConfig, Any]:
    """A new identity block on top of a model, by function-preserving depth growth.

    Calls `growth.expand(config, params, ["add_layer@L"])`: the new block's attention
    and MLP output projections are zero, so the grown model computes the same function
    bit for bit (pre-LN); its other parameters are freshly drawn from `rng`. Optimizer
    moments of the new block start at zero (initialise its optimizer state afresh).

    Args:
      config: the model's config (pre-norm; `num_layers` = L).
      params: the model's parameters keyed by slot (at least `block_0 .. block_{L-1}`).
      rng: PRNG key of the new block's free parameters.

    Returns:
      (the config with L + 1 layers, the parameters of the new `block_L`).

    Raises:
      growth.GrowthError: e.g. for a post-norm model (not exact).
    """
    top = config.num_layers
    new_config, new_params, _ = growth.expand(config, params, [f"add_layer@{top}"], rng=rng)
    return new_config, new_params[f"block_{top}"]


def _copy_tree(tree: Any) -> Any:
    """A copy in which numpy leaves are new arrays (JAX arrays are immutable already)."""
    return jax.tree_util.tree_map(
        lambda leaf: np.array(leaf, copy=True) if isinstance(leaf, np.ndarray) else leaf, tree
    )


def materialize(
    plan: MutationPlan,
    pool: Mapping[str, Any],
    parent_config: families.ModelConfig,
    *,
    num_classes: int | None = None,
) -> tuple[families.ModelConfig, dict[str, Any]]:
    """Creates the parameters of a child's new components (any `families` model).

    Clones copy their source's parameters; a fresh head is the family's head
    initialisation for `num_classes` (`Family.init_head`); an adapter is a
    `models.adapters.ResidualAdapter` at initialisation (the identity); a grown block
    comes from `grow_top_block` on the child's inherited blocks, so the child computes
    its parent's function. Fresh and grown components draw from `plan.init_seed`
    folded with their slot's position. Parameters are returned unboxed (plain arrays).

    Args:
      plan: from `plan_child`.
      pool: component id -> parameters, holding every source the plan names.
      parent_config: the parent's config (`num_layers` = the parent's blocks).
      num_classes: classes of a fresh head (default: `parent_config.num_classes`).

    Returns:
      (the child's config, {new component id: parameters}); referenced components are
      not included (they stay in the pool as they are).

    Raises:
      KeyError: the pool lacks a component the plan copies or grows from.
    """
    changes: dict[str, Any] = {"num_layers": plan.num_layers}
    if any(field.name == "resolution" for field in dataclasses.fields(parent_config)):
        # The child's image size (`_with_resolution`); absent: the images' own.
        child_fields = plan.path.architecture.get("config") or {}
        changes["resolution"] = child_fields.get("resolution")
    if num_classes is not None:
        changes["num_classes"] = num_classes
    config = dataclasses.replace(parent_config, **changes)
    family = families.family_of(config)
    key = jax.random.PRNGKey(plan.init_seed)
    tokens_1xLxD = jnp.zeros(family.activation_shape(config), config.dtype)
    by_slot = {s.slot: s for s in plan.slots}
    created: dict[str, Any] = {}
    for position, slot_plan in enumerate(plan.slots):
        slot_key = jax.random.fold_in(key, position)
        if slot_plan.action == CLONE:
            assert slot_plan.source is not None
            created[slot_plan.component_id] = _copy_tree(pool[slot_plan.source])
        elif slot_plan.action == INIT and slot_plan.kind == "head":
            created[slot_plan.component_id] = family.init_head(config, slot_key)
        elif slot_plan.action == INIT and slot_plan.kind == "adapter":
            module = adapters.ResidualAdapter(config, int(slot_plan.config["size"]))
            variables = jax.jit(module.init)(slot_key, tokens_1xLxD)
            created[slot_plan.component_id] = nn.unbox(variables["params"])
        elif slot_plan.action == GROW:
            below = int(slot_plan.slot.split("_")[1])
            blocks = {}
            for index in range(below):
                source = by_slot[f"block_{index}"]
                blocks[source.slot] = pool[source.source or source.component_id]
            grown_config = dataclasses.replace(config, num_layers=below)
            _, block = grow_top_block(grown_config, blocks, rng=slot_key)
            created[slot_plan.component_id] = nn.unbox(block)
        elif slot_plan.action == INIT:
            raise ValueError(f"No initialisation for slot {slot_plan.slot!r}.")
    return config, created


def component_records(
    plan: MutationPlan,
    params_by_id: Mapping[str, Any],
    *,
    agent: str,
) -> list[system.Component]:
    """The store rows of a child's new components (after training), in slot order.

    Args:
      plan: the child's plan.
      params_by_id: new component id -> its (trained) parameters.
      agent: the agent that created them.

    Returns:
      One `system.Component` per non-referenced slot, with kind, parameter count,
      the child's task and generation, its config and the cloned parent (if any).
    """
    records = []
    for slot_plan in plan.slots:
        if not slot_plan.trainable:
            continue
        records.append(
            system.Component(
                id=slot_plan.component_id,
                kind=slot_plan.kind,
                num_params=system.num_params_of(params_by_id[slot_plan.component_id]),
                agent=agent,
                task=plan.path.task,
                config=slot_plan.config,
                parent=slot_plan.source,
                generation=plan.path.generation,
            )
        )
    return records
