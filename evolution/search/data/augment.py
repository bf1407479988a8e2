"""The notebooks' training-image augmentations, on in-memory float batches.

mu3Net's training pipeline (`Task.get_ds`) applies, in this order and each only when
its hyperparameter is not the no-op value: a random crop (`tf.image.
sample_distorted_bounding_box` with area in [crop_area_min, 1] and aspect ratio in
[aspect_ratio_min, 1 / aspect_ratio_min]), a left-right flip with probability 1/2, and
random brightness, contrast, saturation and hue. `augment_batch` does the same on a
batch of float images in [0, 1] (the tasks' range, `tasks.preprocessors`), drawing
everything from the candidate's generator, so a candidate's stream is a function of
its seed. Deliberate differences:

- The crop is resized back to the batch's own side (bilinear, half-pixel centres as
  `tf.image.resize`), not to the path's image size: a path at another resolution
  resizes its input itself (`models.vit.ViTConfig.resolution`).
- The crop box samples area and aspect ratio uniformly and retries up to 10 times
  (then takes the whole image), a simplification of TF's sampler.
- The notebooks work on uint8 images, which saturate after every step; here the
  colour jitters work on floats and the result is clipped to [0, 1] once, at the end.

With every value at its no-op (crop area 1, no flip, all deltas 0), the images come
back unchanged and nothing is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The hyperparameters read here and their no-op values.
NO_OP: dict[str, Any] = {
    "crop_area_min": 1.0,
    "aspect_ratio_min": 1.0,
    "flip": False,
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
}
_CROP_ATTEMPTS = 10


def _value(values: Mapping[str, Any], name: str) -> Any:
    return values.get(name, NO_OP[name])


def check_values(values: Mapping[str, Any]) -> None:
    """Refuses augmentation values outside the ranges the notebooks use.

    Raises:
      ValueError: with the value to fix.
    """
    for name in ("crop_area_min", "aspect_ratio_min"):
        value = float(_value(values, name))
        if not 0.0 < value <= 1.0:
            raise ValueError(f"Augmentation {name}={value} must be in (0, 1].")
    for name in ("brightness", "contrast", "saturation", "hue"):
        value = float(_value(values, name))
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Augmentation {name}={value} must be in [0, 1).")


def resize_bilinear(image_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (`tf.image.resize`'s default, no antialias).

    The same size returns the values unchanged (every weight is 0 or 1).
    """
    in_h, in_w = image_HxWxC.shape[:2]

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
        coords = np.clip(coords, 0.0, size_in - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, (coords - low).astype(image_HxWxC.dtype)

    y0, y1, wy = axis(in_h, height)
    x0, x1, wx = axis(in_w, width)
    rows = image_HxWxC[y0] * (1 - wy)[:, None, None] + image_HxWxC[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def crop_box(
    height: int, width: int, area_min: float, aspect_min: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random crop box (top, left, rows, columns) of an image of `height` x `width`.

    The box covers a fraction in [area_min, 1] of the image with width / height in
    [aspect_min, 1 / aspect_min]; after `_CROP_ATTEMPTS` boxes that do not fit, the
    whole image.
    """
    for _ in range(_CROP_ATTEMPTS):
        area = rng.uniform(area_min, 1.0) * height * width
        ratio = rng.uniform(aspect_min, 1.0 / aspect_min)
        rows = int(round(np.sqrt(area / ratio)))
        cols = int(round(rows * ratio))
        if 0 < rows <= height and 0 < cols <= width:
            top = int(rng.integers(0, height - rows + 1))
            left = int(rng.integers(0, width - cols + 1))
            return top, left, rows, cols
    return 0, 0, height, width


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (last axis) to HSV in [0, 1], as `tf.image.rgb_to_hsv`."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Element-wise over the channels (a reduction over a last axis of 3 is slow in numpy).
    value = np.maximum(np.maximum(r, g), b)
    chroma = value - np.minimum(np.minimum(r, g), b)
    safe_value = np.where(value > 0, value, 1)
    saturation = np.where(value > 0, chroma / safe_value, 0)
    safe_chroma = np.where(chroma > 0, chroma, 1)
    hue = np.where(
        value == r,
        (g - b) / safe_chroma,
        np.where(value == g, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma),
    )
    hue = np.where(chroma > 0, (hue / 6) % 1.0, 0)
    return np.stack([hue, saturation, value], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (last axis) back to RGB, the inverse of `rgb_to_hsv`."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = hue * 6
    channels = []
    for offset in (5, 3, 1):  # r, g, b
        k = (offset + sector) % 6
        channels.append(value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1))
    return np.stack(channels, -1)


def augment_batch(
    images_BxHxWxC: np.ndarray, values: Mapping[str, Any], rng: np.random.Generator
) -> np.ndarray:
    """Augments a batch of training images as the notebooks' pipeline does.

    Per image: crop, flip, brightness (+ U(-d, d)), contrast (per channel about its
    mean, factor U(1 - d, 1 + d)), saturation (factor U(1 - d, 1 + d) in HSV, clipped),
    hue (+ U(-d, d) in HSV, wrapped); colour jitters other than brightness and contrast
    apply to 3-channel images only (a grey image has no saturation or hue). Draws
    happen only for augmentations that are on, in that order, batch-wise.

    Args:
      images_BxHxWxC: float images in [0, 1].
      values: the generation's data hyperparameter values (missing names: no-op;
        names other than `NO_OP`'s are ignored).
      rng: the candidate's generator.

    Returns:
      The augmented float32 batch (the input itself when every value is a no-op).
    """
    check_values(values)
    batch = np.asarray(images_BxHxWxC, np.float32)
    size, height, width, channels = batch.shape
    area_min = float(_value(values, "crop_area_min"))
    aspect_min = float(_value(values, "aspect_ratio_min"))
    brightness, contrast, saturation, hue = (
        float(_value(values, name)) for name in ("brightness", "contrast", "saturation", "hue")
    )
    colour = channels == 3 and (saturation > 0 or hue > 0)
    if area_min < 1.0:
        cropped = []
        for image in batch:
            top, left, rows, cols = crop_box(height, width, area_min, aspect_min, rng)
            crop = image[top : top + rows, left : left + cols]
            cropped.append(resize_bilinear(crop, height, width))
        batch = np.stack(cropped).astype(np.float32)
    if bool(_value(values, "flip")):
        flips = np.asarray(rng.random(size) < 0.5)
        batch = np.where(flips[:, None, None, None], batch[:, :, ::-1], batch)
    if brightness > 0:
        batch = batch + rng.uniform(-brightness, brightness, (size, 1, 1, 1)).astype(np.float32)
    if contrast > 0:
        factor = rng.uniform(1 - contrast, 1 + contrast, (size, 1, 1, 1)).astype(np.float32)
        mean = batch.mean(axis=(1, 2), keepdims=True)
        batch = (batch - mean) * factor + mean
    if colour:
        hsv = rgb_to_hsv(np.clip(batch, 0.0, 1.0))
        if saturation > 0:
            scale = rng.uniform(1 - saturation, 1 + saturation, (size, 1, 1))
            hsv[..., 1] = np.clip(hsv[..., 1] * scale, 0.0, 1.0)
        if hue > 0:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue, (size, 1, 1))) % 1.0
        batch = hsv_to_rgb(hsv).astype(np.float32)
    if brightness > 0 or contrast > 0 or colour:
        batch = np.clip(batch, 0.0, 1.0)
    return batch.astype(np.float32)
