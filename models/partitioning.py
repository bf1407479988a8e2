"""Logical axis rules: how the models' logical axis names map onto the ('data', 'model') mesh.

Rules are plain data (a sequence of (logical name, mesh axis or None) pairs), as in
t5x/partitioning.py, so a launcher can swap them without touching the models.
"""

from __future__ import annotations

from collections.abc import Sequence

LogicalAxisRules = Sequence[tuple[str, str | None]]


def standard_logical_axis_rules() -> LogicalAxisRules:
    """The default 1-D data parallel x 1-D model parallel rules.

    Batch goes to 'data'; the wide feature axes (MLP, heads, vocabulary, classes) go to
    'model'; the residual width, per-head sizes and sequence positions are replicated.

    Returns:
      A tuple of (logical axis name, mesh axis name or None).
    """
    return (
        ("batch", "data"),
        ("mlp", "model"),
        ("heads", "model"),
        ("vocab", "model"),
        ("classes", None),
        ("embed", None),
        ("kv", None),
        ("length", None),
        ("patch_height", None),
        ("patch_width", None),
        ("channels", None),
        ("paths", None),  # the members of a multipath model (its router's outputs)
    )
