"""The notebooks' augmentations (`augment.augment_batch`) and the training stream using them."""

import numpy as np
import pytest

from evolution.search.data import augment, batches
from evolution.search.space import hparams as hp


def _images(seed=0, shape=(6, 12, 10, 3)):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


STRONGEST = {
    "crop_area_min": hp.CROP_AREA_MIN[-1],
    "aspect_ratio_min": hp.ASPECT_RATIO_MIN[-1],
    "flip": True,
    "brightness": hp.BRIGHTNESS_DELTA[-1],
    "contrast": hp.CONTRAST_DELTA[-1],
    "saturation": hp.SATURATION_DELTA[-1],
    "hue": hp.HUE_DELTA[-1],
}


def test_value_lists_are_mu3nets():
    # mu3Net's config_add_auto_tune, weakest first.
    assert hp.CROP_AREA_MIN == (1.0, 0.95, 0.5, 0.05)
    assert hp.ASPECT_RATIO_MIN == (1.0, 0.75, 0.5)
    for deltas in (hp.BRIGHTNESS_DELTA, hp.CONTRAST_DELTA, hp.SATURATION_DELTA, hp.HUE_DELTA):
        assert deltas == (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    space = hp.default_space(patch_size=4, image_size=32)
    for name, value in augment.NO_OP.items():
        assert space[name].values[0] == value  # every augmentation starts from its no-op...
        assert name == "flip" or space[name].default == 0  # ...and stays off (flip: on)


def test_no_op_values_give_identical_images_and_draw_nothing():
    images = _images()
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    out = augment.augment_batch(images, augment.NO_OP, rng)
    np.testing.assert_array_equal(out, images)
    assert rng.bit_generator.state == state
    # Missing names are no-ops too; unknown data names (mixup, image size) are ignored.
    np.testing.assert_array_equal(augment.augment_batch(images, {"image_size": 16}, rng), images)


def test_each_augmentation_changes_images_within_range():
    images = _images()
    for name, value in STRONGEST.items():
        if name == "aspect_ratio_min":
            continue  # only shapes the crop
        out = augment.augment_batch(images, {name: value}, np.random.default_rng(1))
        assert out.shape == images.shape and out.dtype == np.float32
        assert not np.array_equal(out, images), name
        assert out.min() >= 0.0 and out.max() <= 1.0, name
    out = augment.augment_batch(images, STRONGEST, np.random.default_rng(1))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_augmentation_is_a_function_of_the_generator():
    images = _images()
    first = augment.augment_batch(images, STRONGEST, np.random.default_rng(7))
    again = augment.augment_batch(images, STRONGEST, np.random.default_rng(7))
    other = augment.augment_batch(images, STRONGEST, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_flip_mirrors_whole_images():
    images = _images()
    out = augment.augment_batch(images, {"flip": True}, np.random.default_rng(0))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_brightness_and_contrast_follow_tf_image():
    images = _images(shape=(64, 4, 4, 3))
    out = augment.augment_batch(images, {"brightness": 0.1}, np.random.default_rng(0))
    shift = (out - images).reshape(64, -1)
    # One offset per image in [-0.1, 0.1] (wherever no clipping happened).
    inside = (out > 0) & (out < 1)
    for row, mask in zip(shift, inside.reshape(64, -1), strict=True):
        assert np.ptp(row[mask]) < 1e-6 and abs(row[mask][0]) <= 0.1 + 1e-6
    grey = np.full((8, 4, 4, 1), 0.5, np.float32)
    grey[:, :2] = 0.25
    out = augment.augment_batch(grey, {"contrast": 0.2}, np.random.default_rng(0))
    # Contrast scales about each image's mean: the mean is kept, the spread in [0.8, 1.2].
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), grey.mean(axis=(1, 2, 3)), atol=1e-6)
    ratio = np.ptp(out, axis=(1, 2, 3)) / np.ptp(grey, axis=(1, 2, 3))
    assert np.all((ratio >= 0.8 - 1e-6) & (ratio <= 1.2 + 1e-6))


def test_hsv_round_trip_and_grey_images_have_no_hue_or_saturation():
    rgb = _images(shape=(200, 3))
    np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(rgb)), rgb, atol=1e-6)
    hsv = augment.rgb_to_hsv(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(hsv[:, 0], [0.0, 1 / 3, 2 / 3])
    grey = np.repeat(_images(shape=(4, 5, 5, 1)), 3, axis=-1)
    out = augment.augment_batch(grey, {"saturation": 0.2, "hue": 0.2}, np.random.default_rng(0))
    np.testing.assert_allclose(out, grey, atol=1e-6)
    single = _images(shape=(4, 5, 5, 1))  # one channel: no colour to jitter
    out = augment.augment_batch(single, {"saturation": 0.2, "hue": 0.2}, np.random.default_rng(0))
    np.testing.assert_array_equal(out, single)


def test_crop_boxes_respect_area_and_aspect_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, rows, cols = augment.crop_box(32, 32, 0.5, 0.75, rng)
        assert 0 <= top and top + rows <= 32 and 0 <= left and left + cols <= 32
        # Rounding to whole pixels moves area and ratio a little.
        assert rows * cols >= 0.5 * 32 * 32 * 0.9
        assert 0.75 * 0.9 <= cols / rows <= (1 / 0.75) * 1.1
    assert augment.crop_box(32, 32, 1.0, 1.0, rng) == (0, 0, 32, 32)


def test_resize_to_the_same_size_is_the_identity():
    image = _images()[0]
    np.testing.assert_array_equal(augment.resize_bilinear(image, 12, 10), image)
    constant = np.full((5, 7, 2), 0.3, np.float32)
    np.testing.assert_allclose(augment.resize_bilinear(constant, 9, 4), 0.3, atol=1e-7)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="crop_area_min"):
        augment.augment_batch(_images(), {"crop_area_min": 0.0}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="hue"):
        augment.check_values({"hue": 1.5})


def test_training_stream_augments_deterministically_from_the_seed():
    images, labels = _images(shape=(40, 8, 8, 3)), np.arange(40) % 4
    make = batches.array_train_batches(images, labels)
    plain = next(make({}, batch_size=8, seed=3))
    # No-op values: the stream's images are rows of the data as they are.
    assert any(np.array_equal(plain["image"][0], image) for image in images)
    first = [next(make(STRONGEST, batch_size=8, seed=3))["image"] for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    assert not any(np.array_equal(first[0][0], image) for image in images)


def test_hsv_conversions_match_tf_image():
    tf = pytest.importorskip("tensorflow")
    rgb = _images(seed=3, shape=(500, 3))
    rgb[:10] = rgb[:10, :1]  # greys
    ours = augment.rgb_to_hsv(rgb)
    np.testing.assert_allclose(ours, tf.image.rgb_to_hsv(rgb).numpy(), atol=1e-5)
    hsv = ours.copy()
    hsv[:, 0] = (hsv[:, 0] + 0.15) % 1.0
    np.testing.assert_allclose(
        augment.hsv_to_rgb(hsv), tf.image.hsv_to_rgb(hsv.astype(np.float32)).numpy(), atol=1e-5
    )
