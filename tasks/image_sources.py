"""In-memory loaders of the offline image data sets (data that ships in packages).

Each `load_*` returns split -> {"image": uint8 or float32 [N, H, W, C], "label": int32 [N]},
is cached per process, and is deterministic: the splits come from fixed seeds. uint8
images are scaled to [0, 1] by the task preprocessors, which keeps the cache small.
"""

from __future__ import annotations

import functools
import gzip
import pathlib

import numpy as np

from tasks.array_source import split_indices, take
from tasks.registry import MissingDataError

SPLIT_SEED = 20240601
SHAPE_CLASSES = ("rectangle", "circle", "triangle", "ellipse")
TEXTURE_CLASSES = ("brick", "grass", "gravel")
FASHION_MNIST_CLASSES = 10


def _image_split(images: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    arrays = {"image": images, "label": labels.astype(np.int32)}
    return {s: take(arrays, idx) for s, idx in split_indices(len(labels), seed).items()}


@functools.cache
def load_digits() -> dict:
    """Sklearn digits: 1,797 images 8x8x1 in [0, 1], 10 classes; 80/10/10 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    return _image_split(images, data.target, SPLIT_SEED)


@functools.cache
def load_lfw_faces() -> dict:
    """Skimage lfw_subset: 200 images 25x25x1; label 1 = face (the first 100), 0 = not."""
    import skimage.data

    images = skimage.data.lfw_subset().astype(np.float32)[..., None]
    labels = (np.arange(len(images)) < 100).astype(np.int32)
    return _image_split(images, labels, SPLIT_SEED + 1)


def _patches(photo: np.ndarray, rows: range, size: int) -> np.ndarray:
    cols = photo.shape[1] // size
    return np.stack(
        [
            photo[r * size : (r + 1) * size, c * size : (c + 1) * size]
            for r in rows
            for c in range(cols)
        ]
    )


@functools.cache
def load_textures(patch: int = 32) -> dict:
    """Skimage brick / grass / gravel photos cut into non-overlapping patch x patch tiles.

    Splits come from separate rows of tiles so no pixel is shared between splits: the
    first 12 of 16 rows train, the next 2 validate, the last 2 test (192/32/32 tiles per
    photo at patch 32).
    """
    import skimage.data

    rows = 512 // patch
    n_val = n_test = max(1, rows // 8)
    row_sets = {
        "train": range(0, rows - n_val - n_test),
        "validation": range(rows - n_val - n_test, rows - n_test),
        "test": range(rows - n_test, rows),
    }
    out = {}
    for split, row_range in row_sets.items():
        images, labels = [], []
        for label, name in enumerate(TEXTURE_CLASSES):
            tiles = _patches(getattr(skimage.data, name)(), row_range, patch)
            images.append(tiles[..., None])
            labels.append(np.full(len(tiles), label, np.int32))
        out[split] = {"image": np.concatenate(images), "label": np.concatenate(labels)}
    return out


# Shape data sets: example i of a split is drawn with rng = offset + i, so the splits
# never share a seed.
_SHAPE_SPLIT_SIZES = {"train": 2400, "validation": 400, "test": 400}
_SHAPE_SPLIT_OFFSETS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}


@functools.cache
def load_shape_type(size: int = 32) -> dict:
    """One random skimage shape per RGB image; label = its type (SHAPE_CLASSES), balanced."""
    from skimage.draw import random_shapes

    out = {}
    for split, n in _SHAPE_SPLIT_SIZES.items():
        images = np.empty((n, size, size, 3), np.uint8)
        labels = np.empty((n,), np.int32)
        for i in range(n):
            label = i % len(SHAPE_CLASSES)
            images[i], _ = random_shapes(
                (size, size),
                max_shapes=1,
                min_shapes=1,
                shape=SHAPE_CLASSES[label],
                min_size=size // 4,
                max_size=size,
                rng=_SHAPE_SPLIT_OFFSETS[split] + i,
            )
            labels[i] = label
        out[split] = {"image": images, "label": labels}
    return out


SHAPE_COUNT_CLASSES = 4  # 1, 2, 3 or 4 objects -> label 0..3


@functools.cache
def load_shape_count(size: int = 32) -> dict:
    """1-4 non-overlapping random skimage shapes per RGB image; label = count - 1."""
    from skimage.draw import random_shapes

    out = {}
    for split, n in _SHAPE_SPLIT_SIZES.items():
        images = np.empty((n, size, size, 3), np.uint8)
        labels = np.empty((n,), np.int32)
        for i in range(n):
            wanted = i % SHAPE_COUNT_CLASSES + 1
            images[i], placed = random_shapes(
                (size, size),
                max_shapes=wanted,
                min_shapes=wanted,
                min_size=size // 6,
                max_size=size // 3,
                allow_overlap=False,
                rng=_SHAPE_SPLIT_OFFSETS[split] + i,
            )
            # random_shapes may place fewer than asked when space runs out: label what
            # is actually drawn.
            labels[i] = len(placed) - 1
        out[split] = {"image": images, "label": labels}
    return out


@functools.cache
def load_mnist1d() -> dict:
    """mnist1d generated locally (no download): 40-sample signals as 1x40x1 images.

    The package's 4,000/1,000 train/test split is kept; the last 500 train examples
    validate. Signals are min-max scaled to [0, 1] with the range of the whole set.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise MissingDataError(
            "mnist1d needs the pip package mnist1d: pip install mnist1d"
        ) from err
    # make_dataset seeds numpy's global RNG; leave the caller's global state as it was.
    state = np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x_all = np.concatenate([data["x"], data["x_test"]])
    low, high = x_all.min(), x_all.max()

    def scale(x: np.ndarray) -> np.ndarray:
        return ((x - low) / (high - low)).astype(np.float32)[:, None, :, None]

    n_val = 500
    train_x, train_y = scale(data["x"]), np.asarray(data["y"], np.int32)
    return {
        "train": {"image": train_x[:-n_val], "label": train_y[:-n_val]},
        "validation": {"image": train_x[-n_val:], "label": train_y[-n_val:]},
        "test": {"image": scale(data["x_test"]), "label": np.asarray(data["y_test"], np.int32)},
    }


def fashion_mnist_dir() -> pathlib.Path:
    """Where the Debian package dataset-fashion-mnist puts its idx.gz files."""
    return pathlib.Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist_available() -> bool:
    """Whether the Fashion-MNIST files are on this machine."""
    return (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()


def read_idx_gz(path: pathlib.Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format) of unsigned bytes into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def load_fashion_mnist() -> dict:
    """Fashion-MNIST from the Debian package: 28x28x1 uint8, 10 classes.

    The official 10k test split is kept; 5,000 seeded train examples validate.
    """
    root = fashion_mnist_dir()
    if not fashion_mnist_available():
        raise MissingDataError(
            f"Fashion-MNIST needs the Debian package dataset-fashion-mnist (no files under "
            f"{root}): apt-get install dataset-fashion-mnist"
        )
    arrays = {}
    for prefix in ("train", "t10k"):
        arrays[prefix] = {
            "image": read_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz")[..., None],
            "label": read_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32),
        }
    order = np.random.default_rng(SPLIT_SEED + 2).permutation(len(arrays["train"]["label"]))
    val, train = np.sort(order[:5000]), np.sort(order[5000:])
    return {
        "train": take(arrays["train"], train),
        "validation": take(arrays["train"], val),
        "test": arrays["t10k"],
    }
