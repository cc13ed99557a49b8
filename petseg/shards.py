"""Sharded TFRecord files of preprocessed samples, and data set fingerprints.

Each record is a ``tf.train.Example`` with the features in :data:`FEATURES`:
the sample id, the image as raw ``uint8`` RGB bytes, the trimap as raw
``uint8`` bytes (1 pet, 2 background, 3 border), their height and width, and
the sample's content hash. Records are serialised deterministically, so the
same samples give the same shard bytes on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf

from petseg.errors import DataError

FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "sha256": tf.io.FixedLenFeature([], tf.string),
}
"""Feature spec for ``tf.io.parse_example`` on shard records."""


def sample_hash(sample_id: str, image_file: bytes, trimap_file: bytes) -> str:
    """Return the content hash of one sample.

    The hash covers the raw file bytes, not decoded pixels, so it does not
    depend on the JPEG decoder of the machine. Each part is length-prefixed
    so that no two different samples can hash the same bytes.

    Args:
        sample_id: Oxford image stem.
        image_file: bytes of the ``.jpg`` file.
        trimap_file: bytes of the ``.png`` trimap.

    Returns:
        sha256 hex digest.
    """
    digest = hashlib.sha256()
    for part in (sample_id.encode(), image_file, trimap_file):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def fingerprint(hashes: Iterable[str]) -> str:
    """Return the data set fingerprint: sha256 over the sorted per-sample hashes.

    Args:
        hashes: :func:`sample_hash` of every sample, in any order.

    Returns:
        sha256 hex digest of the sorted hashes, one per line.
    """
    return hashlib.sha256("".join(f"{h}\n" for h in sorted(hashes)).encode()).hexdigest()


def encode(sample_id: str, image: np.ndarray, mask: np.ndarray, sha256: str) -> bytes:
    """Serialise one preprocessed sample.

    Args:
        sample_id: Oxford image stem.
        image: ``uint8`` array (H, W, 3).
        mask: ``uint8`` trimap array (H, W).
        sha256: the sample's :func:`sample_hash`.

    Returns:
        A serialised ``tf.train.Example``.
    """
    height, width = mask.shape

    def feature(value: bytes | int) -> tf.train.Feature:
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    example = tf.train.Example(features=tf.train.Features(feature={
        "id": feature(sample_id.encode()),
        "image": feature(np.ascontiguousarray(image, dtype=np.uint8).tobytes()),
        "mask": feature(np.ascontiguousarray(mask, dtype=np.uint8).tobytes()),
        "height": feature(int(height)),
        "width": feature(int(width)),
        "sha256": feature(sha256.encode()),
    }))
    # Features is a protobuf map: only deterministic serialisation fixes its key order.
    return example.SerializeToString(deterministic=True)


def decode(record: bytes) -> dict:
    """Parse one record back into numpy arrays.

    Args:
        record: bytes written by :func:`encode`.

    Returns:
        ``{"id": str, "image": uint8 (H, W, 3), "mask": uint8 (H, W), "sha256": str}``.
    """
    feature = tf.train.Example.FromString(record).features.feature
    height, width = feature["height"].int64_list.value[0], feature["width"].int64_list.value[0]
    return {
        "id": feature["id"].bytes_list.value[0].decode(),
        "image": np.frombuffer(feature["image"].bytes_list.value[0], dtype=np.uint8).reshape(height, width, 3),
        "mask": np.frombuffer(feature["mask"].bytes_list.value[0], dtype=np.uint8).reshape(height, width),
        "sha256": feature["sha256"].bytes_list.value[0].decode(),
    }


def read_records(paths: Iterable[str | Path]) -> Iterator[bytes]:
    """Stream the records of shard files, in the order given.

    Args:
        paths: shard files.

    Yields:
        Serialised records.

    Raises:
        DataError: a shard is missing or corrupt.
    """
    for path in paths:
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                yield record.numpy()
        except tf.errors.OpError as exc:
            raise DataError(f"{path}: cannot read shard ({exc.message}); "
                            "expected a TFRecord file written by petseg") from exc


class ShardWriter:
    """Write records into files of at most ``shard_size`` records each.

    Files are named ``<prefix>-00000.tfrecord``, ``<prefix>-00001.tfrecord``,
    ... in ``directory``. Use as a context manager.

    Args:
        directory: where to write (created if missing).
        prefix: file name prefix.
        shard_size: records per file, at least 1.
    """

    def __init__(self, directory: str | Path, prefix: str, shard_size: int):
        self.directory = Path(directory)
        self.prefix = prefix
        self.shard_size = shard_size
        self.names: list[str] = []
        self.count = 0
        self._writer: tf.io.TFRecordWriter | None = None

    def write(self, record: bytes) -> None:
        """Append one serialised record, starting a new file when the current one is full."""
        if self.count % self.shard_size == 0:
            self.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self.names.append(f"{self.prefix}-{len(self.names):05d}.tfrecord")
            self._writer = tf.io.TFRecordWriter(str(self.directory / self.names[-1]))
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        """Flush and close the current file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
