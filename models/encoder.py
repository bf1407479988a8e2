"""BERT-style post-norm text encoder (MiniLM sized) on the shared transformer layers.

The parameter tree is keyed by component names at the top level: `embed` (word,
position and token-type tables plus a LayerNorm), `block_0 .. block_{L-1}` (shared
`layers.TransformerBlock`s, post-norm for BERT), and `head` (a dense layer over the
pooled representation) when the config has classes. Inputs are WordPiece ids [B, L]
with 0 as padding (docs/architecture.md); padding is masked out of attention and of
the pooling. `models.pretrained.minilm` loads the all-MiniLM-L6-v2 weights into this tree.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers

POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class EncoderConfig(layers.TransformerConfig):
    """Text encoder architecture.

    Attributes:
      vocab_size: rows of the word embedding table (id 0 is padding).
      max_len: rows of the position table, the longest supported input.
      type_vocab_size: rows of the token-type (segment) table.
      num_classes: classes of the head, or None for no head (the model then returns
        the pooled embedding).
      pooling: "mean" (mean over non-padding tokens) or "cls" (the first token).
    """

    vocab_size: int = 128
    max_len: int = 32
    type_vocab_size: int = 2
    num_classes: int | None = None
    pooling: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ValueError(f"EncoderConfig.pooling={self.pooling!r}; expected one of {POOLINGS}.")
        for field in ("vocab_size", "max_len", "type_vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"EncoderConfig.{field} must be >= 1.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("EncoderConfig.num_classes must be >= 1 or None.")


# BERT: post-LN, exact GELU, biases everywhere, LayerNorm eps 1e-12, runtime scaling.
_BERT = dict(
    norm="layernorm",
    norm_eps=1e-12,
    norm_placement="post",
    attention_scaling="runtime",
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    mlp_activation="gelu",
    gated_mlp=False,
)


def minilm_l6(**overrides) -> EncoderConfig:
    """The architecture of sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters).

    Args:
      **overrides: EncoderConfig fields to change (e.g. num_classes, dropout_rate).

    Returns:
      The config: hidden 384, 6 layers, 12 heads of 32, MLP 1536, vocab 30522.
    """
    base = dict(
        _BERT,
        vocab_size=30522,
        hidden=384,
        num_layers=6,
        num_heads=12,
        qk_dim=32,
        v_dim=32,
        mlp_dim=1536,
        max_len=512,
        type_vocab_size=2,
    )
    return EncoderConfig(**{**base, **overrides})


def tiny(**overrides) -> EncoderConfig:
    """A BERT-shaped encoder that runs in milliseconds on CPU (hidden 32, 2 layers).

    Args:
      **overrides: EncoderConfig fields to change.

    Returns:
      The config.
    """
    base = dict(
        _BERT,
        vocab_size=128,
        hidden=32,
        num_layers=2,
        num_heads=2,
        qk_dim=16,
        v_dim=16,
        mlp_dim=64,
        max_len=32,
        type_vocab_size=2,
    )
    return EncoderConfig(**{**base, **overrides})


def component_slots(config: EncoderConfig) -> list[str]:
    """The ordered top-level component names of an encoder of this config.

    Args:
      config: the architecture.

    Returns:
      `["embed", "block_0", ..., "block_{L-1}"]` plus `"head"` when it has classes.
    """
    slots = ["embed"] + [f"block_{i}" for i in range(config.num_layers)]
    return slots + (["head"] if config.num_classes is not None else [])


class Embeddings(nn.Module):
    """Word + position + token-type embeddings followed by a LayerNorm (BERT).

    Attributes:
      config: the encoder architecture.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(
        self,
        inputs_BxL: jax.Array,
        token_types_BxL: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Embeds token ids.

        Args:
          inputs_BxL: int token ids.
          token_types_BxL: int segment ids, or None for all zeros.
          deterministic: disables dropout.

        Returns:
          The normalised embeddings [B, L, D].
        """
        c = self.config
        length = inputs_BxL.shape[1]
        if length > c.max_len:
            raise ValueError(f"input length {length} exceeds EncoderConfig.max_len={c.max_len}.")
        init = nn.initializers.normal(0.02)
        word = layers.logical_param(
            self, "word", init, (c.vocab_size, c.hidden), ("vocab", "embed"), c.param_dtype
        )
        position = layers.logical_param(
            self, "position", init, (c.max_len, c.hidden), ("length", "embed"), c.param_dtype
        )
        # Two rows: not worth sharding, and "vocab" would not divide a model axis > 2.
        token_type = layers.logical_param(
            self, "token_type", init, (c.type_vocab_size, c.hidden), (None, "embed"), c.param_dtype
        )
        if token_types_BxL is None:
            token_types_BxL = jnp.zeros_like(inputs_BxL)
        x_BxLxD = (
            jnp.take(word, inputs_BxL, axis=0)
            + position[None, :length]
            + jnp.take(token_type, token_types_BxL, axis=0)
        ).astype(c.dtype)
        x_BxLxD = layers.make_norm(c, "norm")(x_BxLxD)
        if c.dropout_rate > 0 and not deterministic:
            x_BxLxD = nn.Dropout(c.dropout_rate)(x_BxLxD, deterministic=False)
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


def mean_pool(x_BxLxD: jax.Array, valid_BxL: jax.Array) -> jax.Array:
    """Mean of the valid token states (sentence-transformers' attention-mask pooling).

    Args:
      x_BxLxD: token states.
      valid_BxL: 1 (or True) for real tokens, 0 for padding.

    Returns:
      The pooled states [B, D] (zeros for an all-padding row).
    """
    weights_BxLx1 = valid_BxL.astype(x_BxLxD.dtype)[..., None]
    total_BxD = jnp.sum(x_BxLxD * weights_BxLx1, axis=1)
    count_Bx1 = jnp.maximum(jnp.sum(weights_BxLx1, axis=1), 1e-9)
    return total_BxD / count_Bx1


class Encoder(nn.Module):
    """The text encoder; its top-level parameter names are the component slots.

    Attributes:
      config: the architecture.
    """

    config: EncoderConfig

    @nn.compact
    def __call__(
        self,
        inputs: jax.Array,
        deterministic: bool = True,
        return_tokens: bool = False,
        token_types: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes token ids and classifies (or pools) them.

        Args:
          inputs: int32 token ids [B, L], 0 = padding.
          deterministic: disables dropout.
          return_tokens: return the final token states [B, L, D] instead.
          token_types: optional int32 segment ids [B, L] (default all zeros).

        Returns:
          Logits [B, num_classes] when the config has classes, else the pooled
          representation [B, D] ("mean" or "cls" pooling, not normalised); or the token
          states when `return_tokens`.
        """
        c = self.config
        valid_BxL = inputs > 0
        mask_Bx1xLxL = layers.padding_mask(valid_BxL)
        x_BxLxD = Embeddings(c, name="embed")(inputs, token_types, deterministic)
        for i in range(c.num_layers):
            x_BxLxD = layers.TransformerBlock(c, name=f"block_{i}")(
                x_BxLxD, mask_Bx1xLxL, deterministic
            )
        if return_tokens:
            return x_BxLxD
        if c.pooling == "cls":
            pooled_BxD = x_BxLxD[:, 0]
        else:
            pooled_BxD = mean_pool(x_BxLxD, valid_BxL)
        if c.num_classes is None:
            return pooled_BxD
        return layers.Projection(
            "bd,dk->bk",
            (c.hidden, c.num_classes),
            ("embed", "classes"),
            ("classes",),
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            name="head",
        )(pooled_BxD)

    def encode(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
        """Returns the final token states.

        Args:
          inputs: int32 token ids [B, L], 0 = padding.
          deterministic: disables dropout.

        Returns:
          Token states [B, L, D] (padding positions hold values nobody should read).
        """
        return self(inputs, deterministic, return_tokens=True)

    def sentence_embedding(self, inputs: jax.Array) -> jax.Array:
        """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

        Mean over the non-padding token states, then L2 normalisation, whatever the
        config's `pooling`.

        Args:
          inputs: int32 token ids [B, L], 0 = padding.

        Returns:
          Unit-norm embeddings [B, D] in float32.
        """
        x_BxLxD = self.encode(inputs).astype(jnp.float32)
        pooled_BxD = mean_pool(x_BxLxD, inputs > 0)
        norm_Bx1 = jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True)
        return pooled_BxD / jnp.maximum(norm_Bx1, 1e-12)
