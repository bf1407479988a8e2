"""seqio output features of the task families (docs/architecture.md fixes them)."""

from __future__ import annotations

import seqio
import tensorflow as tf

from tasks.vocabularies import BYTE_VOCABULARY, MINILM_VOCABULARY

_NO_VOCAB = seqio.PassThroughVocabulary(0)

LABEL = seqio.Feature(_NO_VOCAB, add_eos=False, dtype=tf.int32, rank=0)
TASK_ID = seqio.Feature(_NO_VOCAB, add_eos=False, dtype=tf.int32, rank=0)

IMAGE_FEATURES = {
    "image": seqio.Feature(_NO_VOCAB, add_eos=False, dtype=tf.float32, rank=3),
    "label": LABEL,
}
TEXT_FEATURES = {
    "inputs": seqio.Feature(MINILM_VOCABULARY, add_eos=False, dtype=tf.int32, rank=1),
    "label": LABEL,
}
LM_FEATURES = {
    "targets": seqio.Feature(BYTE_VOCABULARY, add_eos=True, dtype=tf.int32, rank=1),
}


def with_task_id(features: dict) -> dict:
    """Returns `features` plus the int32 scalar `task_id` of multitask mixtures."""
    return {**features, "task_id": TASK_ID}
