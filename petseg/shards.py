"""Sharded TFRecord files of preprocessed samples, and data set fingerprints.

Each record is a ``tf.train.Example`` with the features id (the sample id),
image (raw ``uint8`` RGB bytes), mask (raw ``uint8`` trimap bytes: 1 pet,
2 background, 3 border), height, width and sha256 (the sample's content hash).

This module reads and writes the TFRecord framing (length, masked CRC-32C,
data, masked CRC-32C) and the few protobuf messages of an Example itself,
without TensorFlow: the ingest and transform steps then start in a fraction of
the time, and only the steps that train or predict import TensorFlow (whose
``tf.data.TFRecordDataset`` reads these files in `petseg.pipeline`). Records
are serialised deterministically (map entries sorted by key, as TensorFlow's
deterministic serialisation), so the same samples give the same shard bytes on
every machine.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c
import numpy as np

from petseg.errors import DataError

_MASK_DELTA = 0xA282EAD8
"""TFRecord's CRC mask constant (see tensorflow/core/lib/hash/crc32c.h)."""
_LEN, _VARINT = 2, 0  # protobuf wire types


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
    """Serialise one preprocessed sample as a ``tf.train.Example``.

    Args:
        sample_id: Oxford image stem.
        image: ``uint8`` array (H, W, 3).
        mask: ``uint8`` trimap array (H, W).
        sha256: the sample's :func:`sample_hash`.

    Returns:
        The serialised Example.
    """
    height, width = mask.shape
    features = {
        "id": sample_id.encode(),
        "image": np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
        "mask": np.ascontiguousarray(mask, dtype=np.uint8).tobytes(),
        "height": int(height),
        "width": int(width),
        "sha256": sha256.encode(),
    }
    entries = b"".join(_field(1, _field(1, name.encode()) + _field(2, _feature(value)))
                       for name, value in sorted(features.items()))
    return _field(1, entries)  # Example.features (Features.feature is a map: one entry per feature)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _feature(value: bytes | int) -> bytes:
    if isinstance(value, int):  # Feature.int64_list (3) -> Int64List.value (1), packed
        return _field(3, _field(1, _varint(value)))
    return _field(1, _field(1, value))  # Feature.bytes_list (1) -> BytesList.value (1)


def _fields(data: bytes, where: str) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message with varint and length-delimited fields."""
    position = 0
    while position < len(data):
        key, position = _read_varint(data, position, where)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _read_varint(data, position, where)
        elif wire_type == _LEN:
            length, position = _read_varint(data, position, where)
            value, position = data[position:position + length], position + length
            if position > len(data):
                raise DataError(f"{where}: a field runs past the end of the record")
        else:
            raise DataError(f"{where}: unexpected protobuf wire type {wire_type}")
        yield number, value


def _read_varint(data: bytes, position: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while position < len(data):
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    raise DataError(f"{where}: a number runs past the end of the record")


def _parse_example(record: bytes, where: str = "record") -> dict[str, bytes | int]:
    """The first value of each bytes or int64 feature of a serialised Example."""
    features = {}
    for number, message in _fields(record, where):
        if number != 1:
            continue
        for entry_number, entry in _fields(message, where):
            if entry_number != 1:
                continue
            parts = dict(_fields(entry, where))
            name, feature = parts.get(1, b"").decode(), parts.get(2, b"")
            for kind, values in _fields(feature, where):
                if kind == 1:  # BytesList: repeated bytes value = 1
                    features[name] = next(v for n, v in _fields(values, where) if n == 1)
                elif kind == 3:  # Int64List: value = 1, packed or not
                    _, value = next(_fields(values, where))
                    features[name] = value if isinstance(value, int) else _read_varint(value, 0, where)[0]
    return features


def decode(record: bytes) -> dict:
    """Parse one record back into numpy arrays.

    Args:
        record: bytes written by :func:`encode`.

    Returns:
        ``{"id": str, "image": uint8 (H, W, 3), "mask": uint8 (H, W), "sha256": str}``.

    Raises:
        DataError: the record is not an Example with those features.
    """
    feature = _parse_example(record)
    missing = [name for name in ("id", "image", "mask", "height", "width", "sha256") if name not in feature]
    if missing:
        raise DataError(f"record lacks feature(s) {', '.join(missing)}: not a petseg shard record")
    height, width = feature["height"], feature["width"]
    return {
        "id": feature["id"].decode(),
        "image": np.frombuffer(feature["image"], dtype=np.uint8).reshape(height, width, 3),
        "mask": np.frombuffer(feature["mask"], dtype=np.uint8).reshape(height, width),
        "sha256": feature["sha256"].decode(),
    }


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def frame(record: bytes) -> bytes:
    """One record in the TFRecord framing: length, its masked CRC-32C, the bytes, their masked CRC-32C."""
    length = struct.pack("<Q", len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


def read_records(paths: Iterable[str | Path]) -> Iterator[bytes]:
    """Stream the records of shard files, in the order given, checking every CRC.

    Args:
        paths: shard files.

    Yields:
        Serialised records.

    Raises:
        DataError: a shard is missing, truncated or corrupt.
    """
    for path in paths:
        try:
            with open(path, "rb") as file:
                yield from _records(file, path)
        except OSError as exc:
            raise DataError(f"{path}: cannot read shard ({exc.strerror or exc}); "
                            "expected a TFRecord file written by petseg") from None


def _records(file, path) -> Iterator[bytes]:
    index = 0
    while header := file.read(12):
        length = header[:8]
        if len(header) < 12 or header[8:] != _masked_crc(length):
            raise DataError(f"{path}: cannot read shard (record {index}: corrupt or truncated length); "
                            "expected a TFRecord file written by petseg")
        (size,) = struct.unpack("<Q", length)
        record, crc = file.read(size), file.read(4)
        if len(record) < size or crc != _masked_crc(record):
            raise DataError(f"{path}: cannot read shard (record {index}: corrupt or truncated data); "
                            "expected a TFRecord file written by petseg")
        yield record
        index += 1


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
        self._file = None

    def write(self, record: bytes) -> None:
        """Append one serialised record, starting a new file when the current one is full."""
        if self.count % self.shard_size == 0:
            self.close()
            self.directory.mkdir(parents=True, exist_ok=True)
            self.names.append(f"{self.prefix}-{len(self.names):05d}.tfrecord")
            self._file = open(self.directory / self.names[-1], "wb")
        self._file.write(frame(record))
        self.count += 1

    def close(self) -> None:
        """Flush and close the current file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
