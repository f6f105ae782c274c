"""Bird-or-bicycle data: the challenge's folder layout and its TFRecord form.

The Unrestricted Adversarial Examples challenge ships its data as JPEG files in
``<data_dir>/<split>/{bicycle,bird}/<image id>.jpg`` (splits ``train``, ``test``, ``extras``;
bicycle = 0, bird = 1, the alphabetical order of the class folders). Its evaluation resized
each image so that the short side is 224 (bilinear, anti-aliased) and scaled pixels to [0, 1];
the readers here do the same and crop the centre square, which changes nothing for the
dataset's square images.

A split converted by :func:`write_tfrecord` lives in ``<data_dir>/<split>.tfrecord`` with the
features below; :func:`iterate_split` reads whichever of the two forms is present.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import atomic_files, tf_error_text
from adversarial_logit_pairing.datasets import tfrecord_files
from adversarial_logit_pairing.errors import DataError, MissingDataError
from adversarial_logit_pairing.progress import ProgressLog

CLASS_NAMES = ("bicycle", "bird")
BICYCLE, BIRD = 0, 1
SPLITS = ("train", "test", "extras")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_IMAGE_SIZE = 224

FEATURE_ENCODED = "image/encoded"
FEATURE_FORMAT = "image/format"
FEATURE_ID = "image/id"
FEATURE_LABEL = "image/class/label"
FEATURE_TEXT = "image/class/text"

_FEATURES = {
    FEATURE_ENCODED: tf.io.FixedLenFeature([], tf.string),
    FEATURE_ID: tf.io.FixedLenFeature([], tf.string, default_value=b""),
    FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One image file of the folder layout."""

    path: str
    label: int
    image_id: str


@dataclasses.dataclass
class Batch:
    """Decoded images [B, S, S, 3] float32 in [0, 1], labels [B] int64, and image ids."""

    images: np.ndarray
    labels: np.ndarray
    image_ids: list


def split_dir(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, split)


def tfrecord_path(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, f"{split}.tfrecord")


def list_examples(data_dir: str, split: str) -> list[Example]:
    """Lists ``<data_dir>/<split>/{bicycle,bird}/*.{jpg,jpeg,png}``, sorted, bicycles first.

    Raises:
      MissingDataError: the split folder or one of its two class folders does not exist.
      DataError: a class folder holds no image.
    """
    root = split_dir(data_dir, split)
    if not os.path.isdir(root):
        raise MissingDataError(f"split folder {root} does not exist (expected the challenge "
                               "layout <data_dir>/<split>/{bicycle,bird}/*.jpg)")
    present = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    missing = [name for name in CLASS_NAMES if name not in present]
    if missing:
        raise MissingDataError(
            f"{root} lacks the class folder(s) {', '.join(m + '/' for m in missing)}: a "
            "bird-or-bicycle split "
            f"holds exactly bicycle/ and bird/ (found: {', '.join(present) or 'no folders'})"
        )
    extra = [name for name in present if name not in CLASS_NAMES]
    if extra:
        logging.warning("Ignoring folders %s in %s: not a bird-or-bicycle class", extra, root)
    examples = []
    for label, name in enumerate(CLASS_NAMES):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"class folder {folder} holds no .jpg/.jpeg/.png image")
        examples += [Example(os.path.join(folder, f), label, os.path.splitext(f)[0])
                     for f in files]
    return examples


def _in_seeded_order(examples: list[Example], seed: Optional[int]) -> list[Example]:
    """A seeded permutation of ``examples`` (None: as they are), mixing the two classes."""
    if seed is None:
        return examples
    return [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))]


