"""Resuming an interrupted task iteration from its last finished generation.

An agent's cycle (one `search.evolve_task`) runs G generations before it publishes. So
that an interrupted cycle (a killed process, a lost machine) is not thrown away, the
iteration saves its progress after each finished generation but the last (whose
publication follows at once; `TaskIteration.save_progress`), the way the multiagent
notebook writes its intermediate `state_<cycle>_<generation>`:

- the accepted children's new components are put into the store as *staged* components
  (private to the agent: never visible to the others until published), with their
  slice of the optimizer state;
- a `Progress` record (the population, offspring counts, the random generator's state,
  the remaining seed sweep, the candidates trained so far) is written to the store's
  settings under `progress:<agent>`, after the components it refers to.

When the agent starts its next iteration (`TaskIteration.open`), it finds the record,
keeps the staged components it names (`Store.discard_staged(agent, keep=...)`) and goes
on with the next generation. Given the same data, the resumed iteration trains the same
candidates as one that was never interrupted and publishes the same path (the store
keeps parameters bit for bit; every random draw comes from the saved generator).

A record is only used for the same agent, task and search settings, and only while the
agent has published nothing since the iteration started (then the record is stale: its
iteration finished, or another run of the agent went on without it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from evolution import store as store_lib
from evolution.search.config import SearchConfig
from evolution.system import state as system

logger = logging.getLogger("evogrow")

SETTING = "progress:{agent}"
FORMAT_VERSION = 1
# Settings that choose where candidates train, not what they compute.
_PLACEMENT_FIELDS = ("devices", "executor", "ray_address")


def fingerprint(settings: SearchConfig) -> str:
    """A digest of the search settings a saved iteration must be resumed with.

    Args:
      settings: the iteration's settings.

    Returns:
      Hex digest of every field but the placement ones (devices, executor, Ray address),
      which change where candidates train, not their results.
    """
    fields = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in _PLACEMENT_FIELDS
    }
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a task iteration saved after its last finished generation.

    Attributes:
      agent: the iterating agent.
      task: its task.
      fingerprint: `fingerprint` of its settings.
      publications: the agent's publication count when the iteration started.
      base_generation: the generation number of the iteration's first generation.
      generations_done: how many of its generations finished.
      rng_state: its random generator's `bit_generator.state`.
      sweep: the seed-sweep parents still to train, in order.
      paths: the population, in insertion order (published and accepted paths).
      offspring: path id -> times selected as a parent.
      published_ids: the task's paths that were published when the iteration started.
      trained: accepted path id -> the ids of the components its training produced
        (the keys of its optimizer state).
      components: the accepted children's new components (staged in the store).
      candidates: the candidates trained so far, as JSON objects.
      seconds: accumulated "train", "eval" and "compile" wall times.
    """

    agent: str
    task: str
    fingerprint: str
    publications: int
    base_generation: int
    generations_done: int
    rng_state: Mapping[str, Any]
    sweep: tuple[str, ...]
    paths: tuple[system.Path, ...]
    offspring: Mapping[str, int]
    published_ids: tuple[str, ...]
    trained: Mapping[str, tuple[str, ...]]
    components: tuple[system.Component, ...]
    candidates: tuple[Mapping[str, Any], ...]
    seconds: Mapping[str, float]

    @property
    def component_ids(self) -> tuple[str, ...]:
        """The staged components the record refers to (what a restart keeps)."""
        return tuple(c.id for c in self.components)

    def to_json(self) -> str:
        """The record as JSON text."""
        value = dataclasses.asdict(self)
        value["format"] = FORMAT_VERSION
        return json.dumps(value, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Progress:
        """Reads `to_json`'s text back.

        Raises:
          ValueError: not a record of this format.
        """
        value = json.loads(text)
        if not isinstance(value, dict) or value.pop("format", None) != FORMAT_VERSION:
            raise ValueError("not a progress record of this version")
        return cls(
            agent=str(value["agent"]),
            task=str(value["task"]),
            fingerprint=str(value["fingerprint"]),
            publications=int(value["publications"]),
            base_generation=int(value["base_generation"]),
            generations_done=int(value["generations_done"]),
            rng_state=value["rng_state"],
            sweep=tuple(value["sweep"]),
            paths=tuple(system.Path(**p) for p in value["paths"]),
            offspring={k: int(v) for k, v in value["offspring"].items()},
            published_ids=tuple(value["published_ids"]),
            trained={k: tuple(v) for k, v in value["trained"].items()},
            components=tuple(system.Component(**c) for c in value["components"]),
            candidates=tuple(value["candidates"]),
            seconds={k: float(v) for k, v in value["seconds"].items()},
        )


def keeps_progress(store: store_lib.Store) -> bool:
    """Whether the store can hold a progress record (it keeps settings)."""
    try:
        store.read_setting(SETTING.format(agent=""))
    except store_lib.StoreError:
        return False
    return True


def publications(store: store_lib.Store, agent: str) -> int:
    """The agent's publication count (0 for a store that does not count them)."""
    try:
        return store.publication_count(agent)[0]
    except store_lib.StoreError:
        return 0


def save(store: store_lib.Store, progress: Progress) -> None:
    """Writes the record (one settings transaction); a no-op on a store without settings.

    Call it after the components it refers to are staged: a crash in between leaves
    only staged components that no record names, which the restart discards.
    """
    if keeps_progress(store):
        store.write_setting(SETTING.format(agent=progress.agent), progress.to_json())


def clear(store: store_lib.Store, agent: str) -> None:
    """Forgets the agent's record (after its iteration published)."""
    if keeps_progress(store) and store.read_setting(SETTING.format(agent=agent)):
        store.write_setting(SETTING.format(agent=agent), "")


def load(
    store: store_lib.Store, *, agent: str, task: str, settings: SearchConfig
) -> Progress | None:
    """The agent's saved progress when it can be resumed, else None.

    Args:
      store: the store.
      agent: the agent.
      task: the task it is about to iterate.
      settings: the settings it iterates with.

    Returns:
      The record, when it is of this agent, task and settings, and the agent has
      published nothing since its iteration started; None otherwise (a stale or
      unreadable record is reported and ignored).
    """
    if not keeps_progress(store):
        return None
    text = store.read_setting(SETTING.format(agent=agent))
    if not text:
        return None
    try:
        progress = Progress.from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("agent %s: ignoring an unreadable progress record (%s)", agent, error)
        return None
    if (progress.agent, progress.task) != (agent, task):
        logger.info("agent %s: its saved progress is of task %r; not resumed", agent, progress.task)
        return None
    if progress.fingerprint != fingerprint(settings):
        logger.info("agent %s: its saved progress has other search settings; not resumed", agent)
        return None
    if progress.publications != publications(store, agent):
        return None  # the agent published since: that iteration is over
    return progress
