"""Datasets by seqio task or mixture name: configs, sharded train streams, eval splits.

Data reaches the trainer only through a registered seqio name. Each process reads its
own shard (`seqio.ShardInfo`) and contributes its rows to every global batch. The train
stream is deterministic given its seed, so a resumed run skips to its step and sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from tasks import registry
from training import settings

# The one error of an unknown task or mixture name (a KeyError and a ValueError).
UnknownTaskError = registry.UnknownTaskError


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which data to read and how (t5x's `DatasetConfig` surface).

    Attributes:
      mixture_or_task_name: a registered seqio task or mixture.
      task_feature_lengths: feature -> length for the feature converter (None or {} for
        fixed-shape features such as images).
      split: dataset split.
      batch_size: global batch size (over all processes).
      shuffle: shuffle the examples (training).
      seed: shuffle seed; None uses the run's random seed, so runs stay reproducible.
      use_cached: read seqio's offline cache.
      pack: pack examples (passed to the feature converter).
      module: module to import before looking up the name (registers the tasks).
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int] | None
    split: str
    batch_size: int
    shuffle: bool
    seed: int | None = None
    use_cached: bool = False
    pack: bool = False
    module: str | None = "tasks"

    def __post_init__(self):
        settings.whole_number(
            self.batch_size,
            "BATCH_SIZE",
            1,
            f"or EVAL_BATCH_SIZE: the batch size of the {self.split!r} split of "
            f"{self.mixture_or_task_name!r}",
        )


def get_mixture_or_task(name: str, module: str | None = "tasks") -> Any:
    """Imports `module` and returns the registered seqio task or mixture `name`.

    Args:
      name: the seqio name.
      module: module whose import registers the name (None imports nothing).

    Returns:
      the seqio Task or Mixture.

    Raises:
      UnknownTaskError: no task or mixture of that name; the message lists close names.
    """
    return registry.lookup(name, module)


def subtask_names(cfg: DatasetConfig) -> list[str]:
    """Returns the tasks evaluated for `cfg`: the task itself or a mixture's tasks."""
    provider = get_mixture_or_task(cfg.mixture_or_task_name, cfg.module)
    if isinstance(provider, seqio.Mixture):
        return [task.name for task in provider.tasks]
    return [provider.name]


def _dataset(
    cfg: DatasetConfig,
    name: str,
    *,
    shard_id: int,
    num_shards: int,
    feature_converter_cls: Callable[..., seqio.FeatureConverter],
    shuffle: bool,
    num_epochs: int | None,
    seed: int | None,
) -> tf.data.Dataset:
    get_mixture_or_task(name, cfg.module)
    return seqio.get_dataset(
        name,
        task_feature_lengths=dict(cfg.task_feature_lengths or {}),
        feature_converter=feature_converter_cls(pack=cfg.pack),
        dataset_split=cfg.split,
        use_cached=cfg.use_cached,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        seed=seed,
        verbose=False,
    )


