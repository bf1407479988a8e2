"""Transformation 1: MLP width p -> p' (plain or gated MLP, with or without biases).

New columns of the input kernels (``wi`` or ``wi_0``/``wi_1``) and their biases are free:
the new hidden units reach the output only through the new rows of ``wo``, which are
zero. The output bias of ``wo`` does not depend on p and is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from growth.layout import default_free, is_mlp, leaf_shape_at, modules
from growth.ops import Free, Pad, Step, WidthGrowth, Zero
from growth.rules import GrowthError, check_grows


def grow_mlp_dim(config: Any, params: Mapping, new_size: int) -> Step:
    """Plans the growth of every MLP's hidden width to ``new_size``.

    Args:
      config: model config with ``mlp_dim``.
      params: the model parameters (their shapes suffice).
      new_size: the new MLP width p'.

    Returns:
      The step (new config and the map for parameters and optimizer moments).

    Raises:
      GrowthError: on shrinking or if the parameters do not match the config.
    """
    old = config.mlp_dim
    check_grows("mlp_dim", old, new_size)
    plan = {}
    for mpath in modules(params, is_mlp):
        module = params
        for name in mpath:
            module = module[name]
        for wi in ("wi", "wi_0", "wi_1"):
            if wi not in module:
                continue
            for leaf_name in module[wi]:
                path = mpath + (wi, leaf_name)
                shape = leaf_shape_at(params, path)
                if shape[-1] != old:
                    raise GrowthError(f"{'/'.join(path)} has shape {shape}, not mlp_dim={old}.")
                value = default_free(path, shape) if leaf_name == "kernel" else Free()
                plan[path] = (Pad(-1, new_size, value),)
        plan[mpath + ("wo", "kernel")] = (Pad(0, new_size, Zero()),)
    if not plan:
        raise GrowthError("No MLP found in the parameters (expected wi/wo kernels).")
    new_config = dataclasses.replace(config, mlp_dim=new_size)
    return Step(new_config, WidthGrowth(tuple(plan.items())))
