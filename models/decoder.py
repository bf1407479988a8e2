"""Decoder-only language model, T5 style: RMSNorm, pre-norm, no biases, causal attention.

Components: `embed` (token embedding [vocab, embed]), `pos` (learned positions),
`block_0..block_{L-1}`, `final_norm`, `logits` (an untied output projection, or the
transposed embedding when tied). The residual stream starts at embed + positions, which
is the setting of the growth paper (spec/growth.md).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers


@dataclasses.dataclass(frozen=True)
class DecoderConfig(layers.TransformerConfig):
    """Decoder-only LM architecture (T5.1.1-like defaults).

    Attributes:
      vocab_size: token vocabulary size.
      max_len: longest sequence (learned positions).
      tie_embeddings: compute logits with the transposed token embedding.
    """

    vocab_size: int = 259
    max_len: int = 256
    tie_embeddings: bool = False
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp_bias: bool = False
    mlp_activation: str = "gelu_tanh"
    gated_mlp: bool = True
    attention_scaling: str = "folded"


def decoder_tiny(**overrides) -> DecoderConfig:
    """A decoder LM that trains in seconds on CPU (hidden 64, 2 layers)."""
    base = dict(hidden=64, mlp_dim=128, num_heads=4, qk_dim=16, v_dim=16, num_layers=2)
    return DecoderConfig(**{**base, **overrides})


class Decoder(nn.Module):
    """Causal transformer LM mapping tokens [B, L] to logits [B, L, vocab]."""

    config: DecoderConfig

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Computes next-token logits.

        Args:
          tokens_BxL: int input tokens (shifted targets).
          segment_ids_BxL: packing segments (attention stays within a segment), or None.
          positions_BxL: positions within segments, or None for 0..L-1.
          deterministic: disables dropout.

        Returns:
          Logits [B, L, vocab_size] in float32.
        """
        c = self.config
        length = tokens_BxL.shape[1]
        if length > c.max_len:
            raise ValueError(f"Sequence length {length} exceeds DecoderConfig.max_len={c.max_len}.")
        embed = Embed(c.vocab_size, c, nn.initializers.normal(1.0), "vocab", name="embed")
        pos = Embed(c.max_len, c, nn.initializers.normal(0.02), "length", name="pos")
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(length), tokens_BxL.shape)
        x_BxLxD = embed(tokens_BxL) + pos(positions_BxL)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD.astype(c.dtype), ("batch", "length", "embed"))
        mask = layers.causal_mask(length)
        if segment_ids_BxL is not None:
            mask = mask & (segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :])
        for i in range(c.num_layers):
            x_BxLxD = layers.TransformerBlock(c, name=f"block_{i}")(x_BxLxD, mask, deterministic)
        x_BxLxD = layers.make_norm(c, "final_norm")(x_BxLxD)
        if c.tie_embeddings:
            logits = embed.attend(x_BxLxD)
        else:
            logits = layers.Projection(
                "bld,dv->blv",
                (c.hidden, c.vocab_size),
                ("embed", "vocab"),
                None,
                nn.initializers.lecun_normal(),
                dtype=c.dtype,
                param_dtype=c.param_dtype,
                name="logits",
            )(x_BxLxD)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Embed(nn.Module):
    """A lookup table [num, hidden] (`embedding`), usable as a tied output projection too.

    Attributes:
      num: rows (vocabulary size or positions).
      config: the architecture (hidden size, dtypes).
      initializer: initializer of the table.
      row_axis: logical name of the rows ("vocab" or "length").
    """

    num: int
    config: DecoderConfig
    initializer: layers.Initializer
    row_axis: str

    def setup(self):
        """Declares the table."""
        c = self.config
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.initializer, (self.row_axis, "embed")),
            (self.num, c.hidden),
            c.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Looks up rows: ids [...] -> [..., hidden]."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.config.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Scores activations against every row of the table (tied output logits).

        Args:
          x: activations [..., hidden].

        Returns:
          Scores [..., num].
        """
        return jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.config.dtype))