def image_format(encoded: bytes) -> str:
    """'jpeg' or 'png' from the file's magic bytes; '' for anything else."""
    if encoded[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if encoded[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return ""


def resize_like_challenge(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Short side to ``image_size`` (bilinear, anti-aliased, as PIL), then the centre square."""
    shape = tf.shape(image)
    height, width = int(shape[0]), int(shape[1])
    if (height, width) != (image_size, image_size):
        if height <= width:
            new_h, new_w = image_size, max(image_size, int(image_size * width / height))
        else:
            new_h, new_w = max(image_size, int(image_size * height / width)), image_size
        if (new_h, new_w) != (height, width):
            image = tf.image.resize(image, [new_h, new_w], method="bilinear", antialias=True)
        top = int(round((new_h - image_size) / 2.0))
        left = int(round((new_w - image_size) / 2.0))
        image = image[top:top + image_size, left:left + image_size]
    return tf.clip_by_value(image, 0.0, 1.0)


def decode_image(encoded: bytes, image_size: int, source: str) -> np.ndarray:
    """Decodes JPEG/PNG bytes to a float32 [image_size, image_size, 3] array in [0, 1].

    Raises:
      DataError: the bytes are not a decodable JPEG or PNG image; the message names ``source``.
    """
    image = tf.image.convert_image_dtype(_decode(encoded, source), tf.float32)
    return resize_like_challenge(image, image_size).numpy()


def _decode(encoded: bytes, source: str) -> tf.Tensor:
    if not image_format(encoded):
        raise DataError(f"{source}: not a JPEG or PNG image ({len(encoded)} bytes starting "
                        f"with {encoded[:8]!r})")
    try:
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
        raise DataError(f"{source}: cannot decode the image: {tf_error_text.reason(exc)}") from None


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc.strerror or exc}") from None


def _batched(items: Iterable[tuple[np.ndarray, int, str]], batch_size: int) -> Iterator[Batch]:
    images, labels, ids = [], [], []
    for image, label, image_id in items:
        images.append(image)
        labels.append(label)
        ids.append(image_id)
        if len(images) == batch_size:
            yield Batch(np.stack(images), np.asarray(labels, np.int64), ids)
            images, labels, ids = [], [], []
    if images:
        yield Batch(np.stack(images), np.asarray(labels, np.int64), ids)


def _tfrecord_records(path: str) -> Iterator[tuple[int, dict]]:
    try:
        for index, serialized in enumerate(tf.data.TFRecordDataset(path)):
            try:
                parsed = tf.io.parse_single_example(serialized, _FEATURES)
            except tf.errors.InvalidArgumentError as exc:
                raise DataError(f"{path}, record {index}: not a bird-or-bicycle example "
                                f"({tf_error_text.reason(exc)})") from None
            yield index, parsed
    except tf.errors.DataLossError as exc:
        raise DataError(f"{path}: corrupted TFRecord file ({tf_error_text.reason(exc)})") from None


def find_split(data_dir: str, split: str) -> tuple[str, str]:
    """Where a split is: ('folder', <split dir>) or ('tfrecord', <data_dir>/<split>.tfrecord).

    Raises:
      MissingDataError: neither exists.
    """
    if not os.path.isdir(data_dir):
        raise MissingDataError(f"data directory {data_dir} does not exist")
    if os.path.isdir(split_dir(data_dir, split)):
        return "folder", split_dir(data_dir, split)
    if os.path.isfile(tfrecord_path(data_dir, split)):
        return "tfrecord", tfrecord_path(data_dir, split)
    raise MissingDataError(f"split '{split}' not found: neither the folder "
                           f"{split_dir(data_dir, split)}/{{bicycle,bird}}/ nor the file "
                           f"{tfrecord_path(data_dir, split)} exists")


def count_examples(data_dir: str, split: str, num_examples: int = -1) -> int:
    """Number of examples :func:`iterate_split` yields with the same arguments."""
    kind, path = find_split(data_dir, split)
    if kind == "folder":
        total = len(list_examples(data_dir, split))
    else:
        total = sum(1 for _ in tf.data.TFRecordDataset(path))
    return total if num_examples < 0 else min(total, num_examples)


def iterate_split(
    data_dir: str,
    split: str,
    batch_size: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_examples: int = -1,
    shuffle_seed: Optional[int] = 0,
) -> Iterator[Batch]:
    """Batches of a split in the folder layout or as ``<split>.tfrecord``.

    Args:
      data_dir: directory holding ``<split>/{bicycle,bird}/`` or ``<split>.tfrecord``.
      split: 'train', 'test', 'extras' (any folder name is accepted).
      batch_size: examples per batch; the last batch may be smaller.
      image_size: side of the square images yielded (the challenge used 224).
      num_examples: < 0 for the whole split, else the first that many examples.
      shuffle_seed: folder layout only: a seeded permutation of the sorted files, so that a
        ``num_examples`` subset mixes both classes; None keeps the sorted order. TFRecords are
        read in their stored order (the converter shuffles them).

    Raises:
      MissingDataError: the split or a class folder is missing.
      DataError: an unreadable image (named by its file, or TFRecord file and record index).
    """
    kind, path = find_split(data_dir, split)
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")

    def from_folder():
        examples = _in_seeded_order(list_examples(data_dir, split), shuffle_seed)
        if num_examples >= 0:
            examples = examples[:num_examples]
        for ex in examples:
            yield decode_image(_read_file(ex.path), image_size, ex.path), ex.label, ex.image_id

    def from_tfrecord():
        for index, parsed in _tfrecord_records(path):
            if 0 <= num_examples <= index:
                return
            label = int(parsed[FEATURE_LABEL])
            if label not in (BICYCLE, BIRD):
                raise DataError(f"{path}, record {index}: label {label} is not 0 (bicycle) or "
                                "1 (bird)")
            image = decode_image(parsed[FEATURE_ENCODED].numpy(), image_size,
                                 f"{path}, record {index}")
            image_id = parsed[FEATURE_ID].numpy().decode("utf8") or str(index)
            yield image, label, image_id

    yield from _batched(from_folder() if kind == "folder" else from_tfrecord(), batch_size)


def make_tf_example(encoded: bytes, label: int, image_id: str) -> bytes:
    """A serialized TFRecord example of one image (the original file bytes, not re-encoded)."""
    return tfrecord_files.make_example({
        FEATURE_ENCODED: tfrecord_files.bytes_feature(encoded),
        FEATURE_FORMAT: tfrecord_files.bytes_feature(image_format(encoded)),
        FEATURE_ID: tfrecord_files.bytes_feature(image_id),
        FEATURE_LABEL: tfrecord_files.int64_feature(label),
        FEATURE_TEXT: tfrecord_files.bytes_feature(CLASS_NAMES[label]),
    })


def write_tfrecord(data_dir: str, split: str, output_path: str,
                   shuffle_seed: Optional[int] = 0) -> int:
    """Converts one split of the folder layout to a TFRecord file.

    Every image is decoded once, so that an unreadable file fails the conversion (naming the
    file) instead of a later evaluation. The file appears only when complete.

    Args:
      data_dir: directory holding ``<split>/{bicycle,bird}/``.
      split: the split to convert.
      output_path: the TFRecord file to write.
      shuffle_seed: seeded permutation of the examples (None: sorted, bicycles first), so that
        the first N records of the file mix both classes.

    Returns:
      The number of examples written.

    Raises:
      MissingDataError, DataError: as :func:`list_examples` and :func:`decode_image`.
    """
    examples = _in_seeded_order(list_examples(data_dir, split), shuffle_seed)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    progress = ProgressLog(split, len(examples), every_n=1000)
    with atomic_files.staged(output_path) as staging, tf.io.TFRecordWriter(staging) as writer:
        for ex in examples:
            encoded = _read_file(ex.path)
            _decode(encoded, ex.path)
            writer.write(make_tf_example(encoded, ex.label, ex.image_id))
            progress.update()
    return len(examples)
