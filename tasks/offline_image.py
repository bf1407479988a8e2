"""Registers the offline image tasks and their 32x32x3 variants with a `task_id`.

Tasks (`<name>_v1`): native size, `image` float32 [H, W, C] in [0, 1], `label` int32.
Variants (`<name>_rgb32_v1`): resized to 32x32x3 with `task_id` = the task's position in
`OFFLINE_IMAGE_TASKS`, the members of the mixture `offline_image_rgb32_v1`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from tasks import image_sources as src
from tasks import preprocessors as pp
from tasks.array_source import ArrayDataSource
from tasks.features import IMAGE_FEATURES, with_task_id
from tasks.registry import TaskInfo, add_task

MIXTURE_IMAGE_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class OfflineImageSpec:
    """An offline image data set: base name, loader, native image shape, classes."""

    name: str
    loader: Callable[[], dict]
    image_shape: tuple[int, int, int]
    num_classes: int
    available: Callable[[], bool] = lambda: True


OFFLINE_IMAGE_TASKS = (
    OfflineImageSpec("digits", src.load_digits, (8, 8, 1), 10),
    OfflineImageSpec("lfw_faces", src.load_lfw_faces, (25, 25, 1), 2),
    OfflineImageSpec("textures", src.load_textures, (32, 32, 1), len(src.TEXTURE_CLASSES)),
    OfflineImageSpec("shape_type", src.load_shape_type, (32, 32, 3), len(src.SHAPE_CLASSES)),
    OfflineImageSpec("shape_count", src.load_shape_count, (32, 32, 3), src.SHAPE_COUNT_CLASSES),
    OfflineImageSpec("mnist1d", src.load_mnist1d, (1, 40, 1), 10),
    # Last, so that the task ids of the others do not depend on whether it is installed.
    OfflineImageSpec(
        "fashion_mnist",
        src.load_fashion_mnist,
        (28, 28, 1),
        src.FASHION_MNIST_CLASSES,
        src.fashion_mnist_available,
    ),
)


def task_name(base: str) -> str:
    """Name of the native-size task of data set `base`, e.g. "digits_v1"."""
    return f"{base}_v1"


def rgb32_task_name(base: str) -> str:
    """Name of the 32x32x3 multitask variant of data set `base`, e.g. "digits_rgb32_v1"."""
    return f"{base}_rgb32_v1"


def _source(spec: OfflineImageSpec) -> ArrayDataSource:
    # A fresh lambda keeps monkeypatching of the loader module effective in tests.
    return ArrayDataSource(lambda: getattr(src, spec.loader.__name__)())


def register() -> None:
    """Registers `<name>_v1` and `<name>_rgb32_v1` for every offline image data set.

    Every task is registered whether or not its data is present; reading a task whose
    data is missing raises MissingDataError naming what to install.
    """
    for task_id, spec in enumerate(OFFLINE_IMAGE_TASKS):
        source = _source(spec)
        info = TaskInfo(
            name=task_name(spec.name),
            modality="image",
            num_classes=spec.num_classes,
            image_shape=spec.image_shape,
            text_max_length=None,
            vocabulary_name=None,
        )
        add_task(
            info.name,
            info=info,
            source=source,
            output_features=IMAGE_FEATURES,
            preprocessors=[pp.scale_image],
            count_examples=source.counts,
        )
        size, channels = MIXTURE_IMAGE_SHAPE[:2], MIXTURE_IMAGE_SHAPE[2]
        rgb_info = dataclasses.replace(
            info, name=rgb32_task_name(spec.name), image_shape=MIXTURE_IMAGE_SHAPE
        )
        add_task(
            rgb_info.name,
            info=rgb_info,
            source=source,
            output_features=with_task_id(IMAGE_FEATURES),
            preprocessors=[
                pp.scale_image,
                functools.partial(pp.resize_images, size=size, channels=channels),
                functools.partial(pp.add_task_id, task_id=task_id),
            ],
            count_examples=source.counts,
        )


# The root model of the evolution pretrains on Fashion-MNIST; the evolved tasks are the rest.
ROOT_PRETRAINING_BASE = "fashion_mnist"


def evolution_members() -> list[str]:
    """The `_rgb32_v1` tasks the muNet system evolves over: all but the root's data set."""
    return [rgb32_task_name(s.name) for s in OFFLINE_IMAGE_TASKS if s.name != ROOT_PRETRAINING_BASE]


def mixture_members() -> list[str]:
    """The `_rgb32_v1` tasks of the offline image mixture whose data is present."""
    return [rgb32_task_name(s.name) for s in OFFLINE_IMAGE_TASKS if s.available()]
