"""Vision Transformer image classifier, built as a sequence of named components.

The model is the composition embed -> cls -> pos -> block_0 .. block_{L-1} ->
final_norm -> head, each a small Linen module of its own, so that a task's model can be
assembled from components shared between tasks and growth can address
each piece by name. Pre-norm blocks from models/layers.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig(layers.TransformerConfig):
    """ViT architecture.

    Attributes:
      image_shape: (H, W, C) of the input images; None: the task's, filled in by the
        trainer (`models.task_shapes.fit_to_task`) before the model is built.
      patch_size: side of the square patches (must divide H and W).
      num_classes: classes of the head; None: the task's, filled in likewise.
      pooling: "cls" (a learned class token) or "gap" (mean over patches).
      head_zero_init: start the head at zero (as big_vision does).
      resolution: the side at which the model sees its (square) images; None: the
        images' own. Inputs keep `image_shape`: the model resizes them (bilinear, as
        `tf.image.resize`) and resamples its position table to the new patch grid
        (`resample_grid`, big_vision's `resample_posemb`), so every parameter keeps the
        shape of the native resolution and a component is shared across resolutions.
    """

    image_shape: tuple[int, int, int] = (32, 32, 3)
    patch_size: int = 4
    num_classes: int = 10
    pooling: str = "cls"
    head_zero_init: bool = True
    resolution: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in ("cls", "gap"):
            raise ValueError(f"ViTConfig.pooling={self.pooling!r}; expected 'cls' or 'gap'.")
        if self.resolution is not None and (
            self.resolution < self.patch_size or self.resolution % self.patch_size
        ):
            raise ValueError(
                f"ViTConfig.resolution={self.resolution} must be a positive multiple of "
                f"patch_size={self.patch_size}."
            )
        if self.image_shape is None:  # the task's, filled in before the model is built
            return
        height, width, _ = self.image_shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"ViTConfig.patch_size={self.patch_size} must divide "
                f"image_shape {self.image_shape}."
            )
        if self.resolution is not None and height != width:
            raise ValueError(
                f"ViTConfig.resolution needs square images; image_shape is {self.image_shape}."
            )

    def _known_image_shape(self) -> tuple[int, int, int]:
        if self.image_shape is None:
            raise ValueError(
                "ViTConfig.image_shape is None (the task's): the trainer fills it in from "
                "the task (models.task_shapes.fit_to_task) before the model is built."
            )
        return self.image_shape

    @property
    def num_patches(self) -> int:
        """Number of patch positions of the position table (the images' own resolution)."""
        height, width, _ = self._known_image_shape()
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def num_tokens(self) -> int:
        """Length of the position table (patches plus the class token), native resolution."""
        return self.num_patches + (1 if self.pooling == "cls" else 0)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid the model runs on (at `resolution`)."""
        height, width, _ = self._known_image_shape()
        if self.resolution is not None:
            height = width = self.resolution
        return height // self.patch_size, width // self.patch_size


def resample_grid(table_LxD: jax.Array, grid: tuple[int, int], num_prefix: int) -> jax.Array:
    """A position table resampled to another patch grid, as big_vision's `resample_posemb`.

    The rows after `num_prefix` (a class token's) form a square grid that is zoomed
    bilinearly with corners aligned (`scipy.ndimage.zoom(order=1)`); the prefix rows are
    kept. The same grid returns the table itself. Differentiable, so a path at another
    resolution trains the shared table through the resampling.

    Args:
      table_LxD: [num_prefix + side * side, D].
      grid: the new (rows, columns).
      num_prefix: leading rows that are not grid positions.

    Returns:
      [num_prefix + rows * columns, D].
    """
    prefix, cells = table_LxD[:num_prefix], table_LxD[num_prefix:]
    side = math.isqrt(cells.shape[0])
    if side * side != cells.shape[0]:
        raise ValueError(f"{cells.shape[0]} position embeddings are not a square grid.")
    if tuple(grid) == (side, side):
        return table_LxD

    def weights(size_out: int) -> jax.Array:
        # Output i reads input i * (side - 1) / (size_out - 1): corners aligned.
        scale = (side - 1) / (size_out - 1) if size_out > 1 else 0.0
        coords = jnp.arange(size_out, dtype=jnp.float32) * scale
        low = jnp.clip(jnp.floor(coords), 0, side - 1)
        frac = coords - low
        matrix = jax.nn.one_hot(low.astype(jnp.int32), side) * (1 - frac)[:, None]
        high = jnp.minimum(low + 1, side - 1).astype(jnp.int32)
        return matrix + jax.nn.one_hot(high, side) * frac[:, None]

    rows, cols = grid
    cells_SxSxD = cells.reshape(side, side, -1).astype(jnp.float32)
    zoomed = jnp.einsum("rs,tu,sud->rtd", weights(rows), weights(cols), cells_SxSxD)
    zoomed = zoomed.reshape(rows * cols, -1).astype(table_LxD.dtype)
    return jnp.concatenate([prefix, zoomed], axis=0)


def vit_tiny(**overrides) -> ViTConfig:
    """A ViT that trains in seconds on CPU (hidden 32, 2 layers, 2 heads)."""
    base = dict(hidden=32, mlp_dim=64, num_heads=2, qk_dim=16, v_dim=16, num_layers=2)
    return ViTConfig(**{**base, **overrides})


def vit_small(**overrides) -> ViTConfig:
    """A small ViT for the offline image tasks (hidden 128, 4 layers, 4 heads)."""
    base = dict(hidden=128, mlp_dim=256, num_heads=4, qk_dim=32, v_dim=32, num_layers=4)
    return ViTConfig(**{**base, **overrides})


class PatchEmbed(nn.Module):
    """Cuts images into patches and projects each to the hidden size (a strided conv)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, image_BxHxWxC: jax.Array) -> jax.Array:
        """Maps images [B, H, W, C] to patch tokens [B, N, D]."""
        c = self.config
        p = c.patch_size
        batch, height, width, channels = image_BxHxWxC.shape
        if (height, width, channels) != tuple(c.image_shape):
            raise ValueError(f"image shape {(height, width, channels)} != config {c.image_shape}.")
        rows, cols = c.grid
        if (rows * p, cols * p) != (height, width):
            image_BxHxWxC = jax.image.resize(
                image_BxHxWxC, (batch, rows * p, cols * p, channels), "bilinear", antialias=False
            )
        patches = image_BxHxWxC.reshape(batch, rows, p, cols, p, channels)
        patches_BxNxPxPxC = patches.transpose(0, 1, 3, 2, 4, 5).reshape(
            batch, rows * cols, p, p, channels
        )
        return layers.Projection(
            "bnxyc,xycd->bnd",
            (p, p, channels, c.hidden),
            ("patch_height", "patch_width", "channels", "embed"),
            ("embed",),
            nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2), out_axis=(3,)
            ),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="patch",
        )(patches_BxNxPxPxC.astype(c.dtype))