def get_train_dataset(
    cfg: DatasetConfig,
    *,
    shard_id: int,
    num_shards: int,
    per_host_batch_size: int,
    feature_converter_cls: Callable[..., seqio.FeatureConverter],
    default_seed: int,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Returns this process's endless stream of train batches, from batch `start_step`.

    Args:
      cfg: the dataset config.
      shard_id: this process's data shard.
      num_shards: number of data shards.
      per_host_batch_size: rows per batch on this process.
      feature_converter_cls: the model's `FEATURE_CONVERTER_CLS`.
      default_seed: shuffle seed when `cfg.seed` is None.
      start_step: batches to skip (resuming at step `start_step`).

    Returns:
      a tf.data.Dataset of batches (dict of tensors).
    """
    ds = _dataset(
        cfg,
        cfg.mixture_or_task_name,
        shard_id=shard_id,
        num_shards=num_shards,
        feature_converter_cls=feature_converter_cls,
        shuffle=cfg.shuffle,
        num_epochs=None,
        seed=default_seed if cfg.seed is None else cfg.seed,
    )
    ds = ds.batch(per_host_batch_size, drop_remainder=True)
    if start_step:
        ds = ds.skip(start_step)
    return ds.prefetch(tf.data.AUTOTUNE)


def get_eval_batches(
    cfg: DatasetConfig,
    task_name: str,
    *,
    shard_id: int,
    num_shards: int,
    per_host_batch_size: int,
    feature_converter_cls: Callable[..., seqio.FeatureConverter],
    num_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Returns one task's eval split on this process as a list of numpy batches.

    With `num_batches` (train-eval: loss metrics), the split repeats and full batches are
    taken. Without it (infer-eval), the whole split is read once; the last batch is
    padded and every batch carries `_mask` (1 = real example) and `_index` (position of
    the example in the split when the source shards by striding).

    Args:
      cfg: the dataset config (its split, lengths, module).
      task_name: the task to read (the config's name or one of its mixture's tasks).
      shard_id: this process's data shard.
      num_shards: number of data shards.
      per_host_batch_size: rows per batch on this process.
      feature_converter_cls: the model's `FEATURE_CONVERTER_CLS`.
      num_batches: take this many full batches of the repeated split.

    Returns:
      a list of feature -> numpy array batches.
    """
    ds = _dataset(
        cfg,
        task_name,
        shard_id=shard_id,
        num_shards=num_shards,
        feature_converter_cls=feature_converter_cls,
        shuffle=False,
        num_epochs=None if num_batches else 1,
        seed=cfg.seed,
    )
    if num_batches:
        ds = ds.batch(per_host_batch_size, drop_remainder=True).take(num_batches)
        return list(ds.as_numpy_iterator())
    batches = []
    position = 0
    for batch in ds.batch(per_host_batch_size).as_numpy_iterator():
        rows = len(next(iter(batch.values())))
        batch["_index"] = (np.arange(position, position + rows) * num_shards + shard_id).astype(
            np.int32
        )
        batch["_mask"] = np.ones(rows, np.int32)
        batches.append(pad_batch(batch, per_host_batch_size))
        position += rows
    return batches


def numpy_steps(
    ds: tf.data.Dataset, sizes: Iterable[int], chunk: int = 16
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Iterates a dataset of batches as numpy, grouped into the loop's dispatches.

    For each n of `sizes`, yields (n, batch): for n == 1 one batch (feature -> [rows,
    ...]), for n > 1 the next n batches stacked (feature -> [n, rows, ...], the input of
    `Trainer.train_steps`). Batches are fetched `chunk` at a time (reading through tf.data
    costs a fixed ~0.2 ms per element on the host; chunks spread it over their steps);
    a group that is one whole chunk is that chunk's arrays, without a copy. The batches,
    in order, are the dataset's.

    Args:
      ds: a dataset of batches (dicts of tensors with a leading batch axis).
      sizes: the number of steps of each dispatch, in order.
      chunk: batches per fetch.

    Yields:
      (steps, feature -> numpy array), one per size; stops when `sizes` or `ds` ends.
    """
    chunks = ds.batch(chunk).as_numpy_iterator()
    block: dict[str, np.ndarray] = {}
    rows = position = 0  # batches in `block`, and how many of them were handed out
    for n in sizes:
        if n == 1 and position < rows:  # the common case of one step at a time
            yield 1, {key: value[position] for key, value in block.items()}
            position += 1
            continue
        parts = []
        missing = n
        while missing:
            if position == rows:
                fetched = next(chunks, None)
                if fetched is None:
                    return
                block, rows, position = fetched, len(next(iter(fetched.values()))), 0
            take = min(missing, rows - position)
            parts.append({key: value[position : position + take] for key, value in block.items()})
            position += take
            missing -= take
        if n == 1:
            yield 1, {key: value[0] for key, value in parts[0].items()}
        elif len(parts) == 1:
            yield n, parts[0]
        else:
            yield n, {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Zero-pads every array of `batch` to `rows` rows (`_mask` pads with 0)."""
    padded = {}
    for key, value in batch.items():
        missing = rows - len(value)
        padded[key] = (
            np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
            if missing
            else value
        )
    return padded


def empty_batch_like(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Returns an all-padding batch (mask 0) shaped like `batch`."""
    return {key: np.zeros_like(value) for key, value in batch.items()}


class DevicePrefetcher:
    """Iterates host batches and puts them on device in a background thread.

    The train loop then only pops ready global arrays, so reading, converting and
    transferring the next batches overlaps with the current step.

    Args:
      host_batches: yields host items, e.g. (steps, feature -> numpy array of this
        process's rows) from `numpy_steps`.
      to_device: turns a host item into its device form (global arrays).
      depth: how many device batches to keep ready.
    """

    _DONE = object()

    def __init__(
        self,
        host_batches: Iterator[Any],
        to_device: Callable[[Any], Any],
        depth: int = 2,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(host_batches, to_device), daemon=True
        )
        self._thread.start()

    def _fill(self, host_batches: Iterator, to_device: Callable) -> None:
        try:
            for batch in host_batches:
                item = to_device(batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception as error:  # noqa: BLE001 - re-raised in the consumer thread
            self._queue.put(error)
            return
        self._queue.put(self._DONE)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Stops the background thread (pending batches are dropped)."""
        self._stop.set()
        self._thread.join(timeout=5)
