"""A tiny test-local task and model with the t5x contract, for the trainer's tests.

Registers the seqio task `trainer_toy_v1` (8x8x1 images of 4 classes, made from a fixed
numpy seed) and defines `ToyClassifier`, an MLP classifier whose params carry logical axis
names, so the trainer can be tested without tasks/ or models/.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tensorflow as tf
from clu import metrics as clu_metrics

from training import checkpoints

TOY_TASK = "trainer_toy_v1"
TOY_RULES = (("batch", "data"), ("embed", None), ("mlp", "model"), ("classes", None))
_SIZES = {"train": 512, "validation": 96, "test": 100}


@functools.cache
def _toy_arrays(split: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[split])
    labels = rng.integers(0, 4, size=_SIZES[split]).astype(np.int32)
    prototypes = np.random.default_rng(123).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    noise = rng.normal(scale=0.3, size=(_SIZES[split], 8, 8, 1)).astype(np.float32)
    return {"image": prototypes[labels] + noise, "label": labels}


def _toy_dataset(split: str, shuffle_files: bool = False, seed: int | None = None):
    del shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(_toy_arrays(split))


class ImageFeatureConverter(seqio.FeatureConverter):
    """Passes `image` (float32 rank 3) and `label` (int32 scalar) through unchanged."""

    TASK_FEATURES = {
        "image": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=3),
        "label": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
    }
    MODEL_FEATURES = TASK_FEATURES
    PACKING_FEATURE_DTYPES = None

    def __call__(self, ds, task_feature_lengths):
        # Fixed-shape features need no lengths; skip seqio's length validation.
        return self._convert_features(ds, task_feature_lengths)

    def _convert_features(self, ds, task_feature_lengths):
        del task_feature_lengths
        return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})

    def get_model_feature_lengths(self, task_feature_lengths):
        return {}


def register_toy_task() -> None:
    """Registers `trainer_toy_v1` once."""
    if TOY_TASK in seqio.TaskRegistry.names():
        return
    seqio.TaskRegistry.add(
        TOY_TASK,
        source=seqio.FunctionDataSource(
            _toy_dataset, splits=tuple(_SIZES), num_input_examples=dict(_SIZES)
        ),
        output_features={
            "image": seqio.Feature(seqio.PassThroughVocabulary(0), dtype=tf.float32, rank=3),
            "label": seqio.Feature(seqio.PassThroughVocabulary(0), dtype=tf.int32, rank=0),
        },
        preprocessors=[],
        metric_fns=[],
    )


register_toy_task()


@checkpoints.register_architecture_config
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy MLP (recorded in checkpoints as the architecture)."""

    hidden: int = 32
    num_classes: int = 4
    dropout: float = 0.1


class ToyMLP(nn.Module):
    """Flatten -> Dense(mlp) -> gelu -> dropout -> Dense(classes)."""

    config: ToyConfig = ToyConfig()

    @nn.compact
    def __call__(self, image, train: bool = False):
        cfg = self.config
        x = image.reshape(image.shape[0], -1)
        x = nn.Dense(
            cfg.hidden,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        x = nn.with_logical_constraint(nn.gelu(x), ("batch", "mlp"))
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        return nn.Dense(
            cfg.num_classes,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
        )(x)


class ToyClassifier:
    """t5x-contract wrapper of `ToyMLP` (loss_fn, predict_batch, score_batch, init)."""

    FEATURE_CONVERTER_CLS = ImageFeatureConverter

    def __init__(self, module=None, optimizer_def=None):
        self.module = module or ToyMLP()
        self.optimizer_def = optimizer_def or optax.adamw(3e-3)

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        image = jnp.zeros(input_shapes["image"], jnp.float32)
        return self.module.init({"params": rng}, image)

    def _logits(self, params, batch, dropout_rng=None):
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params}, batch["image"], train=dropout_rng is not None, rngs=rngs
        )

    def loss_fn(self, params, batch, dropout_rng):
        logits = self._logits(params, batch, dropout_rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        loss = losses.mean()
        metrics = {
            "loss": clu_metrics.Average.from_model_output(losses),
            "accuracy": clu_metrics.Accuracy.from_model_output(
                logits=logits, labels=batch["label"]
            ),
        }
        return loss, metrics

    def predict_batch(self, params, batch, rng=None):
        return jnp.argmax(self._logits(params, batch), axis=-1)

    def score_batch(self, params, batch, return_intermediates=False):
        logits = self._logits(params, batch)
        return -optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def toy_rules():
    """Returns the toy model's logical axis rules (for gin: `@trainer_testlib.toy_rules()`)."""
    return TOY_RULES


def toy_inputs(batch_size: int):
    """Returns (input_shapes, input_types) of the toy task at `batch_size`."""
    return (
        {"image": (batch_size, 8, 8, 1), "label": (batch_size,)},
        {"image": jnp.float32, "label": jnp.int32},
    )


def params_close(a, b, atol=1e-5) -> bool:
    """True when two param trees are equal within `atol`."""
    return all(
        np.allclose(np.asarray(x), np.asarray(y), atol=atol)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
