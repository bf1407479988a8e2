"""The model families a muNet path can be built from: ViT (images) and the text encoder.

A path stores its architecture as JSON (`system.Path.architecture`, "model" names the
family) and its components by slot; a family says how to read that architecture back,
which slots a model of a config has, how one component maps the running activation to
the next, which batch feature feeds the path, and how a fresh head starts. The search
(candidate.forward, mutations.materialize, seeding.seed_root, inference) runs any
family through this table; adapters (`models.adapters.ResidualAdapter`) are generic and
applied by the caller.

- "vit" (`models.vit`): input "image" float [B, H, W, C]; slots embed, cls, pos,
  block_i, final_norm, head; components applied exactly as `vit.apply_component`.
- "encoder" (`models.encoder`, the BERT-like MiniLM encoder): input "inputs" int32
  token ids [B, L] with 0 as padding; slots embed, block_i, head. As in
  `encoder.Encoder`, padding (ids <= 0) is masked out of attention and of the head's
  pooling: the mask is computed once from the inputs and given to every component.

Depth growth (the "add:block" mutation) is possible only where it preserves the
function exactly (`growth.rules`); `add_block_refusal` says why it is not for a
post-norm model such as the encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeAlias, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from growth import rules as growth_rules
from models import encoder, layers, vit

ModelConfig: TypeAlias = vit.ViTConfig | encoder.EncoderConfig
Params = Any
DEFAULT_FAMILY = "vit"
# Config fields written only when set (not None), so that an architecture stored before
# the field existed reads back, and is written, exactly as before.
OPTIONAL_FIELDS = ("resolution",)


class Family:
    """One model family: its config class, input feature, slots and components.

    Attributes:
      name: the "model" value stored in a path's architecture.
      config_type: the family's frozen config dataclass.
      input_key: the batch feature a path reads ("image", "inputs").
      input_dtype: that feature's dtype.
    """

    name: str = ""
    config_type: type = layers.TransformerConfig
    input_key: str = ""
    input_dtype: Any = np.float32

    def component_slots(self, config: Any) -> list[str]:
        """The ordered component slots of a model of `config` (no adapters)."""
        raise NotImplementedError

    def context(self, config: Any, inputs: jax.Array) -> Any:
        """What every component may need besides the running activation (e.g. a mask)."""
        del config, inputs
        return None

    def apply_component(
        self, config: Any, slot: str, params: Params, x: jax.Array, context: Any
    ) -> jax.Array:
        """Applies one component (deterministic) to the previous component's output."""
        raise NotImplementedError

    def activation_shape(self, config: Any) -> tuple[int, ...]:
        """A batch-of-one shape of the activations between blocks (to initialise adapters)."""
        raise NotImplementedError

    def init_head(self, config: Any, key: jax.Array) -> Params:
        """A fresh head for `config.num_classes` classes (unboxed parameters)."""
        raise NotImplementedError

    def input_spec(self, config: Any) -> jax.ShapeDtypeStruct:
        """The input of a batch of one (FLOPs are counted on it)."""
        raise NotImplementedError


class ViTFamily(Family):
    """`models.vit`: components and heads exactly as `vit.make_component` makes them."""

    name = "vit"
    config_type = vit.ViTConfig
    input_key = "image"
    input_dtype = np.float32

    def component_slots(self, config: vit.ViTConfig) -> list[str]:
        """See `Family.component_slots`."""
        return vit.component_slots(config)

    def apply_component(
        self, config: vit.ViTConfig, slot: str, params: Params, x: jax.Array, context: Any
    ) -> jax.Array:
        """See `Family.apply_component`."""
        del context
        return vit.apply_component(vit.make_component(config, slot), slot, params, x)

    def activation_shape(self, config: vit.ViTConfig) -> tuple[int, ...]:
        """See `Family.activation_shape`."""
        return (1, config.num_tokens, config.hidden)

    def init_head(self, config: vit.ViTConfig, key: jax.Array) -> Params:
        """The ViT head's own initialisation (zero when `head_zero_init`)."""
        tokens_1xLxD = jnp.zeros(self.activation_shape(config), config.dtype)
        variables = jax.jit(vit.make_component(config, "head").init)(key, tokens_1xLxD)
        return nn.unbox(variables["params"])

    def input_spec(self, config: vit.ViTConfig) -> jax.ShapeDtypeStruct:
        """See `Family.input_spec`."""
        return jax.ShapeDtypeStruct((1, *config.image_shape), np.float32)


