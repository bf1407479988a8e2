"""TFDS-backed tasks of the papers' benchmarks, for machines with a TFDS data_dir.

Registration never downloads or reads anything: `seqio.TfdsDataSource` is lazy. Each task
has splits train / validation / test as the papers define them, and yields `image`
float32 [S, S, 3] in [0, 1] (bilinear, antialiased resize; grey repeated to RGB) and
`label` int32. Names: `<benchmark>_<task>_v1` at DEFAULT_IMAGE_SIZE and
`<benchmark>_<task>_<S>px_v1` at each of EXTRA_IMAGE_SIZES (or `register(image_sizes=)`).

Benchmarks:
- `munet_*`: the muNet character set; validation = last 10% of train (omniglot: its
  train split 80/10/10, as its test split holds other alphabets).
- `vdd_*`: Visual Domain Decathlon; TFDS hides the test labels, so the validation split
  is halved into validation and test.
- `vit_*`: the ViT benchmark; imagenet2012 validates on imagenet_v2 and tests on its
  validation split, cifar10 validates on cifar10_1, cifar100 on the last 2% of train.
- `vtab_*` / `vtab1k_*`: VTAB full and VTAB-1k (the first 800 train / 200 validation
  examples), with VTAB's splits. cifar10 and cifar100 are VTAB-1k only, as in the mu2Net
  benchmark, whose full-size CIFARs are the `vit_*` ones (same test split).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import TypeAlias

import seqio
import tensorflow as tf

from tasks import preprocessors as pp
from tasks import tfds_labels as labels
from tasks.features import IMAGE_FEATURES
from tasks.registry import TaskInfo, add_task

DEFAULT_IMAGE_SIZE = 224
EXTRA_IMAGE_SIZES = (32,)
Split: TypeAlias = str | seqio.TfdsSplit

# Major TFDS versions (seqio requires a version); any minor / patch release is accepted.
_MAJOR_VERSION = {
    "caltech101": 3,
    "cifar10": 3,
    "cifar100": 3,
    "cifar10_1": 1,
    "clevr": 3,
    "cmaterdb": 1,
    "diabetic_retinopathy_detection": 3,
    "dmlab": 2,
    "dsprites": 2,
    "dtd": 3,
    "emnist": 3,
    "eurosat": 2,
    "imagenet2012": 5,
    "imagenet_v2": 3,
    "kitti": 3,
    "kmnist": 3,
    "mnist": 3,
    "omniglot": 3,
    "oxford_flowers102": 2,
    "oxford_iiit_pet": 4,
    "patch_camelyon": 2,
    "resisc45": 3,
    "smallnorb": 2,
    "sun397": 4,
    "svhn_cropped": 3,
    "visual_domain_decathlon": 1,
}


def versioned(name: str) -> str:
    """TFDS name with the pinned major version seqio asks for, e.g. "mnist:3.*.*"."""
    return f"{name}:{_MAJOR_VERSION[name.split('/')[0]]}.*.*"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """One benchmark task.

    Attributes:
      benchmark: name prefix (munet, vdd, vit, vtab, vtab1k).
      task: what the name says, e.g. "clevr/count_all" or "mnist".
      dataset: TFDS name (with config) to read, or None when every split is a TfdsSplit.
      num_classes: label classes.
      splits: train / validation / test -> TFDS split string or seqio.TfdsSplit.
      label_fn: decoded TFDS example -> int32 label.
      binary_image: pixels are {0, 1} (dSprites), scaled to {0, 255} before use.
    """

    benchmark: str
    task: str
    dataset: str | None
    num_classes: int
    splits: dict[str, Split]
    label_fn: labels.LabelFn = labels.feature("label")
    binary_image: bool = False

    @property
    def base_name(self) -> str:
        """Task name without size or version, e.g. "vtab_clevr_count_all"."""
        return f"{self.benchmark}_{re.sub(r'[^a-z0-9]+', '_', self.task.lower())}"


def _split_map(train: Split, validation: Split, test: Split) -> dict[str, Split]:
    return {"train": train, "validation": validation, "test": test}


def _munet_specs() -> list[TfdsSpec]:
    classes = {
        "emnist/digits": 10,
        "emnist/letters": 37,
        "kmnist": 10,
        "mnist": 10,
        "cmaterdb/bangla": 10,
        "cmaterdb/devanagari": 10,
        "cmaterdb/telugu": 10,
    }
    splits = _split_map("train[:90%]", "train[90%:]", "test")
    specs = [TfdsSpec("munet", name, name, n, splits) for name, n in classes.items()]
    omniglot = _split_map("train[:80%]", "train[80%:90%]", "train[90%:]")
    return [*specs, TfdsSpec("munet", "omniglot", "omniglot", 1623, omniglot)]


def _vdd_specs() -> list[TfdsSpec]:
    classes = {
        "imagenet12": 1000,
        "svhn": 10,
        "cifar100": 100,
        "gtsrb": 43,
        "daimlerpedcls": 2,
        "omniglot": 1623,
        "ucf101": 101,
        "aircraft": 100,
        "dtd": 47,
        "vgg-flowers": 102,
    }
    halves = _split_map("train", "validation[:50%]", "validation[50%:]")
    return [
        TfdsSpec("vdd", config, f"visual_domain_decathlon/{config}", n, halves)
        for config, n in classes.items()
    ]


def _vit_specs() -> list[TfdsSpec]:
    imagenet = _split_map(
        seqio.TfdsSplit(versioned("imagenet2012"), "train"),
        seqio.TfdsSplit(versioned("imagenet_v2"), "test"),
        seqio.TfdsSplit(versioned("imagenet2012"), "validation"),
    )
    cifar10 = _split_map(
        seqio.TfdsSplit(versioned("cifar10"), "train"),
        seqio.TfdsSplit(versioned("cifar10_1/v6"), "test"),
        seqio.TfdsSplit(versioned("cifar10"), "test"),
    )
    cifar100 = _split_map("train[:98%]", "train[98%:]", "test")
    return [
        TfdsSpec("vit", "imagenet2012", None, 1000, imagenet),
        TfdsSpec("vit", "cifar10", None, 10, cifar10),
        TfdsSpec("vit", "cifar100", "cifar100", 100, cifar100),
    ]


_STANDARD = ("train", "validation", "test")
_CLEVR = ("train[:63000]", "train[63000:]", "validation")
_DSPRITES = ("train[:589824]", "train[589824:663552]", "train[663552:]")
_SMALLNORB = ("train", "test[:50%]", "test[50%:]")
# VTAB's CIFAR splits: train = first 90% of TFDS train (both have 50000), val = the rest.
_CIFAR = ("train[:45000]", "train[45000:]", "test")
# Tasks registered only in their VTAB-1k form.
_VTAB1K_ONLY = ("cifar10", "cifar100")
# VTAB rows: task, TFDS dataset, classes, (train, validation, test), label fn, binary.
_VTAB = (
    ("caltech101", "caltech101", 102, ("train[:2754]", "train[2754:]", "test"), None),
    ("cifar100", "cifar100", 100, _CIFAR, None),
    ("cifar10", "cifar10", 10, _CIFAR, None),
    ("dtd", "dtd", 47, _STANDARD, None),
    ("oxford_flowers102", "oxford_flowers102", 102, _STANDARD, None),
    ("oxford_iiit_pet", "oxford_iiit_pet", 37, ("train[:2944]", "train[2944:]", "test"), None),
    ("sun397", "sun397/tfds", 397, _STANDARD, None),
    ("svhn_cropped", "svhn_cropped", 10, ("train[:65931]", "train[65931:]", "test"), None),
    ("patch_camelyon", "patch_camelyon", 2, _STANDARD, None),
    ("eurosat", "eurosat/rgb", 10, ("train[:16200]", "train[16200:21600]", "train[21600:]"), None),
    ("resisc45", "resisc45", 45, ("train[:18900]", "train[18900:25200]", "train[25200:]"), None),
    ("diabetic_retinopathy_detection/btgraham-300", None, 5, _STANDARD, None),
    ("clevr/count_all", "clevr", 8, _CLEVR, labels.clevr_count_all),
    ("clevr/count_cylinders", "clevr", 11, _CLEVR, labels.clevr_count_cylinders),
    ("clevr/closest_object_distance", "clevr", 6, _CLEVR, labels.clevr_closest_object_distance),
    ("dmlab", "dmlab", 6, _STANDARD, None),
    ("dsprites/label_x_position", "dsprites", 16, _DSPRITES, labels.dsprites_x_position),
    ("dsprites/label_orientation", "dsprites", 16, _DSPRITES, labels.dsprites_orientation),
    ("kitti/closest_object_distance", "kitti", 5, _STANDARD, labels.kitti_closest_object_distance),
    ("kitti/count_vehicles", "kitti", 4, _STANDARD, labels.kitti_count_vehicles),
    (
        "kitti/closest_vehicle_distance",
        "kitti",
        4,
        _STANDARD,
        labels.kitti_closest_vehicle_distance,
    ),
    ("smallnorb/label_category", "smallnorb", 5, _SMALLNORB, labels.feature("label_category")),
    ("smallnorb/label_lighting", "smallnorb", 6, _SMALLNORB, labels.feature("label_lighting")),
    ("smallnorb/label_azimuth", "smallnorb", 18, _SMALLNORB, labels.feature("label_azimuth")),
    ("smallnorb/label_elevation", "smallnorb", 9, _SMALLNORB, labels.feature("label_elevation")),
)


def first_examples(split: str, count: int) -> str:
    """The first `count` examples of a TFDS split string with an absolute (or no) start.

    "train[2754:]" -> "train[2754:2954]"; "validation" -> "validation[0:200]";
    "test[:50%]" -> "test[0:200]" (a percent end is fine, a percent start is not).
    """
    base, _, rest = split.partition("[")
    start = rest.split(":")[0] if rest else ""
    if start.endswith("%"):
        raise ValueError(f"cannot take the first {count} examples of {split}")
    begin = int(start) if start else 0
    return f"{base}[{begin}:{begin + count}]"


def _vtab_specs() -> list[TfdsSpec]:
    specs = []
    for task, dataset, classes, (train, val, test), label_fn in _VTAB:
        fn = label_fn or labels.feature("label")
        binary = dataset == "dsprites"
        full = _split_map(train, val, test)
        one_k = _split_map(first_examples(train, 800), first_examples(val, 200), test)
        for benchmark, splits in (("vtab", full), ("vtab1k", one_k)):
            if benchmark == "vtab" and task in _VTAB1K_ONLY:
                continue
            specs.append(TfdsSpec(benchmark, task, dataset or task, classes, splits, fn, binary))
    return specs


def all_specs() -> list[TfdsSpec]:
    """Every TFDS benchmark task, in benchmark order."""
    return [*_munet_specs(), *_vdd_specs(), *_vit_specs(), *_vtab_specs()]


def task_name(spec: TfdsSpec, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
    """Registered name of `spec` at `image_size`, e.g. "vtab1k_dtd_32px_v1"."""
    size = "" if image_size == DEFAULT_IMAGE_SIZE else f"_{image_size}px"
    return f"{spec.base_name}{size}_v1"


def prepare_image(
    dataset: tf.data.Dataset, *, label_fn: labels.LabelFn, size: int, binary_image: bool
) -> tf.data.Dataset:
    """Decoded TFDS examples -> {"image": float32 [size, size, 3] in [0, 1], "label"}."""

    def fn(ex):
        image = ex["image"]
        if binary_image:
            image = tf.cast(image, tf.uint8) * 255
        image = pp.resize_image(pp.image_to_float(image), (size, size), 3)
        return {"image": image, "label": tf.cast(label_fn(ex), tf.int32)}

    return dataset.map(fn, num_parallel_calls=pp.AUTOTUNE)


def register_spec(spec: TfdsSpec, image_size: int, data_dir: str | None = None) -> str:
    """Registers one TFDS task at `image_size` and returns its name (nothing is read)."""
    name = task_name(spec, image_size)
    if spec.dataset is None:
        splits = {}
        for key, split in spec.splits.items():
            assert isinstance(split, seqio.TfdsSplit)
            splits[key] = dataclasses.replace(split, data_dir=split.data_dir or data_dir)
        source = seqio.TfdsDataSource(splits=splits)
    else:
        source = seqio.TfdsDataSource(
            versioned(spec.dataset), tfds_data_dir=data_dir, splits=spec.splits
        )
    info = TaskInfo(
        name=name,
        modality="image",
        num_classes=spec.num_classes,
        image_shape=(image_size, image_size, 3),
        text_max_length=None,
        vocabulary_name=None,
    )
    prepare = functools.partial(
        prepare_image, label_fn=spec.label_fn, size=image_size, binary_image=spec.binary_image
    )
    add_task(
        name, info=info, source=source, output_features=IMAGE_FEATURES, preprocessors=[prepare]
    )
    return name


def register(
    image_sizes: Sequence[int] = (DEFAULT_IMAGE_SIZE, *EXTRA_IMAGE_SIZES),
    data_dir: str | None = None,
) -> list[str]:
    """Registers every benchmark task at each of `image_sizes`; returns the names.

    Args:
      image_sizes: square sizes; DEFAULT_IMAGE_SIZE gets no size suffix.
      data_dir: TFDS data_dir; None uses TFDS's default (TFDS_DATA_DIR or
        ~/tensorflow_datasets).
    """
    return [register_spec(s, size, data_dir) for size in image_sizes for s in all_specs()]
