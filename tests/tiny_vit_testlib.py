"""The tiny ViT shared by the evolution tests (8x8x1 inputs, 4 classes, one block), and a
store path of it with random parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evolution.search.space import mutations
from evolution.system import architecture
from evolution.system import state as system
from models import vit

TINY_VIT = vit.ViTConfig(
    hidden=16,
    mlp_dim=32,
    num_heads=2,
    qk_dim=8,
    v_dim=8,
    num_layers=1,
    image_shape=(8, 8, 1),
    patch_size=4,
    num_classes=4,
)


def random_params(seed: int = 0) -> dict:
    """Root parameters of `TINY_VIT` drawn with numpy (compiling the PRNG-based init takes
    seconds on CPU): norms at scale 1 and bias 0, the head at zero (as `head_zero_init`),
    the rest N(0, 0.2)."""
    shapes = jax.eval_shape(vit.ViT(TINY_VIT).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(seed)

    def draw(key_path, leaf):
        name = jax.tree_util.keystr(key_path)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name or "head" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        return rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def publish_random_path(store, task: str, seed: int, score: float) -> system.Path:
    """Publishes, as agent "single", a `TINY_VIT` path of `task` with its own random
    components (`random_params(seed)` and a random head); returns the path."""
    params = random_params(seed)
    rng = np.random.default_rng(seed)
    params["head"] = jax.tree_util.tree_map(
        lambda x: rng.normal(0.0, 0.5, np.shape(x)).astype(np.float32), params["head"]
    )
    store.add_task(task, num_classes=TINY_VIT.num_classes)
    components = []
    for slot in vit.component_slots(TINY_VIT):
        component = system.Component(
            id=f"{task}.{slot}",
            kind=mutations.slot_kind(slot),
            num_params=system.num_params_of(params[slot]),
            agent="single",
            task=task,
        )
        store.put_component(component, params[slot])
        components.append((slot, component.id))
    path = system.Path(
        id=f"{task}.path",
        task=task,
        components=tuple(components),
        agent="single",
        score=score,
        quality=score,
        architecture=architecture.architecture_of(TINY_VIT),
    )
    store.publish("single", paths=[path], components=[cid for _, cid in components])
    return path