def _encoder_head(config: encoder.EncoderConfig, init: Any) -> layers.Projection:
    """The encoder's classification head: the layout of `encoder.Encoder`'s "head"."""
    if config.num_classes is None:
        raise ValueError("An encoder path needs EncoderConfig.num_classes for its head.")
    return layers.Projection(
        "bd,dk->bk",
        (config.hidden, config.num_classes),
        ("embed", "classes"),
        ("classes",),
        init,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
    )


class EncoderFamily(Family):
    """`models.encoder`: embed -> post-norm blocks -> pooled head, masked by padding."""

    name = "encoder"
    config_type = encoder.EncoderConfig
    input_key = "inputs"
    input_dtype = np.int32

    def component_slots(self, config: encoder.EncoderConfig) -> list[str]:
        """See `Family.component_slots`."""
        return encoder.component_slots(config)

    def context(self, config: encoder.EncoderConfig, inputs: jax.Array) -> Any:
        """(valid [B, L], attention mask [B, 1, L, L]) as `encoder.Encoder` computes them."""
        del config
        valid_BxL = inputs > 0
        return valid_BxL, layers.padding_mask(valid_BxL)

    def apply_component(
        self, config: encoder.EncoderConfig, slot: str, params: Params, x: jax.Array, context: Any
    ) -> jax.Array:
        """See `Family.apply_component`; "embed" reads the token ids (x is the input)."""
        valid_BxL, mask_Bx1xLxL = context
        variables = {"params": params}
        if slot == "embed":
            out = encoder.Embeddings(config).apply(variables, x)
        elif slot.startswith("block_"):
            out = layers.TransformerBlock(config).apply(variables, x, mask_Bx1xLxL, True)
        elif slot == "head":
            if config.pooling == "cls":
                pooled_BxD = x[:, 0]
            else:
                pooled_BxD = encoder.mean_pool(x, valid_BxL)
            out = _encoder_head(config, nn.initializers.zeros).apply(variables, pooled_BxD)
        else:
            raise ValueError(
                f"Unknown encoder component {slot!r}; "
                f"expected one of {self.component_slots(config)}."
            )
        return cast(jax.Array, out)

    def activation_shape(self, config: encoder.EncoderConfig) -> tuple[int, ...]:
        """See `Family.activation_shape`."""
        return (1, 1, config.hidden)

    def init_head(self, config: encoder.EncoderConfig, key: jax.Array) -> Params:
        """A zero head (as the ViT's `head_zero_init`): kernel [D, C] and bias [C]."""
        del key
        head = _encoder_head(config, nn.initializers.zeros)
        shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((1, config.hidden)))
        return jax.tree_util.tree_map(
            lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes["params"])
        )

    def input_spec(self, config: encoder.EncoderConfig) -> jax.ShapeDtypeStruct:
        """See `Family.input_spec` (the longest input, `max_len` ids)."""
        return jax.ShapeDtypeStruct((1, config.max_len), np.int32)


FAMILIES: dict[str, Family] = {f.name: f for f in (ViTFamily(), EncoderFamily())}


