"""Candidate training: frozen components untouched, optimizer memory only for trainable ones,
learning on a separable toy problem, best-validation parameters, compiled-step reuse,
determinism and mu2Net+ optimizer-state inheritance."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.search.paths import candidate as cand
from evolution.search.space import hparams as hp
from models import adapters, vit

CONFIG = TINY_VIT
SLOTS = tuple(vit.component_slots(CONFIG))
BATCH = 16
VALUES = {"lr": 0.1, "schedule": "cosine", "warmup": 0.1, "momentum": 0.9, "nesterov": False}


def _patterns():
    """Four 4x4 textures: horizontal stripes, vertical stripes, checkerboard, diagonal."""
    rows, cols = np.mgrid[0:4, 0:4]
    return np.stack([rows % 2, cols % 2, (rows + cols) % 2, (rows == cols)]).astype(np.float32)


def _images(rng, labels):
    """Class k tiles texture k over an 8x8x1 image (every patch shows it), plus noise."""
    tiles = np.tile(_patterns()[labels], (1, 2, 2))
    noise = rng.normal(0.0, 0.3, (len(labels), 8, 8))
    return (tiles + noise).astype(np.float32)[..., None]


def _train_stream(seed):
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, 4, BATCH).astype(np.int32)
        yield {"image": _images(rng, labels), "label": labels}


def _validation(seed=123, rows=40):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, rows).astype(np.int32)
    images = _images(rng, labels)
    # A padded last batch, as training.data.get_eval_batches makes them.
    batches = []
    for start in range(0, rows, BATCH):
        chunk = slice(start, start + BATCH)
        real = len(labels[chunk])
        pad = BATCH - real
        batches.append(
            {
                "image": np.concatenate([images[chunk], np.zeros((pad, 8, 8, 1), np.float32)]),
                "label": np.concatenate([labels[chunk], np.zeros(pad, np.int32)]),
                "_mask": np.concatenate([np.ones(real, np.int32), np.zeros(pad, np.int32)]),
            }
        )
    return batches


def _root_pool(seed=0, prefix="root"):
    """Random root parameters (`tiny_vit_testlib.random_params`) keyed `<prefix>:<slot>`."""
    host = random_params(seed)
    return {f"{prefix}:{slot}": host[slot] for slot in SLOTS}


def _child(pool, cloned_slots, tag):
    """A child path of the root that clones `cloned_slots` into ids `<tag>:<slot>`."""
    components, new_pool, sources = [], dict(pool), {}
    for slot in SLOTS:
        if slot in cloned_slots:
            cid = f"{tag}:{slot}"
            new_pool[cid] = jax.tree_util.tree_map(np.copy, pool[f"root:{slot}"])
            sources[cid] = f"root:{slot}"
        else:
            cid = f"root:{slot}"
        components.append((slot, cid))
    return tuple(components), new_pool, sources


def _train(pool, components, trainable, *, cache, values=VALUES, v=3, b=20, seed=0, **kwargs):
    return cand.train_candidate(
        config=CONFIG,
        components=components,
        pool=pool,
        trainable_ids=trainable,
        hparam_values=values,
        train_batches=_train_stream(seed),
        validation_batches=_validation(),
        num_validations=v,
        steps_per_validation=b,
        cache=cache,
        **kwargs,
    )


@pytest.fixture(scope="module")
def cache():
    return cand.StepCache()


@pytest.fixture(scope="module")
def trained(cache):
    root = _root_pool()
    frozen_copy = jax.tree_util.tree_map(np.copy, root)
    cloned = ("block_0", "final_norm", "head")
    components, pool, sources = _child(root, cloned, "c1")
    result = _train(pool, components, sources.keys(), cache=cache)
    return dict(
        root=root,
        frozen_copy=frozen_copy,
        pool=pool,
        components=components,
        sources=sources,
        result=result,
    )


def _leaves_and_bytes(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return len(leaves), sum(np.asarray(x).nbytes for x in leaves)


def test_masked_optimizer_keeps_no_memory_for_frozen_leaves():
    params = {
        "frozen": {"w": jnp.ones((64, 64)), "b": jnp.ones(64)},
        "train": {"w": jnp.ones((4, 3)), "b": jnp.ones(3)},
    }
    mask = {"frozen": {"w": False, "b": False}, "train": {"w": True, "b": True}}
    tx = cand.make_optimizer(VALUES, 10, mask)
    state = tx.init(params)
    traces = [
        s.trace
        for s in jax.tree_util.tree_leaves(
            state, is_leaf=lambda node: isinstance(node, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    ]
    assert len(traces) == 1
    assert _leaves_and_bytes(traces[0]) == _leaves_and_bytes(params["train"])
    # Whole state: the trainable moments plus a few scalar counters, nothing 64x64.
    count, size = _leaves_and_bytes(state)
    assert size - _leaves_and_bytes(params["train"])[1] < 64
    assert count <= 2 + 4

    grads = jax.tree_util.tree_map(lambda x: 100.0 * jnp.ones_like(x), params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params_after = optax.apply_updates(params, updates)
        assert all(not np.any(u) for u in jax.tree_util.tree_leaves(updates["frozen"]))
    np.testing.assert_array_equal(params_after["frozen"]["w"], params["frozen"]["w"])
    # Clipping sees only the trainable gradients: norm 1 after clipping, lr schedule > 0.
    assert np.any(np.asarray(params_after["train"]["w"]) != 1.0)

    plain = cand.make_optimizer({**VALUES, "momentum": None}, 10, mask).init(params)
    assert _leaves_and_bytes(plain)[1] < 64  # no moments at all


def test_unmasked_optimizer_matches_hand_written_chain():
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.full((2, 3), 3.0)}
    values = {**VALUES, "nesterov": True}
    ours = cand.make_optimizer(values, 50)
    # mu3Net's get_optimizer: warmup from lr / 1000 over int(0.1 * 50) steps.
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.sgd(
            optax.warmup_cosine_decay_schedule(0.1 / 1000, 0.1, 5, 50),
            momentum=0.9,
            nesterov=True,
        ),
    )
    s1, s2 = ours.init(params), theirs.init(params)
    for _ in range(7):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = theirs.update(grads, s2, params)
        # optax's warmup is init + (peak - init) * t in float32, which cancels at t = 0:
        # the warmup's first values differ by ~2e-5 relative between peak 1 and peak lr.
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=5e-5)


def test_schedules():
    # mu3Net's get_optimizer: "constant" runs at half the learning rate without warmup,
    # warmups start at lr / 1000 and last int(warmup * steps) steps.
    constant = cand.make_schedule({"lr": 0.5, "schedule": "constant", "warmup": 0.2}, 10)
    np.testing.assert_allclose([constant(s) for s in (0, 1, 2, 5, 9)], [0.25] * 5)
    cosine = cand.make_schedule({"lr": 0.5, "schedule": "cosine", "warmup": 0.0}, 10)
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10)], [0.5, 0.25, 0.0], atol=1e-7)
    warm = cand.make_schedule({"lr": 0.5, "schedule": "cosine", "warmup": 0.29}, 10)
    np.testing.assert_allclose([warm(0), warm(1), warm(2)], [0.5e-3, 0.25025, 0.5], rtol=5e-5)
    restarts_warm = cand.make_schedule(
        {"lr": 0.5, "schedule": "restarts", "warmup": 0.29}, 30, cycle_steps=10
    )
    np.testing.assert_allclose([restarts_warm(10), restarts_warm(12)], [0.5e-3, 0.5], rtol=5e-5)
    restarts = cand.make_schedule(
        {"lr": 0.5, "schedule": "restarts", "warmup": 0.0}, 30, cycle_steps=10
    )
    for step in (0, 3, 7):
        np.testing.assert_allclose(restarts(step), restarts(step + 10), rtol=1e-6)
        np.testing.assert_allclose(restarts(step), cosine(step), rtol=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        cand.make_schedule({"lr": 0.1, "schedule": "linear"}, 10)
    # muNet's and mu2Net's warmups start at lr / 100 ("warmup_start"), for every warmup.
    muNet = {"lr": 0.5, "warmup": 0.29, "warmup_start": 0.01}
    warm = cand.make_schedule({**muNet, "schedule": "cosine"}, 10)
    np.testing.assert_allclose([warm(0), warm(2)], [0.5e-2, 0.5], rtol=5e-5)
    restarts_warm = cand.make_schedule({**muNet, "schedule": "restarts"}, 30, cycle_steps=10)
    np.testing.assert_allclose([restarts_warm(10), restarts_warm(12)], [0.5e-2, 0.5], rtol=5e-5)
    # The compiled step's optimizer takes it too.
    settings = cand.OptimizerSettings.from_values({**muNet, "schedule": "cosine"}, 10, 10)
    assert settings.warmup_start == 0.01
    with pytest.raises(ValueError, match="warmup_start=0.0 must be in"):
        cand.make_schedule({**muNet, "schedule": "cosine", "warmup_start": 0.0}, 10)


def test_default_space_values_build_an_optimizer():
    space = hp.default_space(patch_size=4, image_size=8, image_size_steps=1)
    tx = cand.make_optimizer(space.values(space.defaults()), 100)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


def test_frozen_components_are_bit_identical(trained):
    result, pool = trained["result"], trained["pool"]
    assert set(result.params) == set(trained["sources"])
    for cid, params in trained["frozen_copy"].items():
        for a, b in zip(
            jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(pool[cid]), strict=True
        ):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # The root path's function is unchanged.
    root = trained["root"]
    images = _validation()[0]["image"]
    logits = cand.forward(CONFIG, SLOTS, {s: root[f"root:{s}"] for s in SLOTS}, images)
    expected = vit.ViT(CONFIG).apply(
        {"params": {s: trained["frozen_copy"][f"root:{s}"] for s in SLOTS}}, images
    )
    np.testing.assert_array_equal(logits, expected)
    # The trainable clones did change.
    assert not np.array_equal(
        result.params["c1:head"]["dense"]["kernel"], pool["c1:head"]["dense"]["kernel"]
    )


def test_candidate_learns_the_separable_problem(trained):
    result = trained["result"]
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]
    assert result.quality >= 0.9
    assert result.train_seconds > 0 and result.eval_seconds > 0
    assert [step for step, _ in result.validations] == [20, 40, 60]


def test_returned_params_are_the_best_validation(trained, cache):
    result = trained["result"]
    qualities = [q for _, q in result.validations]
    assert result.quality == max(qualities)
    assert result.best_step == result.validations[qualities.index(max(qualities))][0]
    pool = {**trained["pool"], **result.params}
    params_by_slot = {slot: pool[cid] for slot, cid in trained["components"]}
    again = cand.validate(CONFIG, SLOTS, params_by_slot, _validation(), cache=cache)
    assert again == result.quality


def test_best_validation_is_kept_when_training_gets_worse(cache):
    # A learning rate far too large makes later validations worse than the first.
    root = _root_pool(seed=1)
    components, pool, sources = _child(root, ("block_0", "final_norm", "head"), "bad")
    values = {**VALUES, "lr": 0.2, "momentum": 0.99}
    result = _train(pool, components, sources.keys(), cache=cache, values=values)
    qualities = [q for _, q in result.validations]
    # (Pinned by the seeds: the first validation is the best, the last is worse.)
    assert qualities[-1] < qualities[0] == max(qualities)
    assert result.quality == qualities[0] and result.best_step == 20
    pool = {**pool, **result.params}
    params_by_slot = {slot: pool[cid] for slot, cid in components}
    assert cand.validate(CONFIG, SLOTS, params_by_slot, _validation(), cache=cache) == max(
        qualities
    )


def test_compiled_steps_are_reused_across_candidates(trained, cache):
    # The fixture compiled the step of (block_0, final_norm, head) with V=3, B=20.
    assert cache.train_signatures >= 1 and cache.eval_signatures >= 1
    before = (cache.train_signatures, cache.eval_signatures)
    root = _root_pool(seed=3)
    slots = ("block_0", "final_norm", "head")
    first, pool1, src1 = _child(root, slots, "a")
    second, pool2, src2 = _child(root, slots, "b")
    # Other ids, parameters, learning rate and momentum: the same executables.
    reused = _train(pool1, first, src1.keys(), cache=cache, values={**VALUES, "lr": 0.02})
    _train(pool2, second, src2.keys(), cache=cache, values={**VALUES, "momentum": 0.5})
    assert (cache.train_signatures, cache.eval_signatures) == before
    assert reused.compile_seconds == 0 and reused.train_seconds > 0
    # Another set of trainable slots is another signature (evaluation is shared).
    third, pool3, src3 = _child(root, ("final_norm", "head"), "c")
    result = _train(pool3, third, src3.keys(), cache=cache)
    assert (cache.train_signatures, cache.eval_signatures) == (before[0] + 1, before[1])
    assert result.compile_seconds > 0


def test_training_is_deterministic(trained, cache):
    again = _train(trained["pool"], trained["components"], trained["sources"].keys(), cache=cache)
    first = trained["result"]
    assert again.validations == first.validations
    assert again.train_losses == first.train_losses
    for a, b in zip(
        jax.tree_util.tree_leaves(first.params),
        jax.tree_util.tree_leaves(again.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_optimizer_state_is_keyed_by_component_id_and_inherited(trained, cache):
    parent = trained["result"]
    traces = [
        s.trace
        for s in jax.tree_util.tree_leaves(
            parent.opt_state, is_leaf=lambda node: isinstance(node, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    ]
    assert len(traces) == 1 and set(traces[0]) == set(parent.params)

    # A grandchild clones the parent's block and head and gets a fresh final norm.
    parent_pool = {**trained["pool"], **parent.params}
    components = []
    sources = {"g:block_0": "c1:block_0", "g:head": "c1:head"}
    child_pool = dict(parent_pool)
    for slot, cid in trained["components"]:
        new = f"g:{slot}" if cid in parent.params else cid
        if new != cid:
            child_pool[new] = parent_pool[cid]
        components.append((slot, new))
    child_ids = ("g:block_0", "g:final_norm", "g:head")

    fresh = cand.make_optimizer(VALUES, 4).init({cid: child_pool[cid] for cid in child_ids})
    inherited = cand.inherit_opt_state(
        fresh, parent.opt_state, sources, child_ids=child_ids, parent_ids=parent.params.keys()
    )
    trace = next(
        s.trace
        for s in jax.tree_util.tree_leaves(
            inherited, is_leaf=lambda node: isinstance(node, optax.TraceState)
        )
        if isinstance(s, optax.TraceState)
    )
    for child_id, parent_id in sources.items():
        for a, b in zip(
            jax.tree_util.tree_leaves(trace[child_id]),
            jax.tree_util.tree_leaves(traces[0][parent_id]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(trace["g:final_norm"]))
    # Momentum switched off in the child: nothing to inherit, the fresh state is kept.
    plain = cand.make_optimizer({**VALUES, "momentum": None}, 4).init(
        {cid: child_pool[cid] for cid in child_ids}
    )
    same = cand.inherit_opt_state(
        plain, parent.opt_state, sources, child_ids=child_ids, parent_ids=parent.params.keys()
    )
    assert jax.tree_util.tree_structure(same) == jax.tree_util.tree_structure(plain)

    # Through train_candidate: the inherited momentum changes the trajectory.
    kwargs = dict(cache=cache)
    with_state = _train(
        child_pool,
        tuple(components),
        child_ids,
        parent_opt_state=parent.opt_state,
        parent_trainable_ids=parent.params.keys(),
        clone_sources=sources,
        **kwargs,
    )
    without = _train(child_pool, tuple(components), child_ids, **kwargs)
    assert not np.array_equal(
        with_state.params["g:block_0"]["mlp"]["wi"]["kernel"],
        without.params["g:block_0"]["mlp"]["wi"]["kernel"],
    )


def test_adapter_slots_run_and_train(cache):
    root = _root_pool(seed=2)
    adapter = adapters.ResidualAdapter(CONFIG, 8)
    tokens = jnp.zeros((1, CONFIG.num_tokens, CONFIG.hidden))
    shapes = nn.unbox(jax.eval_shape(adapter.init, jax.random.PRNGKey(3), tokens))["params"]
    adapter_params = {
        "norm": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)},
        "down": {
            "kernel": np.random.default_rng(3).normal(0, 0.2, (16, 8)).astype(np.float32),
            "bias": np.zeros(8, np.float32),
        },
        "up": {"kernel": np.zeros((8, 16), np.float32), "bias": np.zeros(16, np.float32)},
    }
    assert jax.tree_util.tree_map(np.shape, adapter_params) == jax.tree_util.tree_map(
        np.shape, shapes
    )
    pool = {**root, "ad:adapter_0": adapter_params}
    components = []
    for slot in SLOTS:
        if slot == "block_0":
            components.append(("adapter_0", "ad:adapter_0"))
        components.append((slot, f"root:{slot}"))
    slots = tuple(slot for slot, _ in components)
    images = _validation()[0]["image"]
    # A fresh adapter is the identity: the path computes the root's function.
    with_adapter = cand.forward(CONFIG, slots, {s: pool[c] for s, c in components}, images)
    without = cand.forward(CONFIG, SLOTS, {s: root[f"root:{s}"] for s in SLOTS}, images)
    np.testing.assert_allclose(with_adapter, without, atol=1e-6)
    # The root's head starts at zero, so the adapter learns only with a trainable head.
    pool["ad:head"] = pool["root:head"]
    components = [(s, "ad:head" if s == "head" else c) for s, c in components]
    result = _train(pool, tuple(components), ["ad:adapter_0", "ad:head"], cache=cache)
    assert set(result.params) == {"ad:adapter_0", "ad:head"}
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(result.params["ad:adapter_0"]),
            jax.tree_util.tree_leaves(adapter_params),
            strict=True,
        )
    )


def test_bad_arguments_raise(trained, cache):
    with pytest.raises(ValueError, match="not in the path"):
        _train(trained["pool"], trained["components"], ["nope"], cache=cache, v=1, b=1)
    with pytest.raises(ValueError, match="must be >= 1"):
        _train(trained["pool"], trained["components"], [], cache=cache, v=0, b=1)
    with pytest.raises(ValueError, match="ran out"):
        cand.train_candidate(
            config=CONFIG,
            components=trained["components"],
            pool=trained["pool"],
            trainable_ids=trained["sources"].keys(),
            hparam_values=VALUES,
            train_batches=iter([]),
            validation_batches=_validation(),
            num_validations=1,
            steps_per_validation=1,
            cache=cache,
        )


def test_settings_from_values_are_hashable():
    settings = cand.OptimizerSettings.from_values(VALUES, 10, 5)
    assert hash(settings) == hash(dataclasses.replace(settings))