class ClsToken(nn.Module):
    """Prepends a learned class token."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        """Returns [B, N + 1, D] with the class token first."""
        c = self.config
        token = layers.logical_param(
            self,
            "token",
            nn.initializers.zeros,
            (1, 1, c.hidden),
            (None, None, "embed"),
            c.param_dtype,
        )
        token_BxD = jnp.broadcast_to(token, (x_BxNxD.shape[0], 1, c.hidden)).astype(x_BxNxD.dtype)
        return jnp.concatenate([token_BxD, x_BxNxD], axis=1)


class PosEmbed(nn.Module):
    """Adds learned position embeddings."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Adds one learned vector per position."""
        c = self.config
        table = layers.logical_param(
            self,
            "embedding",
            nn.initializers.normal(0.02),
            (c.num_tokens, c.hidden),
            ("length", "embed"),
            c.param_dtype,
        )
        if c.resolution is not None:
            table = resample_grid(table, c.grid, c.num_tokens - c.num_patches)
        return x_BxLxD + table[None].astype(x_BxLxD.dtype)


class ClassifierHead(nn.Module):
    """Pools the tokens (class token or mean) and maps them to class logits."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, return_prelogits: bool = False) -> jax.Array:
        """Returns logits [B, num_classes], or the pooled pre-logits [B, D]."""
        c = self.config
        pooled_BxD = x_BxLxD[:, 0] if c.pooling == "cls" else jnp.mean(x_BxLxD, axis=1)
        if return_prelogits:
            return pooled_BxD
        init = nn.initializers.zeros if c.head_zero_init else nn.initializers.lecun_normal()
        return layers.Projection(
            "bd,dk->bk",
            (c.hidden, c.num_classes),
            ("embed", "classes"),
            ("classes",),
            init,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="dense",
        )(pooled_BxD)


def component_slots(config: ViTConfig) -> list[str]:
    """The ordered component names of a ViT of this config."""
    slots = ["embed"] + (["cls"] if config.pooling == "cls" else []) + ["pos"]
    slots += [f"block_{i}" for i in range(config.num_layers)]
    return slots + ["final_norm", "head"]


def make_component(config: ViTConfig, slot: str, name: str | None = None) -> nn.Module:
    """Builds the (unbound) module of one component slot.

    Args:
      config: the architecture.
      slot: a name from `component_slots(config)` (any `block_<i>` is accepted).
      name: module name (set when built inside a parent module's compact method).

    Returns:
      A Linen module mapping the previous component's output to its own.
    """
    if slot == "embed":
        return PatchEmbed(config, name=name)
    if slot == "cls":
        return ClsToken(config, name=name)
    if slot == "pos":
        return PosEmbed(config, name=name)
    if slot.startswith("block_"):
        return layers.TransformerBlock(config, name=name)
    if slot == "final_norm":
        return layers.Norm(
            kind=config.norm,
            eps=config.norm_eps,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            name=name,
        )
    if slot == "head":
        return ClassifierHead(config, name=name)
    raise ValueError(f"Unknown ViT component {slot!r}; expected one of {component_slots(config)}.")


def apply_component(
    module: nn.Module,
    slot: str,
    params,
    x: jax.Array,
    *,
    deterministic: bool = True,
    return_prelogits: bool = False,
    rngs=None,
) -> Any:
    """Applies one component's module with its own parameters.

    Args:
      module: from `make_component`.
      slot: the component's slot name (selects the call signature).
      params: the component's parameters.
      x: the previous component's output.
      deterministic: disables dropout in blocks.
      return_prelogits: for the head, return pooled features instead of logits.
      rngs: dropout rngs for blocks when not deterministic.

    Returns:
      The component's output.
    """
    variables = {"params": params}
    if slot.startswith("block_"):
        return module.apply(variables, x, None, deterministic, rngs=rngs)
    if slot == "head":
        return module.apply(variables, x, return_prelogits)
    return module.apply(variables, x)


class ViT(nn.Module):
    """The full ViT classifier; its top-level parameter names are the component slots."""

    config: ViTConfig

    @nn.compact
    def __call__(
        self, image_BxHxWxC: jax.Array, deterministic: bool = True, return_prelogits: bool = False
    ) -> jax.Array:
        """Classifies images.

        Args:
          image_BxHxWxC: float images.
          deterministic: disables dropout.
          return_prelogits: return the pooled features [B, D] instead of logits.

        Returns:
          Logits [B, num_classes] (or pre-logits).
        """
        c = self.config
        x = image_BxHxWxC
        for slot in component_slots(c):
            module = make_component(c, slot, name=slot)
            if slot.startswith("block_"):
                x = module(x, None, deterministic)
            elif slot == "head":
                x = module(x, return_prelogits)
            else:
                x = module(x)
        return x
