"""A path's image size: `ViTConfig.resolution`, the shared position table resampled as
big_vision does, the child's architecture and a search whose paths run at another size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from search_testlib import AGENT, DATA, _task_data_of
from search_testlib import SEARCH as BASE_SEARCH
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.agents import agent_view
from evolution.roots import seeding
from evolution.search import iteration
from evolution.search import loop as search
from evolution.search.paths import candidate as cand
from evolution.search.space import hparams as hp
from evolution.search.space import mutations as mut
from evolution.store import sqlite as sqlite_store
from evolution.system import architecture as arch_lib
from evolution.system import families
from evolution.system import state as system
from models import vit
from models.pretrained import vit_checkpoints


def _images(seed=0, rows=4):
    return (
        np.random.default_rng(seed).uniform(0, 1, (rows, *TINY_VIT.image_shape)).astype(np.float32)
    )


@pytest.mark.parametrize("grid", [1, 2, 3, 5, 6, 12])
@pytest.mark.parametrize("prefix", [0, 1])
def test_resample_grid_is_big_visions_resample_posemb(grid, prefix):
    table = np.random.default_rng(grid).normal(size=(prefix + 16, 6)).astype(np.float32)
    ours = vit.resample_grid(jnp.asarray(table), (grid, grid), prefix)
    theirs = vit_checkpoints.resample_posemb(table, grid, prefix)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    np.testing.assert_array_equal(ours[:prefix], table[:prefix])  # the class token's row


def test_resampling_to_the_native_grid_is_the_identity():
    table = jnp.asarray(np.random.default_rng(0).normal(size=(17, 6)), jnp.float32)
    assert vit.resample_grid(table, (4, 4), 1) is table
    params = random_params()
    at_native = dataclasses.replace(TINY_VIT, resolution=TINY_VIT.image_shape[0])
    images = _images()
    np.testing.assert_array_equal(
        vit.ViT(at_native).apply({"params": params}, images),
        vit.ViT(TINY_VIT).apply({"params": params}, images),
    )


def test_another_resolution_keeps_every_parameter_shape():
    native = jax.eval_shape(vit.ViT(TINY_VIT).init, jax.random.PRNGKey(0), _images())
    for resolution in (4, 12, 16):
        config = dataclasses.replace(TINY_VIT, resolution=resolution)
        assert config.grid == (resolution // 4, resolution // 4)
        shapes = jax.eval_shape(vit.ViT(config).init, jax.random.PRNGKey(0), _images())
        assert jax.tree_util.tree_map(lambda s: s.shape, shapes) == jax.tree_util.tree_map(
            lambda s: s.shape, native
        )
    params = random_params()
    at_12 = dataclasses.replace(TINY_VIT, resolution=12)
    features_12 = vit.ViT(at_12).apply({"params": params}, _images(), return_prelogits=True)
    features_8 = vit.ViT(TINY_VIT).apply({"params": params}, _images(), return_prelogits=True)
    assert features_12.shape == features_8.shape and not np.allclose(features_12, features_8)


def test_a_resized_image_is_the_model_input_at_that_size():
    # The model at resolution 16 on 8x8 images equals a native-16 model (position table
    # resampled by hand) on the images resized as tf.image.resize does.
    params = random_params()
    config = dataclasses.replace(TINY_VIT, resolution=16)
    big = dataclasses.replace(TINY_VIT, image_shape=(16, 16, 1))
    big_params = dict(params)
    table = vit_checkpoints.resample_posemb(params["pos"]["embedding"], 4, 1)
    big_params["pos"] = {"embedding": table}
    images = _images()
    resized = jax.image.resize(images, (4, 16, 16, 1), "bilinear", antialias=False)
    np.testing.assert_allclose(
        vit.ViT(config).apply({"params": params}, images),
        vit.ViT(big).apply({"params": big_params}, resized),
        atol=1e-5,
    )


def test_bad_resolutions_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        dataclasses.replace(TINY_VIT, resolution=10)
    with pytest.raises(ValueError, match="square"):
        dataclasses.replace(TINY_VIT, image_shape=(8, 12, 1), resolution=8)


def test_architectures_keep_their_old_form_and_meaning():
    stored = families.architecture_of(TINY_VIT)
    assert "resolution" not in stored["config"]  # written as before the field existed
    assert families.config_from_architecture(stored).resolution is None
    at_12 = families.architecture_of(dataclasses.replace(TINY_VIT, resolution=12))
    assert at_12["config"]["resolution"] == 12
    assert families.config_from_architecture(at_12).resolution == 12


def test_default_space_searches_image_sizes_around_the_root():
    space = iteration.default_search_space(TINY_VIT, image_size_steps=1)
    assert space["image_size"].values == (4, 8, 12)
    assert space.values(space.defaults())["image_size"] == 8
    assert iteration.default_search_space(TINY_VIT, 0)["image_size"].values == (8,)
    with pytest.raises(ValueError, match="multiples"):
        iteration.check_space(
            hp.HParamSpace(
                tuple(
                    hp.HParam("image_size", (8, 10), 0, True) if h.name == "image_size" else h
                    for h in space.hparams
                )
            ),
            TINY_VIT,
        )


def _space_at(size):
    """The default space with the image size pinned to `size` (a data hyperparameter)."""
    base = iteration.default_search_space(TINY_VIT, image_size_steps=2)
    return hp.HParamSpace(
        tuple(
            hp.HParam("image_size", (size,), 0, True) if h.name == "image_size" else h
            for h in base.hparams
        )
    )


def test_child_architecture_and_config_carry_its_image_size():
    params = random_params()
    root_pairs = tuple((slot, f"root:{slot}") for slot in vit.component_slots(TINY_VIT))
    pool = {cid: params[slot] for slot, cid in root_pairs}
    components = {
        cid: system.Component(
            cid, mut.slot_kind(slot), system.num_params_of(pool[cid]), "root", "root"
        )
        for slot, cid in root_pairs
    }
    root = system.Path(
        id="root",
        task="root",
        components=root_pairs,
        agent="root",
        architecture=arch_lib.architecture_of(TINY_VIT),
    )
    tasks = {n: system.TaskRecord(n, 4, i) for i, n in enumerate(["root", "t"])}
    state = system.SystemState(components, {"root": root}, tasks, "root")
    parent = root
    for size, expected in ((12, 12), (16, 16), (8, None)):
        space = _space_at(size)
        data, _ = hp.generation_data(space.defaults(), np.random.default_rng(0), space=space)
        plan = mut.plan_child(
            state,
            parent,
            task="t",
            agent="a",
            rng=np.random.default_rng(size),
            space=space,
            data=data,
        )
        assert plan.path.architecture["config"].get("resolution") == expected
        config, _ = mut.materialize(plan, pool, arch_lib.model_config_of(parent), num_classes=4)
        assert config.resolution == expected
        assert arch_lib.model_config_of(plan.path) == config


@pytest.mark.slow
def test_a_search_at_another_image_size_trains_and_shares_the_position_table(tmp_path):
    store = sqlite_store.SqliteStore(str(tmp_path / "store"))
    root_params = random_params()
    seeding.seed_root(store, TINY_VIT, root_params, agent="root")
    settings = dataclasses.replace(BASE_SEARCH, generations=1, space=_space_at(12))
    data = _task_data_of("tex_a")
    result = search.evolve_task(
        store,
        "tex_a",
        settings,
        train_batches_fn=data.train_batches_fn,
        validation_batches=data.validation_batches,
        agent=AGENT,
        cache=cand.StepCache(),
    )
    state = store.load_state()
    agent_view.check_state(state)  # a path at its own resolution is no foreign path
    best = state.paths[result.best_path.id]
    config = arch_lib.model_config_of(best)
    assert config.resolution == 12 and config.grid == (3, 3)
    # The root's position table is shared (pos is not cloned by default) and unchanged.
    pos_id = dict(best.components)["pos"]
    assert pos_id == dict(state.paths[state.root_path_id].components)["pos"]
    np.testing.assert_array_equal(
        store.load_params(pos_id)["embedding"], root_params["pos"]["embedding"]
    )
    # The published path reproduces its recorded quality at its resolution, and not at
    # the images' own (the resolution is part of what was published).
    params = {slot: store.load_params(cid) for slot, cid in best.components}
    batches = data.validation_batches
    quality = cand.validate(config, tuple(params), params, batches, cache=cand.StepCache())
    assert quality == result.quality == best.quality
    assert len(DATA["tex_a"]["validation"][0]) == 64
