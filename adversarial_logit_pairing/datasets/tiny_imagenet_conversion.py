"""Converts the raw Tiny ImageNet folder into ``train.tfrecord``, ``validation.tfrecord`` and
``test.tfrecord`` (the layout of the original ``tiny_imagenet_converter``).

Input folder (as unpacked from tiny-imagenet-200.zip)::

  wnids.txt                                one wnid per line; label = line index (0..199)
  train/<wnid>/<wnid>_boxes.txt            file<TAB>x1<TAB>y1<TAB>x2<TAB>y2
  train/<wnid>/images/<file>
  val/val_annotations.txt                  file<TAB>wnid<TAB>x1<TAB>y1<TAB>x2<TAB>y2
  val/images/<file>
  test/images/<file>                       (no labels; optional)

Train and validation records: ``image/encoded`` (the file's bytes as they are),
``image/format`` ('jpeg' or 'png', from the file name), ``label/wnid``,
``label/tiny_imagenet`` (0..199), ``label/imagenet`` (1..1000, only with a synsets file) and
``bbox/{xmin,ymin,xmax,ymax}`` (int pixels). Test records: image and format only.

Every image is decoded once before it is written, so a broken file is reported by name (and
annotation line) instead of failing a training run days later. The three outputs are
written under temporary names and renamed together at the end; on any error none is left.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random

import pandas as pd
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import tf_error_text
from adversarial_logit_pairing.datasets import tfrecord_files
from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET
from adversarial_logit_pairing.datasets.wnid_lists import class_folders, read_wnid_list
from adversarial_logit_pairing.errors import ConfigError, DataError, MissingDataError
from adversarial_logit_pairing.progress import ProgressLog

# Fixed so that a rerun writes the same train.tfrecord (the original used an unseeded shuffle).
SHUFFLE_SEED = 12345
OUTPUT_FILES = {**TINY_IMAGENET.file_patterns, "test": "test.tfrecord"}
_BOX_COLUMNS = ["x1", "y1", "x2", "y2"]


@dataclasses.dataclass(frozen=True)
class AnnotatedImage:
    """One image file, where it was listed (for error messages), its class and box."""

    path: str
    source: str
    wnid: str | None = None
    box: tuple[int, int, int, int] | None = None


def read_annotations(annotations_file: str, images_dir: str,
                     class_wnid: str | None = None) -> list[AnnotatedImage]:
    """Reads one tab-separated annotation file (no header) with pandas.

    Args:
      annotations_file: ``<wnid>_boxes.txt`` (columns file, x1, y1, x2, y2) if
        ``class_wnid`` is given, else ``val_annotations.txt`` (file, wnid, x1, y1, x2, y2).
      images_dir: folder of the listed files.
      class_wnid: the class of every row of a training boxes file.

    Raises:
      MissingDataError: the annotation file or a listed image does not exist.
      DataError: a row has the wrong number of fields, a non-integer coordinate or an
        image name that is not .jpeg/.jpg/.png.
    """
    if not tf.io.gfile.exists(annotations_file):
        raise MissingDataError(f"{annotations_file}: no such annotation file")
    columns = ["filename"] + ([] if class_wnid else ["wnid"]) + _BOX_COLUMNS
    try:
        with tf.io.gfile.GFile(annotations_file, "r") as f:
            # Everything as text and blank lines kept, so that row i is line i + 1 and a
            # value such as 'NA' stays a string.
            table = pd.read_csv(f, sep="\t", header=None, names=columns, dtype=str,
                                keep_default_na=False, skip_blank_lines=False,
                                quoting=csv.QUOTE_NONE, index_col=False)
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as exc:
        raise DataError(f"{annotations_file}: {_parser_reason(exc)}") from None
    images = []
    for row_index, row in enumerate(table.itertuples(index=False)):
        source = f"{annotations_file}, line {row_index + 1}"
        values = [str(value).strip() for value in row]
        if not any(values):
            continue
        if not all(values):
            raise DataError(f"{source}: expected {len(columns)} tab-separated fields "
                            f"({', '.join(columns)})")
        fields = dict(zip(columns, values))
        try:
            x1, y1, x2, y2 = (int(fields[key]) for key in _BOX_COLUMNS)
        except ValueError:
            raise DataError(f"{source}: box coordinates must be integers, got "
                            f"{' '.join(fields[key] for key in _BOX_COLUMNS)}") from None
        image = AnnotatedImage(os.path.join(images_dir, fields["filename"]), source,
                               class_wnid or fields["wnid"], (x1, y1, x2, y2))
        if not tf.io.gfile.exists(image.path):
            raise MissingDataError(f"{source}: image {image.path} does not exist")
        image_format(image)
        images.append(image)
    return images


def read_training_annotations(train_dir: str, wnids: list[str]) -> list[AnnotatedImage]:
    """Images of every class folder ``train/<wnid>/`` (sorted by wnid, then file order).

    Folders whose names do not start with 'n' are skipped with a warning, as the original
    did; wnids without a folder (a smaller copy) are allowed.

    Raises:
      MissingDataError: no train folder, or a class folder without its boxes file.
      DataError: a class folder whose wnid is not in wnids.txt, or a bad annotation.
    """
    if not tf.io.gfile.isdir(train_dir):
        raise MissingDataError(f"{train_dir}: no such directory (training images)")
    known = set(wnids)
    images = []
    for name, folder in class_folders(train_dir):
        if not name.startswith("n"):
            logging.warning("Skipping %s: not a class folder (wnids start with 'n')", folder)
            continue
        if name not in known:
            raise DataError(f"{folder}: class folder {name} is not listed in wnids.txt")
        boxes_file = os.path.join(folder, f"{name}_boxes.txt")
        if not tf.io.gfile.exists(boxes_file):
            raise MissingDataError(f"{boxes_file}: missing boxes file of class folder "
                                   f"{folder}")
        images.extend(read_annotations(boxes_file, os.path.join(folder, "images"), name))
    if not images:
        raise MissingDataError(f"{train_dir}: no training image in any class folder")
    return images


def read_validation_annotations(val_dir: str, wnids: list[str]) -> list[AnnotatedImage]:
    """Images listed in ``val/val_annotations.txt``, in file order.

    Raises:
      MissingDataError: the annotation file or a listed image is missing.
      DataError: a bad row, or a wnid that is not in wnids.txt.
    """
    images = read_annotations(os.path.join(val_dir, "val_annotations.txt"),
                              os.path.join(val_dir, "images"))
    known = set(wnids)
    for image in images:
        if image.wnid not in known:
            raise DataError(f"{image.source}: wnid {image.wnid} is not listed in wnids.txt")
    return images


def read_test_images(test_dir: str) -> list[AnnotatedImage] | None:
    """Image files of ``test/images`` in sorted order; None if the folder does not exist."""
    images_dir = os.path.join(test_dir, "images")
    if not tf.io.gfile.isdir(images_dir):
        return None
    images = []
    for name in sorted(tf.io.gfile.listdir(images_dir)):
        path = os.path.join(images_dir, name)
        if tf.io.gfile.isdir(path):
            continue
        if _format_from_name(name) is None:
            logging.warning("Skipping %s: not a .jpeg/.jpg/.png file", path)
            continue
        images.append(AnnotatedImage(path, path))
    return images


def image_format(image: AnnotatedImage) -> str:
    """'jpeg' or 'png' from the file name, as the original decided it.

    Raises:
      DataError: any other extension.
    """
    fmt = _format_from_name(image.path)
    if fmt is None:
        raise DataError(f"{image.source}: {image.path} is neither .jpeg/.jpg nor .png")
    return fmt


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _decoded_shape(data: tf.Tensor) -> tf.Tensor:
    return tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False))


def check_decodes(data: bytes, image: AnnotatedImage) -> None:
    """Raises DataError naming the image (and its annotation line) if it does not decode."""
    try:
        _decoded_shape(tf.constant(data))
    except tf.errors.OpError as exc:
        where = "" if image.source == image.path else f" (listed in {image.source})"
        raise DataError(f"{image.path}{where}: cannot decode image "
                        f"({tf_error_text.reason(exc)})") from None


def tiny_imagenet_record(image: AnnotatedImage, data: bytes, tiny_labels: dict[str, int],
                         imagenet_labels: dict[str, int] | None) -> bytes:
    """Serialized Example of one image, with the original converter's features."""
    f = tfrecord_files
    features = {
        "image/encoded": f.bytes_feature(data),
        "image/format": f.bytes_feature(image_format(image)),
    }
    if image.wnid is not None and image.box is not None:
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), image.box):
            features[f"bbox/{key}"] = f.int64_feature(value)
        features["label/wnid"] = f.bytes_feature(image.wnid)
        features["label/tiny_imagenet"] = f.int64_feature(tiny_labels[image.wnid])
        if imagenet_labels is not None:
            features["label/imagenet"] = f.int64_feature(imagenet_labels[image.wnid])
    return f.make_example(features)


