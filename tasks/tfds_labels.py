"""Label functions of the VTAB tasks whose label is derived from TFDS annotations.

Each maps a decoded TFDS example to an int32 scalar label. Class definitions follow the
VTAB benchmark (Zhai et al., 2019): counts and distance bins of CLEVR and KITTI objects,
binned dSprites positions and orientations.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

LabelFn = Callable[[dict], tf.Tensor]

_CLEVR_CYLINDER = 2  # tfds clevr shape names: cube, sphere, cylinder
_KITTI_VEHICLE_TYPES = 3  # tfds kitti types 0, 1, 2 = Car, Van, Truck


def feature(key: str) -> LabelFn:
    """Label = the integer TFDS feature `key`."""
    return lambda ex: tf.cast(ex[key], tf.int32)


def _bin(value: tf.Tensor, lower_edges: list[float]) -> tf.Tensor:
    """Index of the last lower edge strictly below `value`."""
    below = tf.cast(tf.constant(lower_edges, tf.float32) < tf.cast(value, tf.float32), tf.int32)
    return tf.reduce_sum(below) - 1


def clevr_count_all(ex: dict) -> tf.Tensor:
    """Number of objects minus 3 (scenes hold 3 to 10 objects): 8 classes."""
    return tf.size(ex["objects"]["size"], out_type=tf.int32) - 3


def clevr_count_cylinders(ex: dict) -> tf.Tensor:
    """Number of cylinders (0 to 10): 11 classes."""
    return tf.reduce_sum(tf.cast(tf.equal(ex["objects"]["shape"], _CLEVR_CYLINDER), tf.int32))


def clevr_closest_object_distance(ex: dict) -> tf.Tensor:
    """Depth of the closest object binned at 8, 8.5, 9, 9.5, 10: 6 classes."""
    depth = tf.reduce_min(ex["objects"]["pixel_coords"][:, 2])
    return _bin(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0])


def kitti_closest_object_distance(ex: dict) -> tf.Tensor:
    """Depth (m) of the closest object binned at 5.6, 8.4, 13.4, 23.4: 5 classes."""
    depth = tf.reduce_min(ex["objects"]["location"][:, 2])
    return _bin(depth, [-100.0, 5.6, 8.4, 13.4, 23.4])


def _vehicle_depths(ex: dict) -> tf.Tensor:
    is_vehicle = ex["objects"]["type"] < _KITTI_VEHICLE_TYPES
    return tf.boolean_mask(ex["objects"]["location"][:, 2], is_vehicle)


def kitti_count_vehicles(ex: dict) -> tf.Tensor:
    """Number of cars, vans and trucks, capped at 3: 4 classes."""
    return tf.minimum(tf.size(_vehicle_depths(ex), out_type=tf.int32), 3)


def kitti_closest_vehicle_distance(ex: dict) -> tf.Tensor:
    """Depth of the closest vehicle binned at 8 and 20 m, plus "no vehicle": 4 classes."""
    depth = tf.reduce_min(tf.concat([_vehicle_depths(ex), [1000.0]], axis=0))
    return _bin(depth, [-100.0, 8.0, 20.0, 999.0])


def dsprites_x_position(ex: dict) -> tf.Tensor:
    """The 32 x positions in 16 bins."""
    return tf.cast(ex["label_x_position"], tf.int32) // 2


def dsprites_orientation(ex: dict) -> tf.Tensor:
    """The 40 orientations in 16 bins."""
    return tf.cast(ex["label_orientation"], tf.int32) * 16 // 40
