"""A seqio DataSource over in-memory numpy arrays, with per-process sharding.

Offline data sets are small: they are built once per process as numpy arrays (the loader
is expected to be `functools.lru_cache`d) and fed to tf.data. Unlike
`seqio.FunctionDataSource`, this source honours `shard_info`, so each process of a
multi-process trainer reads a disjoint slice of every split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tasks.registry import SPLITS

Arrays = Mapping[str, np.ndarray]
SplitArrays = Mapping[str, Arrays]


def split_indices(
    num_examples: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """Splits range(num_examples) into disjoint train/validation/test index sets.

    Args:
      num_examples: how many examples to split.
      seed: seed of the permutation; the same seed always gives the same split.
      fractions: fractions of train, validation and test (test takes the remainder).

    Returns:
      split name -> sorted int64 indices.
    """
    order = np.random.default_rng(seed).permutation(num_examples)
    n_train = int(round(fractions[0] * num_examples))
    n_val = int(round(fractions[1] * num_examples))
    parts = (order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :])
    return {name: np.sort(part) for name, part in zip(SPLITS, parts, strict=True)}


def take(arrays: Arrays, index: np.ndarray) -> dict[str, np.ndarray]:
    """Returns every array of `arrays` indexed by `index` along the first axis."""
    return {key: value[index] for key, value in arrays.items()}


class ArrayDataSource(seqio.DataSource):
    """Serves `loader()[split]` (a dict of equally long numpy arrays) as a tf.data.Dataset.

    Args:
      loader: returns split -> feature -> array; called lazily (first dataset or count),
        never at registration, so registering a task whose data is missing is fine.
      splits: the split names the loader provides.
    """

    def __init__(self, loader: Callable[[], SplitArrays], splits: Sequence[str] = SPLITS):
        super().__init__(splits=splits, num_input_examples=None, caching_permitted=True)
        self._loader = loader

    @property
    def supports_arbitrary_sharding(self) -> bool:
        """Any number of shards works: shard i takes every num_shards-th example."""
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        """Returns a single shard per split (sharding is done by striding)."""
        return [split]

    def num_input_examples(self, split: str) -> int:
        """Returns the number of examples of `split` (loads the data once per process)."""
        return len(next(iter(self._loader()[split].values())))

    def counts(self) -> dict[str, int]:
        """Returns examples per split (loads the data once per process)."""
        return {split: self.num_input_examples(split) for split in self.splits}

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """Returns the examples of `split`, optionally one shard of them, optionally shuffled.

        Args:
          split: "train", "validation" or "test".
          shuffle: shuffle the whole (sharded) split, reshuffled on each iteration.
          seed: shuffle seed; None draws one.
          shard_info: when given, keep examples index, index + num_shards, ...
          sequence_length: unused.
          use_cached: unused.
          num_epochs: unused.
        """
        del sequence_length, use_cached, num_epochs
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; splits are {list(self.splits)}")
        arrays = dict(self._loader()[split])
        if shard_info is not None and shard_info.num_shards > 1:
            arrays = {k: v[shard_info.index :: shard_info.num_shards] for k, v in arrays.items()}
        ds = tf.data.Dataset.from_tensor_slices(arrays)
        if shuffle:
            size = len(next(iter(arrays.values())))
            ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=True)
        return ds