def family_named(name: str) -> Family:
    """The family stored as "model" in an architecture.

    Raises:
      ValueError: an unknown family.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; known: {sorted(FAMILIES)}.")
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family of a config object (by its class).

    Raises:
      TypeError: a config of no known family.
    """
    for family in FAMILIES.values():
        if isinstance(config, family.config_type):
            return family
    raise TypeError(f"No model family for a {type(config).__name__}; known: {sorted(FAMILIES)}.")


def input_keys() -> dict[str, Any]:
    """Every family's input feature and its dtype (what a batch may carry)."""
    return {f.input_key: f.input_dtype for f in FAMILIES.values()}


def architecture_of(config: ModelConfig) -> dict[str, Any]:
    """The JSON-safe architecture of a config (see `evolution.system.architecture.architecture_of`).

    Args:
      config: a config of a known family.

    Returns:
      {"model": family name, "config": fields except num_layers / num_classes (dtypes
      by name, tuples as lists; `OPTIONAL_FIELDS` only when set), "num_layers": L,
      "num_classes": C (None: no head)}.
    """
    family = family_of(config)
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in ("num_layers", "num_classes"):
            continue
        if field.name in OPTIONAL_FIELDS and value is None:
            continue
        if field.name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        elif isinstance(value, tuple):
            value = list(value)
        fields[field.name] = value
    classes = config.num_classes
    return {
        "model": family.name,
        "config": fields,
        "num_layers": int(config.num_layers),
        "num_classes": None if classes is None else int(classes),
    }


def _dtype_named(name: Any) -> Any:
    """The jnp scalar type of a stored dtype name; refuses names that are not dtypes.

    The name comes from a store, so it is checked to be a numeric dtype before it is
    looked up on `jnp` (any other attribute of `jnp` is refused).
    """
    try:
        kind = jnp.dtype(str(name)).kind
    except TypeError as error:
        raise ValueError(f"The architecture's dtype {name!r} is not a dtype.") from error
    if kind not in "biufV" or not hasattr(jnp, str(name)):  # V: bfloat16 and kin
        raise ValueError(f"The architecture's dtype {name!r} is not a numeric dtype name.")
    return getattr(jnp, str(name))


def config_from_architecture(architecture: Mapping[str, Any]) -> ModelConfig:
    """Rebuilds a config from `architecture_of`'s JSON ("model" defaults to "vit").

    Raises:
      ValueError: no "config", or an unknown family.
    """
    if "config" not in architecture:
        raise ValueError(f"No model config in the architecture {dict(architecture)}.")
    family = family_named(str(architecture.get("model", DEFAULT_FAMILY)))
    fields = dict(architecture["config"])
    for name in ("dtype", "param_dtype"):
        if name in fields:
            fields[name] = _dtype_named(fields[name])
    for name, value in fields.items():
        if isinstance(value, list):  # JSON has no tuples; configs hold tuples only
            fields[name] = tuple(value)
    classes = architecture.get("num_classes")
    config: ModelConfig = family.config_type(
        **fields,
        num_layers=int(architecture["num_layers"]),
        num_classes=None if classes is None else int(classes),
    )
    return config


def add_block_refusal(architecture: Mapping[str, Any]) -> str | None:
    """Why a new block cannot be added on top of a path's model, or None when it can.

    The "add:block" mutation grows depth function-preservingly (`growth.expand`'s
    identity block); `growth.rules` refuses that for post-norm models (a post-norm block
    with zero branches still normalises again, so it is not the identity).

    Args:
      architecture: a path's stored architecture (an empty one allows growth: the
        materialisation checks again).

    Returns:
      The refusal reason, or None.
    """
    fields = architecture.get("config") or {}
    if "norm_placement" not in fields:
        return None
    traits = growth_rules.Traits(
        norm=str(fields.get("norm", "layernorm")),
        placement=str(fields["norm_placement"]),
        attention_scaling=str(fields.get("attention_scaling", "runtime")),
    )
    try:
        growth_rules.choose("add_layer", traits)
    except growth_rules.GrowthError as error:
        return str(error)
    return None
