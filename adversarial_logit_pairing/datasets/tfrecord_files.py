"""Writing TFRecord files safely, building their examples, and counting their records.

A converter writes every output under a hidden temporary name in the output directory
(:mod:`adversarial_logit_pairing.atomic_files`) and renames it only once the whole output is
complete, so an interrupted or failed run never leaves a file that the input pipelines would
take for finished data (their patterns ``train-*`` / ``train.tfrecord`` never match a name
starting with '.').
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence

import tensorflow as tf

from adversarial_logit_pairing import atomic_files, tf_error_text
from adversarial_logit_pairing.errors import DataError

# TFRecord framing: uint64 length, uint32 masked CRC of the length, data, uint32 CRC of data.
_LENGTH_BYTES = 8
_CRC_BYTES = 4


def bytes_feature(values: bytes | str | Sequence[bytes | str]) -> tf.train.Feature:
    """A bytes_list feature; str values are UTF-8 encoded."""
    if isinstance(values, (bytes, str)):
        values = [values]
    return tf.train.Feature(bytes_list=tf.train.BytesList(
        value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))


def int64_feature(values: int | Sequence[int]) -> tf.train.Feature:
    """An int64_list feature."""
    if isinstance(values, int):
        values = [values]
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def float_feature(values: float | Sequence[float]) -> tf.train.Feature:
    """A float_list feature."""
    if isinstance(values, (int, float)):
        values = [values]
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def make_example(features: dict[str, tf.train.Feature]) -> bytes:
    """Serialized tf.train.Example with the given features."""
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


class PendingRecordFile:
    """A TFRecord file written under a temporary name; ``commit()`` gives it its real name.

    Opening the temporary file happens in the constructor, so an unwritable output
    directory is reported before any expensive work starts.
    """

    def __init__(self, path: str, flag: str = "--output_dir"):
        self.path = path
        directory, name = os.path.split(path)
        self.temp_path = atomic_files.sibling_name(path)
        self.num_records = 0
        try:
            self._writer: tf.io.TFRecordWriter | None = tf.io.TFRecordWriter(self.temp_path)
        except (tf.errors.OpError, OSError) as exc:
            raise DataError(f"{flag}={directory}: cannot write {name} there "
                            f"({tf_error_text.reason(exc)})") from None

    def write(self, serialized: bytes) -> None:
        """Appends one serialized record."""
        assert self._writer is not None, "write() after close()"
        self._writer.write(serialized)
        self.num_records += 1

    def close(self) -> None:
        """Flushes and closes the temporary file (it keeps its temporary name)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self) -> None:
        """Closes the file and renames it to its final name (replacing an older file)."""
        self.close()
        atomic_files.publish(self.temp_path, self.path)

    def discard(self) -> None:
        """Closes and deletes the temporary file; safe to call more than once."""
        try:
            self.close()
        except (tf.errors.OpError, OSError):
            pass
        atomic_files.discard(self.temp_path)


def commit_all(files: Iterable[PendingRecordFile]) -> None:
    """Renames all files to their final names (after all of them were written)."""
    for pending in files:
        pending.commit()


def discard_all(files: Iterable[PendingRecordFile]) -> None:
    """Deletes the temporary files of all given outputs."""
    for pending in files:
        pending.discard()


def count_records_in_file(path: str) -> int:
    """Number of records in one TFRecord file, found by walking the record framing.

    Only the 8-byte length headers are read, so counting is fast even for large shards.

    Raises:
      DataError: the file ends in the middle of a record (a truncated copy).
    """
    size = tf.io.gfile.stat(path).length
    count = 0
    position = 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while position < size:
            f.seek(position)
            header = f.read(_LENGTH_BYTES)
            if len(header) < _LENGTH_BYTES:
                break
            (length,) = struct.unpack("<Q", header)
            position += _LENGTH_BYTES + _CRC_BYTES + length + _CRC_BYTES
            count += 1
    if position != size:
        raise DataError(f"{path}: truncated TFRecord file (record {count - 1} is incomplete)")
    return count
