"""The tf.data input pipeline: shard files in, (image, one-hot mask) batches out.

Records are read in the order of the shard list, decoded in parallel with
``deterministic=True`` (so parallelism never reorders them), optionally
shuffled with a seed and flipped left-right with stateless random ops keyed
by the seed and the element's position. Image and mask are flipped as one
tensor, so they cannot come apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import tensorflow as tf

from petseg.data import shards as shard_files
from petseg.errors import DataError

SHUFFLE_BUFFER = 1024
"""Records held for shuffling (about 64 MiB at 128x128)."""
FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "sha256": tf.io.FixedLenFeature([], tf.string),
}
"""Feature spec of shard records (`petseg.data.shards.encode`) for ``tf.io.parse_single_example``."""


def dataset(
    shards: Sequence[str | Path],
    *,
    batch_size: int,
    image_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Stream batches of (image, mask) from shard files.

    The shuffle order depends on ``seed`` and on TensorFlow's global seed
    (set by :func:`petseg.model.determinism.configure`); within one configuration
    the same seed gives the same order, and each pass over the data set
    (each epoch) gets a new order. Flips depend on ``seed`` and each
    element's position in the stream only.

    Args:
        shards: shard files written by :func:`petseg.data.warehouse.ingest` or
            :func:`petseg.data.warehouse.transform`.
        batch_size: examples per batch (the last batch may be smaller).
        image_size: side of the stored images (the run's setting); must match the shards.
        shuffle: shuffle records through a buffer of :data:`SHUFFLE_BUFFER`.
        seed: seed for shuffling and flipping.
        augment: flip image and mask left-right together, each with
            probability 1/2.
        repeat: repeat forever.

    Returns:
        A dataset of ``(image, mask)``: image float32 ``[B, H, W, 3]`` in
        [0, 1]; mask one-hot float32 ``[B, H, W, 3]`` with channels pet,
        background, border.

    Raises:
        DataError: no shards are given, or their images are not
            ``image_size`` square.
    """
    if not shards:
        raise DataError("no shard files given: the split is empty; ingest more samples or use another split")
    _check_size(shards[0], image_size)
    records = tf.data.TFRecordDataset([str(path) for path in shards])
    if shuffle:
        records = records.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()

    def decode(position: tf.Tensor, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = tf.io.parse_single_example(record, FEATURES)
        image = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [image_size, image_size, 3])
        mask = tf.reshape(tf.io.decode_raw(features["mask"], tf.uint8), [image_size, image_size, 1])
        if augment:
            both = tf.concat([image, mask], axis=-1)
            key = tf.stack([tf.constant(seed, tf.int64), position])
            both = tf.image.stateless_random_flip_left_right(both, seed=key)
            image, mask = both[..., :3], both[..., 3:]
        # Trimap values 1, 2, 3 become channels 0 (pet), 1 (background), 2 (border).
        one_hot = tf.one_hot(tf.cast(mask[..., 0], tf.int32) - 1, 3, dtype=tf.float32)
        return tf.cast(image, tf.float32) / 255.0, one_hot

    examples = records.enumerate().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _check_size(shard: str | Path, image_size: int) -> None:
    """Fail early, with the file named, when shards hold another image size."""
    record = next(shard_files.read_records([shard]), None)
    if record is None:  # an empty shard: nothing to check
        return
    height, width = shard_files.decode(record)["mask"].shape
    if (height, width) != (image_size, image_size):
        raise DataError(f"{shard}: images are {width}x{height} but the pipeline expects {image_size}x{image_size}; "
                        "pass the image_size used at ingest")
