"""Multipath agents: the router's initial weights, the initial output (path_0's classes),
the stop-gradient mixture's gradients, companions, and a short training run over frozen
published paths that never lowers path_0's quality and never touches the store.

Three tiny 4-class texture tasks on 8x8x1 images; each task's published path is a tiny
ViT (hidden 16, one block) with its own random body and a random head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_vit_testlib import TINY_VIT, publish_random_path, random_params

from evolution.agents import multipath
from evolution.roots import seeding
from evolution.search.data import batches
from evolution.search.paths import candidate
from evolution.store import sqlite as sqlite_store

TASKS = ("tex_a", "tex_b", "tex_c")
C = TINY_VIT.num_classes
D = TINY_VIT.hidden


def _task_data(task_index):
    """Stripes / checks / diagonal 4x4 textures tiled to 8x8 plus noise (B permutes the
    labels, C is coarser)."""
    rows, cols = np.mgrid[0:4, 0:4]
    if task_index == 2:
        rows, cols = rows // 2, cols // 2
    textures = np.stack([rows % 2, cols % 2, (rows + cols) % 2, (rows == cols)]).astype(np.float32)
    if task_index == 1:
        textures = textures[[2, 0, 3, 1]]
    rng = np.random.default_rng(100 + task_index)
    out = {}
    for split, count in (("train", 128), ("validation", 64)):
        labels = rng.integers(0, 4, count).astype(np.int32)
        images = np.tile(textures[labels], (1, 2, 2)) + rng.normal(0.0, 0.3, (count, 8, 8))
        out[split] = (images.astype(np.float32)[..., None], labels)
    return out


DATA = {name: _task_data(i) for i, name in enumerate(TASKS)}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store = sqlite_store.SqliteStore(str(tmp_path_factory.mktemp("multipath") / "store"))
    seeding.seed_root(store, TINY_VIT, random_params(99), agent="root")
    for index, task in enumerate(TASKS):
        publish_random_path(store, task, seed=index + 1, score=0.5 - 0.1 * index)
    yield store
    store.close()


def _random_inputs(seed=0, batch=5, num_features=2):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 2, (batch, C)), jnp.float32)
    features = [jnp.asarray(rng.normal(0, 1, (batch, D)), jnp.float32) for _ in range(num_features)]
    return logits, features


@pytest.mark.parametrize("num_paths", [2, 3])
def test_router_starts_at_main_weight(num_paths):
    logits, _ = _random_inputs()
    r = multipath.router_weights(multipath.init_router(C, num_paths), logits)
    rest = 0.2 / (num_paths - 1)
    np.testing.assert_allclose(r, np.tile([0.8] + [rest] * (num_paths - 1), (5, 1)), rtol=1e-6)


def test_initial_output_is_path0_scaled_by_w0():
    logits, features = _random_inputs()
    router = multipath.init_router(C, 3)
    connectors = [multipath.init_connector(D, C) for _ in features]
    y, r = multipath.multipath_logits(router, connectors, logits, features)
    # Zero connectors: y = r_0 * z_0 (the mixture's value), so path_0's classes exactly.
    np.testing.assert_allclose(y, r[:, :1] * logits, rtol=1e-6)
    np.testing.assert_allclose(y, 0.8 * logits, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(y, -1), np.argmax(logits, -1))


def _nonzero_params(seed=1):
    rng = np.random.default_rng(seed)
    router = multipath.init_router(C, 3)
    router["dense"]["kernel"] = rng.normal(0, 1, (C, 3)).astype(np.float32)
    connectors = [
        {"kernel": rng.normal(0, 1, (D, C)).astype(np.float32), "bias": np.ones(C, np.float32)}
        for _ in range(2)
    ]
    return router, connectors


def test_connectors_get_the_unweighted_gradient():
    logits, features = _random_inputs()
    router, connectors = _nonzero_params()
    cotangent = jnp.asarray(np.random.default_rng(2).normal(0, 1, (5, C)), jnp.float32)

    def y_of(conns):
        return multipath.multipath_logits(router, conns, logits, features)[0]

    def sum_of(conns):
        return logits + sum(
            multipath.connector_logits(c, f) for c, f in zip(conns, features, strict=True)
        )

    y, vjp_y = jax.vjp(y_of, connectors)
    _, vjp_sum = jax.vjp(sum_of, connectors)
    (grad_y,) = vjp_y(cotangent)
    (grad_sum,) = vjp_sum(cotangent)
    for a, b in zip(
        jax.tree_util.tree_leaves(grad_y), jax.tree_util.tree_leaves(grad_sum), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # The value is the mixture, not the sum.
    r = multipath.router_weights(router, logits)
    zs = [logits] + [
        multipath.connector_logits(c, f) for c, f in zip(connectors, features, strict=True)
    ]
    np.testing.assert_allclose(
        y, sum(r[:, p, None] * z for p, z in enumerate(zs)), rtol=1e-5, atol=1e-6
    )


def test_router_gradient_is_scaled_by_m_and_only_through_r():
    logits, features = _random_inputs()
    router, connectors = _nonzero_params()
    cotangent = jnp.asarray(np.random.default_rng(3).normal(0, 1, (5, C)), jnp.float32)

    def loss(router_params, scale):
        y, _ = multipath.multipath_logits(
            router_params, connectors, logits, features, gradient_scale=scale
        )
        return jnp.sum(y * cotangent)

    def mixture_loss(router_params):
        r = multipath.router_weights(router_params, logits, gradient_scale=1.0)
        zs = [logits] + [
            multipath.connector_logits(c, f) for c, f in zip(connectors, features, strict=True)
        ]
        return jnp.sum(sum(r[:, p, None] * z for p, z in enumerate(zs)) * cotangent)

    np.testing.assert_allclose(loss(router, 0.05), loss(router, 1.0), rtol=1e-6)
    scaled = jax.grad(loss)(router, 0.05)
    unscaled = jax.grad(loss)(router, 1.0)
    through_r = jax.grad(mixture_loss)(router)
    kernel = unscaled["dense"]["kernel"]
    assert np.abs(kernel).max() > 1e-3
    for a, b, c in zip(
        *(jax.tree_util.tree_leaves(t) for t in (scaled, unscaled, through_r)), strict=True
    ):
        np.testing.assert_allclose(a, 0.05 * b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-7)


def test_path_features_are_the_heads_prelogits(world):
    path = world.load_state().best_path("tex_a")
    params = {slot: world.load_params(cid) for slot, cid in path.components}
    slots = [slot for slot, _ in path.components]
    images = jnp.asarray(DATA["tex_a"]["validation"][0][:8])
    features = multipath.path_features(TINY_VIT, slots, params, images)
    head = params["head"]["dense"]
    logits = features @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(
        logits, candidate.forward(TINY_VIT, slots, params, images), rtol=1e-5, atol=1e-5
    )


def test_choose_companions(world):
    state = world.load_state()
    companions = multipath.choose_companions(state, "tex_c", 3)
    assert [p.id for p in companions] == ["tex_a.path", "tex_b.path"]  # by score
    companions = multipath.choose_companions(state, "tex_a", 2)
    assert [p.id for p in companions] == ["tex_b.path"]
    with pytest.raises(ValueError):
        multipath.choose_companions(state, "tex_a", 4)


def _params_of(store, paths):
    return {cid: store.load_params(cid) for p in paths for cid in p.component_ids}


@pytest.mark.parametrize(("task", "num_paths"), [("tex_a", 3), ("tex_b", 2)])
def test_train_multipath_keeps_path0_quality_and_the_store(world, task, num_paths):
    state = world.load_state()
    main = state.best_path(task)
    others = multipath.choose_companions(state, task, num_paths)
    before = _params_of(world, [main, *others])
    train = batches.array_train_batches(*DATA[task]["train"])({}, batch_size=16, seed=0)
    result = multipath.train_multipath(
        store=world,
        task=task,
        main_path=main,
        other_paths=others,
        train_batches=train,
        validation_batches=batches.array_eval_batches(*DATA[task]["validation"], 32),
        steps=20,
        steps_per_validation=10,
    )
    # Step 0 is path_0 (its classes exactly); the best validation never goes below it.
    assert result.validations[0] == (0, result.single_path_quality)
    assert result.quality >= result.single_path_quality
    assert result.quality == max(q for _, q in result.validations)
    assert len(result.router_mean_weights) == num_paths
    if result.best_step == 0:
        np.testing.assert_allclose(result.router_mean_weights[0], 0.8, rtol=1e-5)
    expected = 2 * C + C * num_paths + num_paths + (num_paths - 1) * (D * C + C)
    assert result.trainable_params == expected
    assert result.report()["num_paths"] == num_paths
    # The frozen paths' parameters and the published state are untouched.
    after = _params_of(world, [main, *others])
    for cid, tree in before.items():
        for a, b in zip(
            jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(after[cid]), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert world.load_state() == state
