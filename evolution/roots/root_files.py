"""The files of a root directory: root.npz / root.json, and the training checkpoint.

Every file is written atomically (a temporary name, fsync, rename, fsync of the folder):
a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

logger = logging.getLogger("evogrow")

ROOT_PARAMS_FILE = "root.npz"
ROOT_INFO_FILE = "root.json"
CHECKPOINT_FILE = "checkpoint.npz"


def atomic_write(path: str, write: Any) -> None:
    """Writes `path` through `write(handle)` into a temporary file, fsyncs, renames it."""
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    descriptor = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def flatten(params: Mapping[str, Any], leaf_fn: Any = np.asarray) -> dict[str, Any]:
    """{"slot/module/leaf": leaf_fn(leaf)} of a nested parameter dict."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(k.key) for k in path): leaf_fn(leaf) for path, leaf in leaves}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The nested parameter dict of `flatten`'s {"slot/module/leaf": leaf}."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def read_info(root_dir: str) -> dict[str, Any] | None:
    """root.json of a finished root, or None."""
    info_path = os.path.join(root_dir, ROOT_INFO_FILE)
    if not (os.path.isfile(info_path) and os.path.isfile(os.path.join(root_dir, ROOT_PARAMS_FILE))):
        return None
    with open(info_path) as handle:
        return json.load(handle)


def checkpoint_path(root_dir: str) -> str:
    """The training checkpoint file of a root directory."""
    return os.path.join(root_dir, CHECKPOINT_FILE)


def save_checkpoint(
    root_dir: str, step: int, state: Any, train_seconds: float, fingerprint: str
) -> None:
    """Atomically writes the (params, opt_state) leaves, the step, the time and settings."""
    leaves = jax.tree_util.tree_leaves(jax.device_get(state))
    arrays: dict[str, Any] = {f"leaf_{i:06d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update(step=np.int64(step), train_seconds=np.float64(train_seconds))
    arrays["settings"] = np.array(fingerprint)
    atomic_write(checkpoint_path(root_dir), lambda h: np.savez(h, **arrays))


def restore_checkpoint(
    root_dir: str, fingerprint: str, state: Any
) -> tuple[int, Any, float] | None:
    """(step, state, train seconds) of this run's checkpoint, or None.

    A checkpoint of other settings cannot be resumed: it is ignored (and overwritten).
    """
    path = checkpoint_path(root_dir)
    if not os.path.isfile(path):
        return None
    leaves, treedef = jax.tree_util.tree_flatten(state)
    with np.load(path, allow_pickle=False) as data:
        if str(data["settings"]) != fingerprint:
            logger.warning("root: %s is of other settings; starting afresh.", path)
            return None
        stored = [data[f"leaf_{i:06d}"] for i in range(len(leaves))]
        step, train_seconds = int(data["step"]), float(data["train_seconds"])
    for want, have in zip(leaves, stored, strict=True):
        if np.shape(want) != have.shape:
            raise ValueError(f"{path}: a leaf of shape {have.shape}, expected {np.shape(want)}.")
    return step, jax.tree_util.tree_unflatten(treedef, stored), train_seconds
