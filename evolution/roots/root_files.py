"""The files of a finished root: root.npz (parameters keyed by slot) and root.json.

Both are written atomically (a temporary name, fsync, rename, fsync of the folder):
a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

ROOT_PARAMS_FILE = "root.npz"
ROOT_INFO_FILE = "root.json"


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
