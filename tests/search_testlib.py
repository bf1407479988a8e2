"""The single-path search tests' settings and data: a tiny root ViT and three synthetic
4-class texture tasks (128 train / 64 validation / 32 test images of 8x8x1 each)."""

import numpy as np
from tiny_vit_testlib import TINY_VIT

from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.space import mutations as mut

CONFIG = TINY_VIT
SEARCH = search.SearchConfig(
    generations=2,
    candidates_per_generation=2,
    num_validations=2,
    steps_per_validation=5,
    batch_size=16,
    scale=0.99,
    seed=8,
    mutation_options=mut.MutationOptions(max_layers=2),
)
AGENT = "munet"
TASKS = ("tex_a", "tex_b", "tex_c")


def _patterns(task_index):
    """Four 4x4 textures per task: A stripes/checks, B the same with permuted labels,
    C coarser (2-pixel) versions."""
    rows, cols = np.mgrid[0:4, 0:4]
    if task_index == 2:
        rows, cols = rows // 2, cols // 2
    textures = np.stack([rows % 2, cols % 2, (rows + cols) % 2, (rows == cols)])
    if task_index == 1:
        textures = textures[[2, 0, 3, 1]]
    return textures.astype(np.float32)


def _task_data(task_index):
    rng = np.random.default_rng(100 + task_index)
    out = {}
    for split, rows in (("train", 128), ("validation", 64), ("test", 32)):
        labels = rng.integers(0, 4, rows).astype(np.int32)
        tiles = np.tile(_patterns(task_index)[labels], (1, 2, 2))
        images = (tiles + rng.normal(0.0, 0.3, (rows, 8, 8))).astype(np.float32)[..., None]
        out[split] = (images, labels)
    return out


DATA = {name: _task_data(i) for i, name in enumerate(TASKS)}


def _task_data_of(task):
    return search.TaskData(
        train_batches_fn=batches.array_train_batches(*DATA[task]["train"]),
        validation_batches=batches.array_eval_batches(*DATA[task]["validation"], 32),
    )
