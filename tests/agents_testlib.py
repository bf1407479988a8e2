"""The agent tests' settings and data: a tiny root ViT (hidden 16, one block, 8x8x1
images) and four synthetic 4-class texture tasks; a muNet cycle is one generation of two
candidates of 2 x 3 steps, a baseline cycle 6 steps. Agent processes import this module."""

import numpy as np
from tiny_vit_testlib import TINY_VIT

from evolution.agents import agent_cycle
from evolution.search import iteration
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.space import hparams
from evolution.search.space import mutations as mut


def _space():
    """The default space with the optimizer's static settings pinned, so that candidates
    share compiled steps (learning rate and momentum are traced)."""
    pinned = ("schedule", "warmup", "momentum", "nesterov")
    return hparams.HParamSpace(
        tuple(
            hparams.HParam(h.name, (h.values[h.default],), 0, h.data) if h.name in pinned else h
            for h in iteration.default_search_space(TINY_VIT).hparams
        )
    )


# One block throughout; a child clones block_0 with probability 1/2 (then it is its task's
# own, and other tasks' children may share it frozen), and never embed, cls or pos.
SEARCH = search.SearchConfig(
    generations=1,
    candidates_per_generation=2,
    num_validations=2,
    steps_per_validation=3,
    batch_size=16,
    scale=0.99,
    seed=3,
    space=_space(),
    mutation_options=mut.MutationOptions(
        add_blocks=False,
        remove_layers=False,
        fixed_probabilities={"clone:*": 0.0, "clone:block_0": 0.5},
    ),
)
BASELINE = agent_cycle.BaselineSettings(steps=6)
TASKS = ("tex_a", "tex_b", "tex_c", "tex_d")


def _patterns(task_index):
    """Four 4x4 textures per task; tasks differ by a label permutation and coarseness."""
    rows, cols = np.mgrid[0:4, 0:4]
    if task_index >= 2:
        rows, cols = rows // 2, cols // 2
    textures = np.stack([rows % 2, cols % 2, (rows + cols) % 2, (rows == cols)])
    if task_index % 2:
        textures = textures[[2, 0, 3, 1]]
    return textures.astype(np.float32)


def _arrays(task_index):
    rng = np.random.default_rng(200 + task_index)
    out = {}
    for split, rows in (("train", 128), ("val", 64), ("test", 32)):
        labels = rng.integers(0, 4, rows).astype(np.int32)
        tiles = np.tile(_patterns(task_index)[labels], (1, 2, 2))
        images = (tiles + rng.normal(0.0, 0.3, (rows, 8, 8))).astype(np.float32)[..., None]
        out[f"{split}_x"], out[f"{split}_y"] = images, labels
    return out


DATA = {name: _arrays(i) for i, name in enumerate(TASKS)}


def _task_data(task):
    data = DATA[task]
    return search.TaskData(
        train_batches_fn=batches.array_train_batches(data["train_x"], data["train_y"]),
        validation_batches=batches.array_eval_batches(data["val_x"], data["val_y"], 32),
        num_classes=4,
    )


def _test_split(task):
    return DATA[task]["test_x"], DATA[task]["test_y"]
