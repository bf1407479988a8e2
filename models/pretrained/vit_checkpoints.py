"""Pretrained ViT roots: big_vision / AugReg `.npz` checkpoints as models.vit parameters.

big_vision (and the vision_transformer repository its AugReg checkpoints come from) saves
a ViT as one `.npz` whose keys are the flattened Linen paths joined with "/":
`embedding/kernel [p, p, C, D]`, `embedding/bias`, `cls [1, 1, D]` (class-token pooling
only), `pos_embedding [1, N, D]`, `Transformer/encoderblock_<i>/...` (two LayerNorms, one
`MultiHeadDotProductAttention` with `query|key|value/kernel [D, H, Dh]`, `bias [H, Dh]`,
`out/kernel [H, Dh, D]`, one `MlpBlock` with `Dense_0`, `Dense_1`),
`Transformer/encoder_norm`, `head/kernel [D, K]` and, in some files, `pre_logits`.

`from_big_vision` maps such a mapping onto our component tree (`embed`, `cls`, `pos`,
`block_i`, `final_norm`, `head`) and returns the matching `ViTConfig`. It accepts both
spellings the public files use, as big_vision's `fix_old_checkpoints` does: the position
embeddings at the top level, under `Transformer/`, or under
`Transformer/posembed_input/`; block modules numbered per Linen module (`LayerNorm_0`,
`LayerNorm_1`, `MlpBlock_0`) or globally as the pre-Linen files do (`LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`); and an old table of
N + 1 embeddings whose first row belongs to the class token (it is folded into the
token, as big_vision does).

big_vision adds the position embeddings before prepending the class token, our ViT after;
the class token's row of our `pos` table is therefore zero, which computes the same
function. Only `load_npz` touches files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from models import vit

# flax.linen.LayerNorm's default, which every big_vision ViT uses.
BIG_VISION_LAYERNORM_EPS = 1e-6
_POSEMB_KEYS = (
    "pos_embedding",
    "Transformer/pos_embedding",
    "Transformer/posembed_input/pos_embedding",
)
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


class CheckpointError(ValueError):
    """A checkpoint that does not hold a ViT in the big_vision layout."""


def resample_posemb(posemb: Any, new_grid: int | tuple[int, int], num_prefix_tokens: int = 0):
    """Resamples learned position embeddings to a new patch grid, as big_vision does.

    Follows big_vision's `models/vit.py` `resample_posemb`: the square grid of
    embeddings is reshaped to [gs, gs, D] and zoomed with `scipy.ndimage.zoom(order=1)`
    (bilinear, corners aligned) to the new grid. Rows before the grid (a class token's)
    are kept unchanged. Same grid: the input is returned unchanged.

    Args:
      posemb: [N, D] or [1, N, D]; N = num_prefix_tokens + gs * gs.
      new_grid: the new grid side, or (rows, columns).
      num_prefix_tokens: leading rows that are not grid positions (1 for a class token
        whose embedding is in the table, as in our `pos` with class-token pooling).

    Returns:
      The embeddings for the new grid, with the input's rank and dtype.
    """
    table = np.asarray(posemb)
    batched = table.ndim == 3
    if batched:
        table = table[0]
    if table.ndim != 2:
        raise CheckpointError(f"position embeddings of shape {np.shape(posemb)}; expected [N, D].")
    rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = table[:num_prefix_tokens], table[num_prefix_tokens:]
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise CheckpointError(
            f"{grid.shape[0]} position embeddings are not a square grid "
            f"(after {num_prefix_tokens} prefix tokens)."
        )
    if (rows, cols) != (side, side):
        grid_3d = grid.reshape(side, side, -1)
        zoomed = scipy.ndimage.zoom(grid_3d, (rows / side, cols / side, 1), order=1)
        grid = zoomed.reshape(rows * cols, -1)
    out = np.concatenate([prefix, grid]).astype(table.dtype)
    return jnp.asarray(out[None] if batched else out)


def _find_posemb(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    found = [key for key in _POSEMB_KEYS if key in arrays]
    if len(found) != 1:
        what = "no" if not found else f"several ({found})"
        raise CheckpointError(
            f"checkpoint has {what} position embeddings; expected one of {list(_POSEMB_KEYS)}."
        )
    posemb = np.asarray(arrays[found[0]])
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise CheckpointError(f"{found[0]} has shape {posemb.shape}; expected [1, N, D].")
    return posemb[0]


def _numbered(names: set[str], module: str) -> list[str]:
    """The submodules `module_<k>` among `names`, in order of k (pre-Linen or Linen)."""
    matches = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(rf"{module}_(\d+)", n))]
    return [n for _, n in sorted(matches)]


def _block_layout(arrays: Mapping[str, np.ndarray], index: int) -> dict[str, str]:
    """Maps our block sub-paths to the checkpoint's prefixes for block `index`."""
    prefix = f"Transformer/encoderblock_{index}/"
    children = {k[len(prefix) :].split("/")[0] for k in arrays if k.startswith(prefix)}
    norms = _numbered(children, "LayerNorm")
    attn = _numbered(children, "MultiHeadDotProductAttention")
    mlp = _numbered(children, "MlpBlock")
    if len(norms) != 2 or len(attn) != 1 or len(mlp) != 1:
        raise CheckpointError(
            f"{prefix} holds {sorted(children)}; expected two LayerNorm, one "
            "MultiHeadDotProductAttention and one MlpBlock."
        )
    denses = _numbered(
        {
            k[len(prefix + mlp[0]) + 1 :].split("/")[0]
            for k in arrays
            if k.startswith(prefix + mlp[0])
        },
        "Dense",
    )
    if len(denses) != 2:
        raise CheckpointError(f"{prefix}{mlp[0]} holds {denses}; expected two Dense layers.")
    return {
        "norm_attn": prefix + norms[0],
        "attn": prefix + attn[0],
        "norm_mlp": prefix + norms[1],
        "mlp/wi": f"{prefix}{mlp[0]}/{denses[0]}",
        "mlp/wo": f"{prefix}{mlp[0]}/{denses[1]}",
    }


class _Reader:
    """Reads arrays by key, collecting every missing key and wrong shape."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = arrays
        self.problems: list[str] = []

    def get(self, key: str, shape: tuple[int, ...]) -> jax.Array:
        if key not in self.arrays:
            self.problems.append(f"missing {key} {list(shape)}")
            return jnp.zeros(shape, jnp.float32)
        value = np.asarray(self.arrays[key])
        if value.shape != shape:
            self.problems.append(f"{key} has shape {list(value.shape)}, expected {list(shape)}")
            return jnp.zeros(shape, jnp.float32)
        return jnp.asarray(value, jnp.float32)

    def check(self) -> None:
        if self.problems:
            raise CheckpointError(f"not a big_vision ViT checkpoint: {'; '.join(self.problems)}.")


def _norm(reader: _Reader, prefix: str, width: int) -> dict[str, jax.Array]:
    return {
        "scale": reader.get(f"{prefix}/scale", (width,)),
        "bias": reader.get(f"{prefix}/bias", (width,)),
    }


def _dense(reader: _Reader, prefix: str, kernel_shape: tuple[int, ...], bias_shape):
    return {
        "kernel": reader.get(f"{prefix}/kernel", kernel_shape),
        "bias": reader.get(f"{prefix}/bias", bias_shape),
    }


def from_big_vision(
    arrays: Mapping[str, np.ndarray],
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    keep_head: bool = False,
) -> tuple[vit.ViTConfig, dict[str, Any]]:
    """Converts a big_vision / AugReg ViT checkpoint into a ViTConfig and its parameters.

    Args:
      arrays: the checkpoint's flattened arrays ("/"-joined keys), e.g. an opened `.npz`.
      image_shape: (H, W, C) of the task's images; the position embeddings are resampled
        to its patch grid (`resample_posemb`). None: the checkpoint's own resolution.
      num_classes: classes of a fresh, zero-initialised head (big_vision's
        `head_zeroinit`); required unless `keep_head`.
      keep_head: keep the checkpoint's head (num_classes, if given, must match it).

    Returns:
      (config, params): a pre-LayerNorm ViT config (eps 1e-6, tanh-approximated GELU,
      biases everywhere, as big_vision's) and its unboxed parameter tree.

    Raises:
      CheckpointError: keys missing, shapes wrong, or a model our ViT cannot express.
    """
    if any(key.startswith("MAPHead_0/") or key == "probe" for key in arrays):
        raise CheckpointError(
            "attention-pooling (MAP head) ViTs are not supported; use 'tok' or 'gap'."
        )
    if "embedding/kernel" not in arrays:
        raise CheckpointError("not a big_vision ViT checkpoint: missing embedding/kernel.")
    patch_kernel = np.asarray(arrays["embedding/kernel"])
    if patch_kernel.ndim != 4 or patch_kernel.shape[0] != patch_kernel.shape[1]:
        raise CheckpointError(
            f"embedding/kernel has shape {list(patch_kernel.shape)}; expected [p, p, C, D]."
        )
    patch, _, channels, hidden = patch_kernel.shape
    pooling = "cls" if "cls" in arrays else "gap"
    reader = _Reader(arrays)
    cls_token = reader.get("cls", (1, 1, hidden)) if pooling == "cls" else None

    posemb = _find_posemb(arrays)
    if posemb.shape[-1] != hidden:
        raise CheckpointError(f"position embeddings of width {posemb.shape[-1]} != {hidden}.")
    side = math.isqrt(posemb.shape[0])
    if side * side + 1 == posemb.shape[0]:
        # The original ViT added the embeddings after the class token: fold its row in.
        if cls_token is not None:
            cls_token = cls_token + posemb[0]
        posemb = posemb[1:]
        side = math.isqrt(posemb.shape[0])
    if side * side != posemb.shape[0]:
        raise CheckpointError(f"{posemb.shape[0]} position embeddings are not a square grid.")
    if image_shape is None:
        image_shape = (side * patch, side * patch, channels)
    height, width, image_channels = image_shape
    if image_channels != channels or height % patch or width % patch:
        raise CheckpointError(
            f"image shape {tuple(image_shape)} does not fit the checkpoint's {patch}x{patch} "
            f"patches of {channels} channels."
        )
    grid = np.asarray(resample_posemb(posemb, (height // patch, width // patch)))

    blocks = sorted({int(m.group(1)) for k in arrays if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"encoder blocks {blocks} are not numbered 0..L-1.")
    if not blocks:
        raise CheckpointError("checkpoint has no Transformer/encoderblock_<i>.")
    first = _block_layout(arrays, 0)
    attn_prefix, wi = first["attn"], first["mlp/wi"]
    query = np.asarray(arrays.get(f"{attn_prefix}/query/kernel", np.zeros((0, 0, 0))))
    mlp_kernel = np.asarray(arrays.get(f"{wi}/kernel", np.zeros((0, 0))))
    if query.ndim != 3 or mlp_kernel.ndim != 2:
        raise CheckpointError(
            f"cannot read heads from {attn_prefix}/query/kernel {list(query.shape)} or the "
            f"MLP width from {wi}/kernel {list(mlp_kernel.shape)}."
        )
    _, heads, head_dim = query.shape
    mlp_dim = mlp_kernel.shape[1]

    params: dict[str, Any] = {
        "embed": {"patch": _dense(reader, "embedding", patch_kernel.shape, (hidden,))}
    }
    if cls_token is not None:
        params["cls"] = {"token": cls_token}
        grid = np.concatenate([np.zeros((1, hidden), grid.dtype), grid])
    params["pos"] = {"embedding": jnp.asarray(grid, jnp.float32)}
    qkv_shape, qkv_bias = (hidden, heads, head_dim), (heads, head_dim)
    for index in blocks:
        layout = _block_layout(arrays, index)
        attn = layout["attn"]
        params[f"block_{index}"] = {
            "norm_attn": _norm(reader, layout["norm_attn"], hidden),
            "attn": {
                "query": _dense(reader, f"{attn}/query", qkv_shape, qkv_bias),
                "key": _dense(reader, f"{attn}/key", qkv_shape, qkv_bias),
                "value": _dense(reader, f"{attn}/value", qkv_shape, qkv_bias),
                "out": _dense(reader, f"{attn}/out", (heads, head_dim, hidden), (hidden,)),
            },
            "norm_mlp": _norm(reader, layout["norm_mlp"], hidden),
            "mlp": {
                "wi": _dense(reader, layout["mlp/wi"], (hidden, mlp_dim), (mlp_dim,)),
                "wo": _dense(reader, layout["mlp/wo"], (mlp_dim, hidden), (hidden,)),
            },
        }
    params["final_norm"] = _norm(reader, "Transformer/encoder_norm", hidden)

    if keep_head:
        if any(key.startswith("pre_logits/") for key in arrays):
            raise CheckpointError(
                "the checkpoint's head sits on a pre_logits layer our ViT does not have; "
                "load it with a fresh head (keep_head=False)."
            )
        if "head/kernel" not in arrays:
            raise CheckpointError("keep_head, but the checkpoint has no head/kernel.")
        head_classes = np.shape(arrays["head/kernel"])[-1]
        if num_classes not in (None, head_classes):
            raise CheckpointError(
                f"keep_head with num_classes={num_classes}, but the head has {head_classes}."
            )
        num_classes = head_classes
        head = _dense(reader, "head", (hidden, num_classes), (num_classes,))
    else:
        if num_classes is None or num_classes < 1:
            raise CheckpointError("a fresh head needs num_classes >= 1 (or keep_head=True).")
        # big_vision's head_zeroinit; a pre_logits layer is dropped with the old head.
        head = {
            "kernel": jnp.zeros((hidden, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32),
        }
    params["head"] = {"dense": head}
    reader.check()

    config = vit.ViTConfig(
        hidden=hidden,
        mlp_dim=mlp_dim,
        num_heads=heads,
        qk_dim=head_dim,
        v_dim=head_dim,
        num_layers=len(blocks),
        norm="layernorm",
        norm_eps=BIG_VISION_LAYERNORM_EPS,
        norm_placement="pre",
        attention_scaling="runtime",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        mlp_activation="gelu_tanh",  # flax.linen.gelu's default, which big_vision calls
        image_shape=(height, width, channels),
        patch_size=patch,
        num_classes=num_classes,
        pooling=pooling,
        head_zero_init=True,
    )
    return config, params


def load_npz(
    path: str,
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    keep_head: bool = False,
) -> tuple[vit.ViTConfig, dict[str, Any]]:
    """Reads a big_vision / AugReg `.npz` ViT checkpoint (see `from_big_vision`).

    Args:
      path: the `.npz` file.
      image_shape: the task's (H, W, C); None: the checkpoint's resolution.
      num_classes: classes of the fresh head (required unless keep_head).
      keep_head: keep the checkpoint's head.

    Returns:
      (config, params) as `from_big_vision` returns them.

    Raises:
      CheckpointError: the file is missing, unreadable, or not a ViT in that layout.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read ViT checkpoint {path}: {err}") from None
    try:
        return from_big_vision(
            arrays, image_shape=image_shape, num_classes=num_classes, keep_head=keep_head
        )
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
