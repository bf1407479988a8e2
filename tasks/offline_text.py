"""Registers the offline text tasks: classification (MiniLM word pieces) and byte LM.

Classification tasks (`<name>_v1`): `inputs` int32 [L] = [CLS] word pieces [SEP] (L at
most the sequence length, default TEXT_MAX_LENGTH), `label` int32. Variants
`<name>_mt_v1` add `task_id` (position in `OFFLINE_TEXT_TASKS`) for the mixture
`offline_text_v1`. Language modelling (`pydoc_lm_v1`, `fortunes_lm_v1`): decoder-only
`targets` int32 bytes (seqio.ByteVocabulary) ending in EOS.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from tasks import preprocessors as pp
from tasks import text_sources as src
from tasks.array_source import ArrayDataSource
from tasks.features import LM_FEATURES, TEXT_FEATURES, with_task_id
from tasks.registry import TaskInfo, add_task

TEXT_MAX_LENGTH = 128
LM_MAX_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class OfflineTextSpec:
    """An offline text data set: base name, loader, classes (0 for LM), availability."""

    name: str
    loader: Callable[[], dict]
    num_classes: int
    available: Callable[[], bool] = lambda: True


OFFLINE_TEXT_TASKS = (
    OfflineTextSpec("sms_spam", src.load_sms_spam, 2),
    OfflineTextSpec("trec6", src.load_trec6, len(src.TREC6_CLASSES)),
    OfflineTextSpec("movie_sentiment", src.load_movie_sentiment, 2),
    # Last, so that the other task ids do not depend on whether fortunes is installed.
    OfflineTextSpec(
        "fortune_topics", src.load_fortune_topics, len(src.FORTUNE_TOPICS), src.fortunes_available
    ),
)
OFFLINE_LM_TASKS = (
    OfflineTextSpec("pydoc_lm", src.load_pydoc_lm, 0),
    OfflineTextSpec("fortunes_lm", src.load_fortunes_lm, 0, src.fortunes_available),
)


def task_name(base: str) -> str:
    """Name of the task of data set `base`, e.g. "sms_spam_v1"."""
    return f"{base}_v1"


def multitask_name(base: str) -> str:
    """Name of the `task_id` variant of data set `base`, e.g. "sms_spam_mt_v1"."""
    return f"{base}_mt_v1"


def _source(spec: OfflineTextSpec) -> ArrayDataSource:
    return ArrayDataSource(lambda: getattr(src, spec.loader.__name__)())


def register() -> None:
    """Registers every offline text classification task, its `_mt_v1` variant, and the LMs.

    Tasks are registered whether or not their data is present; reading one whose data is
    missing raises MissingDataError naming what to install.
    """
    tokenize = functools.partial(pp.tokenize_for_classification, max_length=TEXT_MAX_LENGTH)
    for task_id, spec in enumerate(OFFLINE_TEXT_TASKS):
        source = _source(spec)
        info = TaskInfo(
            name=task_name(spec.name),
            modality="text",
            num_classes=spec.num_classes,
            image_shape=None,
            text_max_length=TEXT_MAX_LENGTH,
            vocabulary_name="minilm_wordpiece",
        )
        add_task(
            info.name,
            info=info,
            source=source,
            output_features=TEXT_FEATURES,
            preprocessors=[tokenize],
            count_examples=source.counts,
        )
        add_task(
            multitask_name(spec.name),
            info=dataclasses.replace(info, name=multitask_name(spec.name)),
            source=source,
            output_features=with_task_id(TEXT_FEATURES),
            preprocessors=[tokenize, functools.partial(pp.add_task_id, task_id=task_id)],
            count_examples=source.counts,
        )
    for spec in OFFLINE_LM_TASKS:
        source = _source(spec)
        info = TaskInfo(
            name=task_name(spec.name),
            modality="lm",
            num_classes=0,
            image_shape=None,
            text_max_length=LM_MAX_LENGTH,
            vocabulary_name="byte",
        )
        add_task(
            info.name,
            info=info,
            source=source,
            output_features=LM_FEATURES,
            preprocessors=pp.lm_preprocessors(LM_MAX_LENGTH),
            count_examples=source.counts,
        )


def text_mixture_members() -> list[str]:
    """The `_mt_v1` classification tasks of `offline_text_v1` whose data is present."""
    return [multitask_name(s.name) for s in OFFLINE_TEXT_TASKS if s.available()]


def lm_mixture_members() -> list[str]:
    """The language-modelling tasks of `offline_lm_v1` whose data is present."""
    return [task_name(s.name) for s in OFFLINE_LM_TASKS if s.available()]
