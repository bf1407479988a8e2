"""Task metadata and guarded seqio registration.

Every task and mixture of the package is registered through `add_task` / `add_mixture`
so that (a) nothing is registered twice (seqio raises on duplicates, and a module may be
reloaded), and (b) each name carries a `TaskInfo` that models are built from.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio

SPLITS = ("train", "validation", "test")


class MissingDataError(FileNotFoundError):
    """Raised when the files a task reads are not on this machine; names what to install."""


class UnknownTaskError(KeyError):
    """Raised for a task or mixture name that `import tasks` did not register."""

    def __str__(self) -> str:
        # KeyError quotes its argument; a plain message reads better.
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task or mixture.

    Attributes:
      name: the registered seqio name.
      modality: "image", "text" (classification) or "lm" (language modelling).
      num_classes: label classes (for a mixture, the largest over its tasks); 0 for "lm".
      image_shape: (H, W, C) of the `image` feature, or None.
      text_max_length: default length of `inputs` / `targets`, or None for images.
      vocabulary_name: "minilm_wordpiece", "byte", or None for images.
      splits: split names, always ("train", "validation", "test").
      num_examples: source examples per split (for "lm", 2,048-character chunks before
        they are cut to the sequence length), or None when unknown without the data
        (TFDS tasks, offline tasks whose files are missing).
      tasks: for a mixture, its tasks in `task_id` order; () for a task.
    """

    name: str
    modality: str
    num_classes: int
    image_shape: tuple[int, int, int] | None
    text_max_length: int | None
    vocabulary_name: str | None
    splits: tuple[str, ...] = SPLITS
    num_examples: Mapping[str, int] | None = None
    tasks: tuple[str, ...] = ()


# name -> (static info, callable returning examples per split or raising).
_INFOS: dict[str, tuple[TaskInfo, Callable[[], Mapping[str, int]] | None]] = {}


def add_task(
    name: str,
    *,
    info: TaskInfo,
    source: seqio.DataSource,
    output_features: Mapping[str, seqio.Feature],
    preprocessors: Sequence[Callable[..., Any]],
    count_examples: Callable[[], Mapping[str, int]] | None = None,
) -> None:
    """Registers a seqio Task and its metadata unless `name` is already registered.

    Args:
      name: versioned task name, e.g. "digits_v1".
      info: static metadata (num_examples is filled in by `info()` from `count_examples`).
      source: the seqio data source.
      output_features: seqio output features of the task.
      preprocessors: seqio preprocessors.
      count_examples: returns examples per split (may load the data); None when unknown.
    """
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=source,
            output_features=output_features,
            preprocessors=list(preprocessors),
            metric_fns=[],
        )
    _INFOS.setdefault(name, (info, count_examples))


def add_mixture(name: str, task_names: Sequence[str], *, rate: Any = 1.0) -> None:
    """Registers a seqio Mixture of already registered tasks (task_id = position).

    Args:
      name: versioned mixture name.
      task_names: member tasks in task_id order.
      rate: mixing rate, a float or a seqio rate function of the task.
    """
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, [(t, rate) for t in task_names])
    if name in _INFOS:
        return
    members = [_INFOS[t][0] for t in task_names]
    first = members[0]
    mixture_info = dataclasses.replace(
        first,
        name=name,
        num_classes=max(m.num_classes for m in members),
        num_examples=None,
        tasks=tuple(task_names),
    )

    def count() -> Mapping[str, int]:
        per_task = []
        for task in task_names:
            num_examples = info(task).num_examples
            if num_examples is None:
                raise MissingDataError(f"{task} has no data on this machine")
            per_task.append(num_examples)
        return {s: sum(n[s] for n in per_task) for s in mixture_info.splits}

    _INFOS[name] = (mixture_info, count)


def registered_names() -> list[str]:
    """Returns every task and mixture name registered by this package, sorted."""
    return sorted(_INFOS)


def _unknown(name: str) -> UnknownTaskError:
    names = registered_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"available: {', '.join(names)}"
    return UnknownTaskError(f"unknown task or mixture {name!r}; {hint}")


def info(name: str) -> TaskInfo:
    """Returns the metadata of a registered task or mixture.

    `num_examples` is counted from the data when the data is on this machine (this loads
    an offline data set once per process) and is None otherwise.

    Args:
      name: a registered task or mixture name.

    Returns:
      A frozen TaskInfo.

    Raises:
      UnknownTaskError: the name is not registered; the message lists close matches.
    """
    if name not in _INFOS:
        raise _unknown(name)
    static, count = _INFOS[name]
    if count is None:
        return static
    try:
        num_examples = dict(count())
    except MissingDataError:
        return static
    return dataclasses.replace(static, num_examples=num_examples)


def get_task(name: str) -> seqio.Task | seqio.Mixture:
    """Returns the seqio Task or Mixture registered under `name`.

    Args:
      name: a registered task or mixture name.

    Raises:
      UnknownTaskError: the name is not registered; the message lists close matches.
    """
    if name not in _INFOS:
        raise _unknown(name)
    return seqio.get_mixture_or_task(name)
