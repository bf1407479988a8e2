"""evogrow's seqio tasks: `import tasks` registers every task and mixture, once.

Names are versioned (`digits_v1`). `tasks.info(name)` gives the metadata models are built
from; `tasks.lookup(name)` the seqio Task or Mixture (with close matches on a typo), for
any seqio name, also one registered with plain seqio by a user's module.
"""

from tasks import mixtures, offline_image, offline_text, tfds_tasks
from tasks.registry import (
    MissingDataError,
    TaskInfo,
    TaskMetadataError,
    UnknownTaskError,
    get_task,
    info,
    lookup,
    modality_of,
    registered_names,
    set_info,
)
from tasks.vocabularies import BYTE_VOCABULARY, MINILM_VOCABULARY, get_vocabulary

offline_image.register()
offline_text.register()
tfds_tasks.register()
mixtures.register()

__all__ = [
    "BYTE_VOCABULARY",
    "MINILM_VOCABULARY",
    "MissingDataError",
    "TaskInfo",
    "TaskMetadataError",
    "UnknownTaskError",
    "get_task",
    "get_vocabulary",
    "info",
    "lookup",
    "modality_of",
    "registered_names",
    "set_info",
]
