"""Task metadata, guarded seqio registration, and the one task lookup.

Every task and mixture of the package is registered through `add_task` / `add_mixture`
so that (a) nothing is registered twice (seqio raises on duplicates, and a module may be
reloaded), and (b) each name carries a `TaskInfo` that models are built from.

A task registered with plain `seqio.TaskRegistry.add` (a user's own module) works too:
`lookup` finds any seqio name, and `info` derives its `TaskInfo` from the task's output
features (the modality) and one pass over its train split (input shape, classes), unless
`set_info` gave it metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

SPLITS = ("train", "validation", "test")


class MissingDataError(FileNotFoundError):
    """Raised when the files a task reads are not on this machine; names what to install."""


class UnknownTaskError(KeyError, ValueError):
    """Raised for a name that no imported module registered as a seqio task or mixture.

    A KeyError (a failed lookup) and a ValueError (bad input), so callers catching
    either keep working.
    """

    def __str__(self) -> str:
        # KeyError quotes its argument; a plain message reads better.
        return str(self.args[0]) if self.args else ""


class TaskMetadataError(ValueError):
    """A task lacks what a model needs to be built for it; the message names what."""


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


def set_info(info: TaskInfo) -> None:
    """Gives metadata to a task registered with plain `seqio.TaskRegistry.add`.

    Optional: without it, `info` derives the metadata from the task's data. A name that
    already has metadata keeps it.

    Args:
      info: the task's metadata; `info.name` must be a registered seqio task or mixture.

    Raises:
      UnknownTaskError: `info.name` is not registered with seqio.
    """
    lookup(info.name, module=None)
    _INFOS.setdefault(info.name, (info, None))


def _seqio_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def lookup(name: str, module: str | None = None) -> seqio.Task | seqio.Mixture:
    """The seqio Task or Mixture `name`, after importing the module that registers it.

    The one lookup of the project: the trainer, the evolution and the exporter all find
    tasks here, so a task registered with plain seqio works wherever a name is taken.

    Args:
      name: a seqio task or mixture name.
      module: a module whose import registers `name` (None: import nothing more).

    Returns:
      The seqio Task or Mixture.

    Raises:
      UnknownTaskError: no seqio task or mixture of that name; the message lists close
        matches (or every name) and the module imported.
    """
    if module:
        importlib.import_module(module)
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        return seqio.get_mixture_or_task(name)
    names = _seqio_names()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"available: {', '.join(names)}"
    imported = f" (after importing {module!r})" if module else ""
    raise UnknownTaskError(f"unknown task or mixture {name!r}{imported}; {hint}")


def modality_of(task: seqio.Task) -> str:
    """The modality of a seqio task ("image", "text" or "lm"), from its output features.

    Args:
      task: a seqio Task.

    Returns:
      "image" (an `image` feature), "text" (`inputs` and an integer `label`) or "lm"
      (`targets`).

    Raises:
      TaskMetadataError: the features fit none of them; the message names what is
        missing.
    """
    features = task.output_features
    if "image" in features and "label" in features:
        return "image"
    if "inputs" in features and "label" in features:
        return "text"
    if "targets" in features and "label" not in features:
        return "lm"
    raise TaskMetadataError(
        f"Task {task.name!r} has output features {sorted(features)}; a model needs 'image' "
        "and 'label' (image classification), 'inputs' and 'label' (text classification) "
        "or 'targets' (language modelling)."
    )


_VOCABULARY_NAMES = {"MiniLMVocabulary": "minilm_wordpiece", "ByteVocabulary": "byte"}


@functools.cache
def _derived_info(name: str) -> TaskInfo:
    """A plain seqio task's metadata, read from its train split once per process."""
    provider = lookup(name)
    if isinstance(provider, seqio.Mixture):
        members = [info(task.name) for task in provider.tasks]
        return dataclasses.replace(
            members[0],
            name=name,
            num_classes=max(m.num_classes for m in members),
            num_examples=None,
            tasks=tuple(task.name for task in provider.tasks),
        )
    modality = modality_of(provider)
    feature = {"image": "image", "text": "inputs", "lm": "targets"}[modality]
    split = "train" if "train" in provider.splits else provider.splits[0]
    dataset = provider.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    has_label = "label" in dataset.element_spec
    dataset = dataset.map(
        lambda ex: (tf.shape(ex[feature]), ex["label"] if has_label else tf.constant(0))
    )
    shapes, top, count = set(), -1, 0
    for shape, label in dataset.as_numpy_iterator():
        shapes.add(tuple(int(v) for v in shape))
        top = max(top, int(label))
        count += 1
    if not count:
        raise TaskMetadataError(
            f"Task {name!r} split {split!r} holds no examples to read its shape from."
        )
    image_shape = None
    text_max_length = None
    if modality == "image":
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise TaskMetadataError(
                f"Task {name!r}: the 'image' feature must have one (H, W, C) shape for "
                f"every example; found {sorted(shapes)[:3]}."
            )
        image_shape = next(iter(shapes))
    else:
        text_max_length = max(shape[0] for shape in shapes)
    vocabulary = getattr(provider.output_features.get(feature), "vocabulary", None)
    return TaskInfo(
        name=name,
        modality=modality,
        num_classes=top + 1 if modality != "lm" else 0,
        image_shape=image_shape,  # type: ignore[arg-type]
        text_max_length=text_max_length,
        vocabulary_name=_VOCABULARY_NAMES.get(type(vocabulary).__name__),
        splits=tuple(provider.splits),
        num_examples={split: count},
    )


def info(name: str, *, count_examples: bool = True) -> TaskInfo:
    """Returns the metadata of a seqio task or mixture.

    A name registered by this package (or given metadata with `set_info`) has static
    metadata; `num_examples` is counted from the data when the data is on this machine
    (this loads an offline data set once per process) and is None otherwise. Any other
    seqio task's metadata is derived from its data once per process: the modality from
    its output features, the image shape (or longest `inputs`) and the number of
    classes (largest label + 1) from its train split.

    Args:
      name: a seqio task or mixture name (its module imported).
      count_examples: count a registered task's examples (False: `num_examples` None
        for registered names, without touching their data).

    Returns:
      A frozen TaskInfo.

    Raises:
      UnknownTaskError: no seqio task or mixture of that name; the message lists close
        matches.
      TaskMetadataError: a plain seqio task whose features or data do not say what a
        model needs; the message names what is missing.
    """
    if name not in _INFOS:
        return _derived_info(name)
    static, count = _INFOS[name]
    if count is None or not count_examples:
        return static
    try:
        num_examples = dict(count())
    except MissingDataError:
        return static
    return dataclasses.replace(static, num_examples=num_examples)


def get_task(name: str) -> seqio.Task | seqio.Mixture:
    """Returns the seqio Task or Mixture registered under `name` (`lookup`).

    Args:
      name: a registered task or mixture name.

    Raises:
      UnknownTaskError: the name is not registered; the message lists close matches.
    """
    return lookup(name)
