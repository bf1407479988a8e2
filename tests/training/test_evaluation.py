"""ClassificationEvaluator: seqio.Evaluator's interface over rank-0 labels (no t5x needed)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from training import evaluation, partitioning
from training.evaluation import ClassificationEvaluator

TASK = "t5x_evaluator_test_task"
NUM_EXAMPLES = 10
LABELS = (np.arange(NUM_EXAMPLES) % 3).astype(np.int32)
Spec = seqio.FeatureConverter.FeatureSpec


class PassThroughConverter(seqio.FeatureConverter):
    TASK_FEATURES = {
        "image": Spec(dtype=tf.float32, rank=3),
        "label": Spec(dtype=tf.int32, rank=0),
    }
    MODEL_FEATURES = TASK_FEATURES
    PACKING_FEATURE_DTYPES = None

    def _convert_features(self, ds, task_feature_lengths):
        return ds

    def get_model_feature_lengths(self, task_feature_lengths):
        return dict(task_feature_lengths)


def _source(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    images = np.arange(NUM_EXAMPLES * 4 * 3, dtype=np.float32).reshape(NUM_EXAMPLES, 4, 3, 1)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": LABELS})


@pytest.fixture(scope="module")
def task():
    feature = lambda dtype, rank: seqio.Feature(
        seqio.PassThroughVocabulary(0), dtype=dtype, rank=rank
    )
    seqio.TaskRegistry.add(
        TASK,
        source=seqio.FunctionDataSource(_source, splits=["validation"]),
        preprocessors=[],
        output_features={"image": feature(tf.float32, 3), "label": feature(tf.int32, 0)},
    )
    yield TASK
    seqio.TaskRegistry.remove(TASK)


def _infer_fn(output_of_example, shuffle=True):
    """Mimics t5x's infer_fn: (index, output) pairs, in any order."""

    def infer(ds):
        pairs = [(int(i), output_of_example(ex)) for i, ex in ds.as_numpy_iterator()]
        return pairs[::-1] if shuffle else pairs

    return infer


@pytest.mark.parametrize("lengths", [{"image": 4, "label": None}, None])
def test_accuracy_and_log_likelihood(task, tmp_path, lengths):
    evaluator = ClassificationEvaluator(
        task,
        PassThroughConverter(pack=False),
        eval_split="validation",
        sequence_length=lengths,
        log_dir=str(tmp_path),
    )
    assert [t.name for t in evaluator.eval_tasks] == [TASK]
    assert evaluator.model_feature_shapes == {"image": (4, 3, 1), "label": ()}
    # Predict the true label for the first half of the examples, class 2 elsewhere.
    predict = _infer_fn(lambda ex: ex["label"] if ex["image"][0, 0, 0] < 60 else 2)
    score = _infer_fn(lambda ex: -float(ex["label"]))
    future, outputs = evaluator.evaluate(
        compute_metrics=True, step=7, predict_fn=predict, score_fn=score
    )
    metrics = future.result()[TASK]
    predictions = np.where(np.arange(NUM_EXAMPLES) < 5, LABELS, 2)
    np.testing.assert_array_equal(outputs[TASK]["predictions"], predictions)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == LABELS))
    assert metrics["log_likelihood"] == pytest.approx(-np.mean(LABELS))
    assert metrics["num_examples"] == NUM_EXAMPLES
    logged = json.loads((tmp_path / f"{TASK}-metrics.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 7 and logged["accuracy"] == metrics["accuracy"]
    assert list((tmp_path / TASK).glob("events.out.tfevents*")), "no TensorBoard summary"


def test_no_metrics_when_not_asked(task):
    evaluator = ClassificationEvaluator(task, PassThroughConverter(pack=False), logger_cls=())
    future, outputs = evaluator.evaluate(
        compute_metrics=False, predict_fn=_infer_fn(lambda ex: ex["label"])
    )
    assert future.result() is None
    np.testing.assert_array_equal(outputs[TASK]["predictions"], LABELS)


class _PackingConverter(PassThroughConverter):
    PACKING_FEATURE_DTYPES = {}


def test_packing_is_refused(task):
    with pytest.raises(ValueError, match="packing"):
        ClassificationEvaluator(task, _PackingConverter(pack=True))


class _SumModel:
    """predict_batch: whether an image's sum passes a threshold; score_batch: the sum."""

    def predict_batch(self, params, batch):
        return (batch["image"].sum(axis=(1, 2, 3)) > params["threshold"]).astype(jnp.int32)

    def score_batch(self, params, batch):
        return batch["image"].sum(axis=(1, 2, 3)) - params["threshold"]


def test_partitioned_inference_covers_every_example_once(task):
    # 8 devices, batches of 8: the last of the two batches is padded with masked rows.
    partitioner = partitioning.Partitioner()
    params = {"threshold": jnp.float32(500.0)}
    shardings = {"threshold": partitioner.replicated}
    inference = evaluation.PartitionedInference(_SumModel(), partitioner, shardings, 8)
    evaluator = ClassificationEvaluator(task, PassThroughConverter(pack=False), logger_cls=())
    future, outputs = evaluator.evaluate(
        compute_metrics=True,
        predict_fn=inference.predict_fn(params),
        score_fn=inference.score_fn(params),
    )
    sums = np.arange(NUM_EXAMPLES * 12, dtype=np.float32).reshape(NUM_EXAMPLES, 12).sum(axis=1)
    np.testing.assert_array_equal(outputs[TASK]["predictions"], sums > 500)
    np.testing.assert_allclose(outputs[TASK]["scores"], sums - 500)
    expected = np.mean((sums > 500).astype(np.int32) == LABELS)
    assert future.result()[TASK]["accuracy"] == pytest.approx(expected)
    records = evaluator.records(TASK, outputs[TASK])
    assert [r["index"] for r in records] == list(range(NUM_EXAMPLES))
    assert records[3] == {
        "index": 3,
        "label": int(LABELS[3]),
        "prediction": int(sums[3] > 500),
        "score": pytest.approx(float(sums[3] - 500)),
    }
