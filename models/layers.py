"""Transformer building blocks shared by every model family (ViT, encoder, decoder).

The parameter names and layouts here are a contract that growth/ relies on
(docs/architecture.md): attention kernels are `query`/`key`/`value` [embed, heads, kv]
and `out` [heads, kv, embed]; MLP kernels are `wi` (or `wi_0`, `wi_1`) [embed, mlp] and
`wo` [mlp, embed]; norms carry `scale` (and `bias` for LayerNorm). Every parameter has
logical axis names and the main activations are constrained by logical names, so the
same module shards under any mesh through `models.partitioning` rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

NORMS = ("layernorm", "rmsnorm")
PLACEMENTS = ("pre", "post")
SCALINGS = ("runtime", "folded")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The architecture numbers shared by every family; growth changes exactly these.

    Attributes:
      hidden: width of the residual stream (h).
      mlp_dim: hidden width of the MLP (p).
      num_heads: attention heads (E).
      qk_dim: key/query size per head (k).
      v_dim: value size per head (v).
      num_layers: transformer blocks (L).
      norm: "layernorm" or "rmsnorm".
      norm_eps: epsilon inside the norms (RMSNorm growth rescales it).
      norm_placement: "pre" (x + f(N(x))) or "post" (N(x + f(x))).
      attention_scaling: "runtime" divides logits by sqrt(qk_dim) at run time;
        "folded" has no runtime scale and folds it into the query initialisation (T5).
      qkv_bias: biases on query, key and value projections.
      out_bias: bias on the attention output projection.
      mlp_bias: biases on the MLP projections.
      mlp_activation: "relu", "gelu" (exact erf) or "gelu_tanh".
      gated_mlp: gated MLP act(x wi_0) * (x wi_1) wo (T5.1.1 style).
      dropout_rate: dropout on the attention and MLP branches (0 disables).
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    hidden: int = 64
    mlp_dim: int = 128
    num_heads: int = 4
    qk_dim: int = 16
    v_dim: int = 16
    num_layers: int = 2
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    norm_placement: str = "pre"
    attention_scaling: str = "runtime"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = True
    mlp_activation: str = "gelu"
    gated_mlp: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        for field, allowed in (
            ("norm", NORMS),
            ("norm_placement", PLACEMENTS),
            ("attention_scaling", SCALINGS),
            ("mlp_activation", ACTIVATIONS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(
                    f"{type(self).__name__}.{field}={value!r}; expected one of {allowed}."
                )
        for field in ("hidden", "mlp_dim", "num_heads", "qk_dim", "v_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{type(self).__name__}.{field} must be >= 1.")
        if self.num_layers < 0:
            raise ValueError(f"{type(self).__name__}.num_layers must be >= 0.")


def logical_param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Dtype,
) -> jax.Array:
    """Declares a parameter boxed with its logical axis names.

    Args:
      module: the module that owns the parameter.
      name: parameter name.
      init: initializer (key, shape, dtype) -> array.
      shape: parameter shape.
      axes: one logical axis name (or None) per dimension.
      dtype: parameter dtype.

    Returns:
      The (unboxed) parameter value.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} axis names for shape {tuple(shape)}.")
    boxed_init = nn.with_logical_partitioning(init, tuple(axes))
    value: jax.Array = module.param(name, boxed_init, tuple(shape), dtype)  # type: ignore[assignment]
    return value


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function for a TransformerConfig.mlp_activation name.

    Args:
      name: "relu", "gelu" (exact) or "gelu_tanh".

    Returns:
      The elementwise function.
    """
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise ValueError(f"Unknown activation {name!r}; expected one of {ACTIVATIONS}.")


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last axis with a learned `scale` (and `bias` for LN).

    Attributes:
      kind: "layernorm" or "rmsnorm".
      eps: epsilon added to the variance / mean square.
      axis_name: logical name of the normalised axis.
      dtype: computation output dtype.
      param_dtype: parameter dtype.
    """

    kind: str = "layernorm"
    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises `x` over its last axis."""
        width = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = logical_param(
            self, "scale", nn.initializers.ones, (width,), (self.axis_name,), self.param_dtype
        )
        if self.kind == "rmsnorm":
            mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(mean_square + self.eps) * scale
        elif self.kind == "layernorm":
            bias = logical_param(
                self, "bias", nn.initializers.zeros, (width,), (self.axis_name,), self.param_dtype
            )
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(variance + self.eps) * scale + bias
        else:
            raise ValueError(f"Unknown norm {self.kind!r}; expected one of {NORMS}.")
        return y.astype(self.dtype)


def make_norm(config: TransformerConfig, name: str) -> Norm:
    """Builds the norm a config asks for.

    Args:
      config: supplies norm kind, eps and dtypes.
      name: the module name (`norm_attn`, `norm_mlp`, `final_norm`, ...).

    Returns:
      An unbound `Norm`.
    """
    return Norm(
        kind=config.norm,
        eps=config.norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        name=name,
    )


class Projection(nn.Module):
    """A kernel (+ optional bias) applied by an einsum: the generic dense layer.

    Attributes:
      equation: einsum from (input, kernel) to output, e.g. "bld,dhk->blhk".
      kernel_shape: shape of `kernel`.
      kernel_axes: logical names of the kernel's axes.
      bias_axes: logical names of the bias (the output feature axes), or None for no bias.
      kernel_init: initializer of the kernel.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_axes: tuple[str | None, ...] | None = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the projection."""
        kernel = logical_param(
            self, "kernel", self.kernel_init, self.kernel_shape, self.kernel_axes, self.param_dtype
        )
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes is not None:
            out_shape = self.kernel_shape[-len(self.bias_axes) :]
            bias = logical_param(
                self, "bias", nn.initializers.zeros, out_shape, self.bias_axes, self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


def _fan_in_init(in_axis: Sequence[int], out_axis: Sequence[int], scale: float = 1.0):
    return nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=tuple(in_axis), out_axis=tuple(out_axis)
    )


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention with separate key/query and value sizes.

    Attributes:
      config: the block's TransformerConfig.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        """Attends over the sequence.

        Args:
          x_BxLxD: input activations.
          mask_Bx1xLxL: boolean mask (True = may attend), broadcast over heads, or None.
          deterministic: disables dropout.

        Returns:
          The attention output [B, L, D].
        """
        c = self.config
        h, heads, k, v = x_BxLxD.shape[-1], c.num_heads, c.qk_dim, c.v_dim
        qkv_bias = ("heads", "kv") if c.qkv_bias else None
        # T5 folds 1/sqrt(k) into the query initialisation instead of scaling at run time.
        query_scale = 1.0 if c.attention_scaling == "runtime" else k**-0.5
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        in_init = _fan_in_init((0,), (1, 2))
        q_BxLxHxK = Projection(
            "bld,dhk->blhk",
            (h, heads, k),
            ("embed", "heads", "kv"),
            qkv_bias,
            _fan_in_init((0,), (1, 2), query_scale**2),
            name="query",
            **common,
        )(x_BxLxD)
        k_BxLxHxK = Projection(
            "bld,dhk->blhk",
            (h, heads, k),
            ("embed", "heads", "kv"),
            qkv_bias,
            in_init,
            name="key",
            **common,
        )(x_BxLxD)
        v_BxLxHxV = Projection(
            "bld,dhk->blhk",
            (h, heads, v),
            ("embed", "heads", "kv"),
            qkv_bias,
            in_init,
            name="value",
            **common,
        )(x_BxLxD)
        q_BxLxHxK = nn.with_logical_constraint(q_BxLxHxK, ("batch", "length", "heads", "kv"))
        if c.attention_scaling == "runtime":
            q_BxLxHxK = q_BxLxHxK / jnp.sqrt(k).astype(c.dtype)
        logits_BxHxLxL = jnp.einsum("bqhk,bthk->bhqt", q_BxLxHxK, k_BxLxHxK).astype(jnp.float32)
        if mask_Bx1xLxL is not None:
            big_neg = jnp.finfo(jnp.float32).min
            logits_BxHxLxL = jnp.where(mask_Bx1xLxL, logits_BxHxLxL, big_neg)
        probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(c.dtype)
        if c.dropout_rate > 0 and not deterministic:
            probs_BxHxLxL = nn.Dropout(c.dropout_rate)(probs_BxHxLxL, deterministic=False)
        mixed_BxLxHxV = jnp.einsum("bhqt,bthv->bqhv", probs_BxHxLxL, v_BxLxHxV)
        out_bias = ("embed",) if c.out_bias else None
        y_BxLxD = Projection(
            "blhv,hvd->bld",
            (heads, v, h),
            ("heads", "kv", "embed"),
            out_bias,
            _fan_in_init((0, 1), (2,)),
            name="out",
            **common,
        )(mixed_BxLxHxV)
        return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))


class Mlp(nn.Module):
    """The feed-forward branch: act(x wi + b) wo + b, or gated act(x wi_0) * (x wi_1) wo.

    Attributes:
      config: the block's TransformerConfig.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True) -> jax.Array:
        """Applies the MLP to every position."""
        c = self.config
        h, m = x_BxLxD.shape[-1], c.mlp_dim
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        in_bias = ("mlp",) if c.mlp_bias else None
        act = activation_fn(c.mlp_activation)
        in_init = _fan_in_init((0,), (1,))
        if c.gated_mlp:
            gate = Projection(
                "bld,dm->blm", (h, m), ("embed", "mlp"), in_bias, in_init, name="wi_0", **common
            )(x_BxLxD)
            linear = Projection(
                "bld,dm->blm", (h, m), ("embed", "mlp"), in_bias, in_init, name="wi_1", **common
            )(x_BxLxD)
            hidden_BxLxM = act(gate) * linear
        else:
            hidden_BxLxM = act(
                Projection(
                    "bld,dm->blm", (h, m), ("embed", "mlp"), in_bias, in_init, name="wi", **common
                )(x_BxLxD)
            )
        hidden_BxLxM = nn.with_logical_constraint(hidden_BxLxM, ("batch", "length", "mlp"))
        if c.dropout_rate > 0 and not deterministic:
            hidden_BxLxM = nn.Dropout(c.dropout_rate)(hidden_BxLxM, deterministic=False)
        out_bias = ("embed",) if c.mlp_bias else None
        y_BxLxD = Projection(
            "blm,md->bld",
            (m, h),
            ("mlp", "embed"),
            out_bias,
            _fan_in_init((0,), (1,)),
            name="wo",
            **common,
        )(hidden_BxLxM)
        return nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))


