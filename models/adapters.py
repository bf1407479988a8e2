"""Residual adapters (Houlsby et al., arXiv 1902.00751), the layer muNet inserts.

x + Dense_h(GELU(Dense_a(LayerNorm(x)))) with the output projection's kernel (and
bias) starting at zero, so a freshly inserted adapter is the identity and inserting it
before a block leaves the path's function unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from models import layers


class ResidualAdapter(nn.Module):
    """A bottleneck adapter with a skip connection; identity at initialisation.

    Attributes:
      config: supplies the norm kind, its eps, the activation and the dtypes.
      size: the bottleneck width a (muNet: 8, 16, 32, 64 or 128).
    """

    config: layers.TransformerConfig
    size: int

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Returns x + adapter(x), same shape [B, L, D]."""
        c = self.config
        hidden = x_BxLxD.shape[-1]
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        normed_BxLxD = layers.make_norm(c, "norm")(x_BxLxD)
        down_BxLxA = layers.Projection(
            "bld,da->bla",
            (hidden, self.size),
            ("embed", "mlp"),
            ("mlp",),
            nn.initializers.lecun_normal(),
            name="down",
            **common,
        )(normed_BxLxD)
        up_BxLxD = layers.Projection(
            "bla,ad->bld",
            (self.size, hidden),
            ("mlp", "embed"),
            ("embed",),
            nn.initializers.zeros,
            name="up",
            **common,
        )(layers.activation_fn("gelu")(down_BxLxA))
        return x_BxLxD + up_BxLxD.astype(x_BxLxD.dtype)
