"""Converts raw ImageNet folders into TF-Slim TFRecord shards (``train-00000-of-01024``, ...).

TF-Slim's ``build_imagenet_data.py`` (TF1, Python 2) no longer runs; this module writes the
same record layout from the same inputs:

- training images in ``train_dir/<wnid>/*.JPEG``;
- validation images in one flat folder, labelled by a text file with one wnid per line, line
  i for ``ILSVRC2012_val_<i>.JPEG`` (TF-Slim's ``imagenet_2012_validation_synset_labels.txt``);
- ``labels_file``: the 1000 challenge wnids, label = line index + 1 (0 is the background);
- optionally the ImageNet bounding-box XML folder and ``wnid<TAB>text`` metadata.

Records: ``image/encoded`` (RGB JPEG), ``image/format`` 'JPEG', ``image/colorspace`` 'RGB',
``image/channels`` 3, ``image/height``, ``image/width``, ``image/filename``,
``image/class/{label,synset,text}``, ``image/object/bbox/{xmin,ymin,xmax,ymax}`` (relative,
clipped to [0, 1]) and ``image/object/bbox/label``.

Unlike TF-Slim, which fixed a hard-coded list of one PNG and 22 CMYK files, every image is
decoded and any that is not a 3-component JPEG (PNG, CMYK or greyscale JPEG, ...) is
re-encoded as an RGB JPEG at quality 100 without chroma subsampling; this also checks that
every image decodes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import re
import threading
import xml.etree.ElementTree as ElementTree

import numpy as np
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import tf_error_text
from adversarial_logit_pairing.datasets import tfrecord_files
from adversarial_logit_pairing.datasets.wnid_lists import (
    class_folders,
    read_lines,
    read_wnid_list,
)
from adversarial_logit_pairing.errors import ConfigError, DataError, MissingDataError
from adversarial_logit_pairing.progress import ProgressLog

# build_imagenet_data.py shuffled the file list with this seed before sharding.
SHUFFLE_SEED = 12345
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# Quality TF-Slim used when it re-encoded the PNG and CMYK images.
REENCODE_QUALITY = 100
_VALIDATION_NAME = re.compile(r"^ILSVRC2012_val_(\d+)\.", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """One image file to convert and its class."""

    path: str
    synset: str
    label: int


def read_synsets(labels_file: str) -> list[str]:
    """The challenge wnids of ``--labels_file``, one per line; label of line i is i + 1.

    Raises:
      MissingDataError: the file does not exist.
      DataError: a wnid appears twice, or the file is empty.
    """
    return read_wnid_list(labels_file, "--labels_file")


def read_metadata(metadata_file: str) -> dict[str, str]:
    """Human-readable class names from lines ``wnid<TAB>text``.

    Raises:
      MissingDataError: the file does not exist.
      DataError: a non-empty line without a tab.
    """
    texts = {}
    for number, line in enumerate(read_lines(metadata_file, "--imagenet_metadata_file"), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        wnid, tab, text = line.partition("\t")
        if not tab:
            raise DataError(f"{metadata_file}, line {number}: expected 'wnid<TAB>text'")
        texts[wnid.strip()] = text.strip()
    return texts


def find_training_images(train_dir: str, synsets: list[str]) -> list[SourceImage]:
    """Images of ``train_dir/<wnid>/`` for every wnid of the labels file, sorted by path.

    Class folders may be missing (a smaller copy of ImageNet); folders that are not
    challenge classes are ignored with a warning, as TF-Slim ignored them.

    Raises:
      MissingDataError: ``train_dir`` is missing or holds no image of any class.
    """
    if not tf.io.gfile.isdir(train_dir):
        raise MissingDataError(f"--train_dir={train_dir}: no such directory")
    labels = {wnid: index + 1 for index, wnid in enumerate(synsets)}
    images = []
    for name, folder in class_folders(train_dir):
        if name not in labels:
            logging.warning("Ignoring %s: %s is not in --labels_file", folder, name)
            continue
        images.extend(SourceImage(path, name, labels[name]) for path in _image_files(folder))
    if not images:
        raise MissingDataError(f"--train_dir={train_dir}: no image in any "
                               "<wnid>/ folder of a class in --labels_file")
    logging.info("Found %d training images of %d classes in %s", len(images),
                 len({image.synset for image in images}), train_dir)
    return images


def find_validation_images(validation_dir: str, validation_labels_file: str,
                           synsets: list[str]) -> list[SourceImage]:
    """Images of the flat ``validation_dir`` with their labels from the labels file.

    Line i (from 1) of the labels file is the wnid of ``ILSVRC2012_val_<i>.JPEG`` (how
    TF-Slim's preprocess_imagenet_validation_data.py read it), so any subset of the official
    files can be converted. Folders whose files are not named that way are labelled in
    sorted file-name order and must hold exactly one image per line.

    Raises:
      MissingDataError: a folder or file is missing, or the folder has no image.
      DataError: a wnid is not a challenge class, or images and lines do not match.
    """
    if not tf.io.gfile.isdir(validation_dir):
        raise MissingDataError(f"--validation_dir={validation_dir}: no such directory")
    labels = {wnid: index + 1 for index, wnid in enumerate(synsets)}
    lines = read_lines(validation_labels_file, "--validation_labels_file")
    wnids = []
    for number, line in enumerate(lines, start=1):
        wnid = line.strip()
        if wnid not in labels:
            raise DataError(f"{validation_labels_file}, line {number}: '{wnid}' is not a "
                            "wnid of --labels_file")
        wnids.append(wnid)
    paths = _image_files(validation_dir)
    if not paths:
        raise MissingDataError(f"--validation_dir={validation_dir}: no image files")
    numbers = [_VALIDATION_NAME.match(os.path.basename(path)) for path in paths]
    if all(numbers):
        line_of = [int(match.group(1)) for match in numbers if match]
    else:
        if len(paths) != len(wnids):
            raise DataError(
                f"{validation_labels_file}: {len(wnids)} labels for {len(paths)} images in "
                f"--validation_dir={validation_dir} (files not named ILSVRC2012_val_<n> "
                "are labelled in sorted order, one line each)")
        line_of = list(range(1, len(paths) + 1))
    images = []
    for path, line in zip(paths, line_of):
        if not 1 <= line <= len(wnids):
            raise DataError(f"{path}: image number {line} but {validation_labels_file} has "
                            f"only {len(wnids)} lines")
        wnid = wnids[line - 1]
        images.append(SourceImage(path, wnid, labels[wnid]))
    logging.info("Found %d validation images in %s", len(images), validation_dir)
    return images


def index_box_files(bounding_box_dir: str) -> dict[str, str]:
    """Maps an image's name without extension to its XML annotation file.

    Accepts the layout of the ImageNet downloads: ``<dir>/<wnid>/<image>.xml`` (training
    boxes) and ``<dir>/<image>.xml`` (validation boxes).

    Raises:
      MissingDataError: the directory does not exist.
    """
    if not tf.io.gfile.isdir(bounding_box_dir):
        raise MissingDataError(f"--bounding_box_dir={bounding_box_dir}: no such directory")
    paths = (tf.io.gfile.glob(os.path.join(bounding_box_dir, "*.xml"))
             + tf.io.gfile.glob(os.path.join(bounding_box_dir, "*", "*.xml")))
    logging.info("Found %d bounding-box files in %s", len(paths), bounding_box_dir)
    return {os.path.splitext(os.path.basename(path))[0]: path for path in paths}


def read_object_boxes(xml_path: str, synset: str,
                      challenge_synsets: frozenset[str] | set[str]) -> list[tuple[float, ...]]:
    """Relative boxes (xmin, ymin, xmax, ymax) of one ImageNet XML annotation.

    As TF-Slim's process_bounding_boxes.py: coordinates are divided by the size stored in
    the XML (the size shown to the annotator, which can differ from the file's), min/max are
    put in order, clipped to [0, 1]; empty boxes are dropped, and so are boxes labelled with
    another challenge class than the image's (non-wnid names, a known defect of the dog
    annotations, are kept).

    Raises:
      DataError: the XML cannot be parsed or lacks a positive size or a coordinate.
    """
    try:
        with tf.io.gfile.GFile(xml_path, "rb") as f:
            root = ElementTree.fromstring(f.read())
        width = float(root.findtext("size/width", ""))
        height = float(root.findtext("size/height", ""))
    except (ElementTree.ParseError, ValueError) as exc:
        raise DataError(f"{xml_path}: not a valid ImageNet box annotation ({exc})") from None
    if width <= 0 or height <= 0:
        raise DataError(f"{xml_path}: image size {width:g}x{height:g} is not positive")
    boxes = []
    for number, obj in enumerate(root.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if name != synset and name in challenge_synsets:
            continue
        try:
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{key}", ""))
                              for key in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DataError(f"{xml_path}: object {number} lacks a numeric bndbox "
                            "xmin/ymin/xmax/ymax") from None
        xmin, xmax = (_clip01(v / width) for v in sorted((x1, x2)))
        ymin, ymax = (_clip01(v / height) for v in sorted((y1, y2)))
        if xmin >= xmax or ymin >= ymax:
            continue
        boxes.append((xmin, ymin, xmax, ymax))
    return boxes


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _rgb_jpeg(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(RGB JPEG bytes, image shape, whether re-encoded) of any encoded image."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    components = tf.cond(tf.io.is_jpeg(data),
                         lambda: tf.image.extract_jpeg_shape(data)[2],
                         lambda: tf.constant(0, tf.int32))
    keep = tf.equal(components, 3)
    encoded = tf.cond(
        keep, lambda: data,
        # Full-resolution chroma: CMYK and PNG sources have no subsampled colour to begin
        # with, and these images are rare enough that their size does not matter.
        lambda: tf.io.encode_jpeg(image, format="rgb", quality=REENCODE_QUALITY,
                                  chroma_downsampling=False))
    return encoded, tf.shape(image), tf.logical_not(keep)


def encode_as_rgb_jpeg(data: bytes, name: str) -> tuple[bytes, int, int]:
    """Returns (RGB JPEG bytes, height, width): the bytes as they are for a 3-component JPEG,
    re-encoded for a PNG, greyscale or CMYK JPEG, GIF or BMP.

    Raises:
      DataError: the bytes do not decode as an image (the message names ``name``).
    """
    try:
        encoded, shape, reencoded = _rgb_jpeg(tf.constant(data))
    except tf.errors.OpError as exc:
        raise DataError(f"{name}: cannot decode image ({tf_error_text.reason(exc)})") from None
    if bool(reencoded):
        logging.info("Re-encoded %s as an RGB JPEG", name)
    return bytes(encoded.numpy()), int(shape[0]), int(shape[1])


def image_record(image: SourceImage, human_text: str,
                 boxes: list[tuple[float, ...]]) -> bytes:
    """Reads, checks and converts one image; returns its serialized TF-Slim Example."""
    try:
        with tf.io.gfile.GFile(image.path, "rb") as f:
            data = f.read()
    except (tf.errors.OpError, OSError) as exc:
        raise DataError(f"{image.path}: cannot read ({exc})") from None
    encoded, height, width = encode_as_rgb_jpeg(data, image.path)
    f = tfrecord_files
    return f.make_example({
        "image/height": f.int64_feature(height),
        "image/width": f.int64_feature(width),
        "image/colorspace": f.bytes_feature("RGB"),
        "image/channels": f.int64_feature(3),
        "image/class/label": f.int64_feature(image.label),
        "image/class/synset": f.bytes_feature(image.synset),
        "image/class/text": f.bytes_feature(human_text),
        "image/object/bbox/xmin": f.float_feature([b[0] for b in boxes]),
        "image/object/bbox/ymin": f.float_feature([b[1] for b in boxes]),
        "image/object/bbox/xmax": f.float_feature([b[2] for b in boxes]),
        "image/object/bbox/ymax": f.float_feature([b[3] for b in boxes]),
        "image/object/bbox/label": f.int64_feature([image.label] * len(boxes)),
        "image/format": f.bytes_feature("JPEG"),
        "image/filename": f.bytes_feature(os.path.basename(image.path)),
        "image/encoded": f.bytes_feature(encoded),
    })


def shard_name(split: str, shard: int, num_shards: int) -> str:
    """TF-Slim shard file name, e.g. ``train-00002-of-01024``."""
    return f"{split}-{shard:05d}-of-{num_shards:05d}"


def write_split(split: str, images: list[SourceImage], num_shards: int, output_dir: str,
                num_threads: int, human_texts: dict[str, str] | None = None,
                box_files: dict[str, str] | None = None,
                challenge_synsets: frozenset[str] = frozenset()) -> list[str]:
    """Writes ``images`` (in the given order) into ``num_shards`` shards of ``split``.

    Shards are written by ``num_threads`` threads (TF's codecs release the GIL) under
    temporary names; only when every shard is complete are they all renamed, so the
    output directory never holds a partial set. On any error all temporary files are
    deleted and the first error is raised.

    Returns:
      The paths of the shards written.

    Raises:
      ConfigError: the output directory holds shards of ``split`` that this run would not
        replace (another shard count), which the input pipeline would mix in.
      DataError: an image cannot be read or decoded, an annotation is malformed, or the
        output cannot be written.
    """
    if num_shards < 1:
        raise ConfigError(f"--{split}_shards must be at least 1, got {num_shards}")
    names = [shard_name(split, shard, num_shards) for shard in range(num_shards)]
    stale = sorted(set(os.path.basename(path) for path in
                       tf.io.gfile.glob(os.path.join(output_dir, f"{split}-*"))) - set(names))
    if stale:
        raise ConfigError(
            f"--output_dir={output_dir} already holds {len(stale)} other {split} shards "
            f"(e.g. {stale[0]}); remove them first, the input pipeline would read them too")
    if num_shards > len(images):
        logging.warning("%s: %d shards for %d images; some shards will be empty", split,
                        num_shards, len(images))
    bounds = np.linspace(0, len(images), num_shards + 1).astype(int)
    # Opened one shard at a time by the threads: 1024 open files would exceed the usual
    # limit of open file descriptors.
    pending: list[tfrecord_files.PendingRecordFile] = []
    progress = ProgressLog(split, len(images))
    failed = threading.Event()
    texts = human_texts or {}

    def write_shard(shard: int) -> None:
        if failed.is_set():
            return
        output = tfrecord_files.PendingRecordFile(os.path.join(output_dir, names[shard]))
        pending.append(output)
        for image in images[bounds[shard]:bounds[shard + 1]]:
            if failed.is_set():
                return
            boxes: list[tuple[float, ...]] = []
            stem = os.path.splitext(os.path.basename(image.path))[0]
            if box_files and stem in box_files:
                boxes = read_object_boxes(box_files[stem], image.synset, challenge_synsets)
            output.write(image_record(image, texts.get(image.synset, ""), boxes))
            progress.update()
        output.close()

    logging.info("Writing %d %s images into %d shards in %s with %d threads", len(images),
                 split, num_shards, output_dir, num_threads)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            futures = [pool.submit(write_shard, shard) for shard in range(num_shards)]
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    failed.set()
            errors = [future.exception() for future in futures if future.exception()]
        if errors:
            raise errors[0]
        tfrecord_files.commit_all(pending)
    except BaseException:
        failed.set()
        tfrecord_files.discard_all(pending)
        raise
    logging.info("Wrote %d %s images into %d shards", len(images), split, num_shards)
    return [os.path.join(output_dir, name) for name in names]


def convert_imagenet(*, output_dir: str, labels_file: str, train_dir: str | None = None,
                     validation_dir: str | None = None,
                     validation_labels_file: str | None = None,
                     bounding_box_dir: str | None = None,
                     imagenet_metadata_file: str | None = None, train_shards: int = 1024,
                     validation_shards: int = 128, num_threads: int = 8) -> dict[str, int]:
    """Converts the given raw ImageNet folders into TF-Slim shards in ``output_dir``.

    Both splits' file lists are shuffled with TF-Slim's fixed seed, so classes are mixed
    within and across shards and a rerun writes identical shards. The validation split is
    written first, as in TF-Slim.

    Returns:
      Number of images written per split.

    Raises:
      ConfigError: missing or contradictory arguments.
      MissingDataError: an input file or folder does not exist.
      DataError: a malformed input file, an undecodable image, or an unwritable output.
    """
    if not output_dir:
        raise ConfigError("--output_dir has to be provided")
    if not labels_file:
        raise ConfigError("--labels_file has to be provided (the 1000 challenge wnids, "
                          "e.g. TF-Slim's imagenet_lsvrc_2015_synsets.txt)")
    if not train_dir and not validation_dir:
        raise ConfigError("give --train_dir, --validation_dir or both")
    if validation_dir and not validation_labels_file:
        raise ConfigError("--validation_dir needs --validation_labels_file (one wnid per "
                          "line, e.g. imagenet_2012_validation_synset_labels.txt)")
    synsets = read_synsets(labels_file)
    texts = read_metadata(imagenet_metadata_file) if imagenet_metadata_file else {}
    if imagenet_metadata_file:
        missing = [wnid for wnid in synsets if wnid not in texts]
        if missing:
            raise DataError(f"{imagenet_metadata_file}: no text for {len(missing)} wnids of "
                            f"--labels_file (e.g. {missing[0]})")
    box_files = index_box_files(bounding_box_dir) if bounding_box_dir else {}
    splits = []
    if validation_dir:
        splits.append(("validation", find_validation_images(
            validation_dir, validation_labels_file or "", synsets), validation_shards))
    if train_dir:
        splits.append(("train", find_training_images(train_dir, synsets), train_shards))
    try:
        tf.io.gfile.makedirs(output_dir)
    except (tf.errors.OpError, OSError) as exc:
        raise DataError(f"--output_dir={output_dir}: cannot create it ({exc})") from None
    counts = {}
    for split, images, num_shards in splits:
        random.Random(SHUFFLE_SEED).shuffle(images)
        write_split(split, images, num_shards, output_dir, num_threads, texts, box_files,
                    frozenset(synsets))
        counts[split] = len(images)
    return counts


def _image_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, name) for name in tf.io.gfile.listdir(folder)
                  if name.lower().endswith(IMAGE_EXTENSIONS))


def _clip01(value: float) -> float:
    return min(max(value, 0.0), 1.0)