def convert_tiny_imagenet(input_dir: str, output_dir: str,
                          imagenet_synsets_path: str | None = None) -> dict[str, int]:
    """Converts the Tiny ImageNet folder ``input_dir`` into TFRecords in ``output_dir``.

    All annotations are read and checked first; then the images are read, decode-checked
    and written. Training examples are shuffled with a fixed seed.

    Returns:
      Number of records written per split ('train', 'validation' and, if test/images
      exists, 'test').

    Raises:
      ConfigError: a missing flag.
      MissingDataError: a missing input file or folder (the message names it).
      DataError: a malformed annotation (file and line), an undecodable image, an unknown
        wnid, or an output directory that cannot be written.
    """
    if not input_dir:
        raise ConfigError("--input_dir has to be provided")
    if not output_dir:
        raise ConfigError("--output_dir has to be provided")
    if not tf.io.gfile.isdir(input_dir):
        raise MissingDataError(f"--input_dir={input_dir}: no such directory")
    wnids = read_wnid_list(os.path.join(input_dir, "wnids.txt"), "the Tiny ImageNet classes")
    tiny_labels = {wnid: index for index, wnid in enumerate(wnids)}
    imagenet_labels = None
    if imagenet_synsets_path:
        synsets = read_wnid_list(imagenet_synsets_path, "--imagenet_synsets_path")
        imagenet_labels = {wnid: index + 1 for index, wnid in enumerate(synsets)}
        missing = [wnid for wnid in wnids if wnid not in imagenet_labels]
        if missing:
            raise DataError(f"{imagenet_synsets_path}: {len(missing)} wnids of wnids.txt are "
                            f"not ImageNet synsets (e.g. {missing[0]})")

    splits: dict[str, list[AnnotatedImage]] = {
        "train": read_training_annotations(os.path.join(input_dir, "train"), wnids),
        "validation": read_validation_annotations(os.path.join(input_dir, "val"), wnids),
    }
    random.Random(SHUFFLE_SEED).shuffle(splits["train"])
    test_images = read_test_images(os.path.join(input_dir, "test"))
    if test_images is None:
        logging.warning("No %s folder: writing no test.tfrecord",
                        os.path.join(input_dir, "test", "images"))
    else:
        splits["test"] = test_images

    try:
        tf.io.gfile.makedirs(output_dir)
    except (tf.errors.OpError, OSError) as exc:
        raise DataError(f"--output_dir={output_dir}: cannot create it ({exc})") from None
    pending: list[tfrecord_files.PendingRecordFile] = []
    try:
        for split, images in splits.items():
            output = tfrecord_files.PendingRecordFile(
                os.path.join(output_dir, OUTPUT_FILES[split]))
            pending.append(output)
            logging.info("Converting %d %s images", len(images), split)
            progress = ProgressLog(OUTPUT_FILES[split], len(images))
            for image in images:
                with tf.io.gfile.GFile(image.path, "rb") as f:
                    data = f.read()
                check_decodes(data, image)
                output.write(tiny_imagenet_record(image, data, tiny_labels, imagenet_labels))
                progress.update()
            output.close()
        tfrecord_files.commit_all(pending)
    except BaseException:
        tfrecord_files.discard_all(pending)
        raise
    logging.info("All files are converted into %s", output_dir)
    return {split: len(images) for split, images in splits.items()}


def _format_from_name(filename: str) -> str | None:
    name = filename.lower()
    if name.endswith((".jpeg", ".jpg")):
        return "jpeg"
    if name.endswith(".png"):
        return "png"
    return None


def _parser_reason(exc: Exception) -> str:
    """pandas' message, which names the line ('Expected 5 fields in line 3, saw 6')."""
    text = str(exc).strip()
    return text.replace("Error tokenizing data. C error: ", "")