class TransformerBlock(nn.Module):
    """One attention + MLP block with pre- or post-norm residual connections.

    Attributes:
      config: the block's TransformerConfig.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        """Applies the block.

        Args:
          x_BxLxD: residual stream.
          mask_Bx1xLxL: attention mask (True = may attend) or None.
          deterministic: disables dropout.

        Returns:
          The new residual stream [B, L, D].
        """
        c = self.config
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        norm_attn, norm_mlp = make_norm(c, "norm_attn"), make_norm(c, "norm_mlp")
        attn, mlp = MultiHeadAttention(c, name="attn"), Mlp(c, name="mlp")

        def branch_dropout(y):
            if c.dropout_rate > 0 and not deterministic:
                return nn.Dropout(c.dropout_rate)(y, deterministic=False)
            return y

        if c.norm_placement == "pre":
            x_BxLxD = x_BxLxD + branch_dropout(
                attn(norm_attn(x_BxLxD), mask_Bx1xLxL, deterministic)
            )
            x_BxLxD = x_BxLxD + branch_dropout(mlp(norm_mlp(x_BxLxD), deterministic))
        else:
            x_BxLxD = norm_attn(
                x_BxLxD + branch_dropout(attn(x_BxLxD, mask_Bx1xLxL, deterministic))
            )
            x_BxLxD = norm_mlp(x_BxLxD + branch_dropout(mlp(x_BxLxD, deterministic)))
        return x_BxLxD


def padding_mask(valid_BxL: jax.Array) -> jax.Array:
    """Attention mask [B, 1, L, L] letting each position attend to valid positions only."""
    return (valid_BxL[:, None, None, :] > 0) & jnp.ones_like(valid_BxL, bool)[:, None, :, None]


def causal_mask(length: int) -> jax.Array:
    """Attention mask [1, 1, L, L] letting each position attend to itself and the past."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]
