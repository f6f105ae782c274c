"""ImageNet input: TF-Slim TFRecord shards ``train-*`` and ``validation-*``.

Records are those written by TF-Slim's ``build_imagenet_data.py`` (and by our
``alp-convert-imagenet``): ``image/encoded`` (JPEG), ``image/class/label`` (1..1000; 0 is the
unused background class, hence 1001 classes) and the relative object boxes
``image/object/bbox/{xmin,ymin,xmax,ymax}`` that guide the training crop.
"""

from __future__ import annotations

import os

import tensorflow as tf

from adversarial_logit_pairing.datasets import image_decoding, input_pipeline
from adversarial_logit_pairing.errors import ConfigError, MissingDataError

DATA_DIR_FLAG = "--imagenet_data_dir"
NUM_CLASSES = 1001
# The original's epoch sizes; the learning-rate schedule counts epochs with them.
EXAMPLES_PER_EPOCH = {"train": 1281167, "validation": 50000}
FILE_PATTERNS = {"train": "train-*", "validation": "validation-*"}
SHUFFLE_BUFFER = 1024
# Evaluation keeps the central 87.5% of the short side (the usual Inception/ResNet crop).
EVAL_CROP_FRACTION = 0.875

_BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")  # tf.image's box order


def data_files(split: str, data_dir: str | None) -> list[str]:
    """Sorted shard paths of ``split`` in ``data_dir``.

    Raises:
      ConfigError: ``split`` is not 'train' or 'validation'.
      MissingDataError: the flag is unset, the directory is missing or holds no shard.
    """
    if split not in FILE_PATTERNS:
        raise ConfigError(f"invalid split '{split}': expected 'train' or 'validation'")
    if not data_dir:
        raise MissingDataError(f"{DATA_DIR_FLAG} is not set: it must name the directory "
                               "with the ImageNet TFRecord shards")
    if not tf.io.gfile.isdir(data_dir):
        raise MissingDataError(f"{DATA_DIR_FLAG}={data_dir}: no such directory")
    # Temporary files of a running conversion start with '.', so they never match.
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, FILE_PATTERNS[split])))
    if not files:
        raise MissingDataError(
            f"{DATA_DIR_FLAG}={data_dir}: no files matching {FILE_PATTERNS[split]}")
    return files


def _parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    features = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    }
    for key in _BOX_KEYS:
        features[f"image/object/bbox/{key}"] = tf.io.VarLenFeature(tf.float32)
    return tf.io.parse_single_example(serialized, features)


def _object_boxes(parsed: dict[str, tf.Tensor]) -> tf.Tensor:
    """The record's boxes as float32 [1, num_boxes, 4] in (ymin, xmin, ymax, xmax) order."""
    coords = [parsed[f"image/object/bbox/{key}"].values for key in _BOX_KEYS]
    return tf.stack(coords, axis=-1)[tf.newaxis]


def _sample_training_box(image_shape: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """Random crop window covering >= 10% of some object box (whole image if none)."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=boxes,
        min_object_covered=0.1,
        aspect_ratio_range=[0.75, 1.33],
        area_range=[0.08, 1.0],
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_shape: tf.Tensor) -> tf.Tensor:
    """Window [offset_y, offset_x, size, size] of the evaluation centre crop.

    The crop side is ``int(0.875 * min(height, width))`` (truncated) and the offsets round
    up, ``((side_length - crop) + 1) // 2``, exactly as the original computed them.
    """
    height, width = image_shape[0], image_shape[1]
    crop = tf.cast(EVAL_CROP_FRACTION * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    offset_y = ((height - crop) + 1) // 2
    offset_x = ((width - crop) + 1) // 2
    return tf.stack([offset_y, offset_x, crop, crop])


def preprocess_image(image_buffer: tf.Tensor, boxes: tf.Tensor, image_size: int,
                     is_training: bool) -> tf.Tensor:
    """Decodes and preprocesses one image into float32 [image_size, image_size, 3] in [-1, 1].

    Training: crop a random box sampled around the object boxes (decoding only that crop),
    bicubic resize, random left-right flip. Evaluation: the fixed centre crop, bicubic resize.
    """
    if is_training:
        image = image_decoding.decode_and_crop_rgb(
            image_buffer, lambda shape: _sample_training_box(shape, boxes))
    else:
        image = image_decoding.decode_and_crop_rgb(image_buffer, center_crop_window)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = image_decoding.to_model_range(image_decoding.resize_bicubic_tf1(image, image_size))
    if is_training:
        image = tf.image.random_flip_left_right(image)
    return image


def parse_record(serialized: tf.Tensor, image_size: int,
                 is_training: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized record -> (image float32 [s, s, 3] in [-1, 1], label int64 in 1..1000)."""
    parsed = _parse(serialized)
    image = preprocess_image(parsed["image/encoded"], _object_boxes(parsed), image_size,
                             is_training)
    label = input_pipeline.checked_label(parsed["image/class/label"], NUM_CLASSES,
                                         "image/class/label")
    return image, label


def check_record(serialized: tf.Tensor) -> tf.Tensor:
    """Decodes a whole record the way the pipeline would; fails like the pipeline would.

    Used by the bad-record scan: the full image is decoded (not just a crop) so that every
    byte is checked, and the boxes go through the training box sampler.
    """
    parsed = _parse(serialized)
    image = image_decoding.decode_rgb(parsed["image/encoded"])
    window = _sample_training_box(tf.shape(image), _object_boxes(parsed))
    label = input_pipeline.checked_label(parsed["image/class/label"], NUM_CLASSES,
                                         "image/class/label")
    return tf.reduce_sum(window) + tf.cast(label, tf.int32)


def imagenet_input(filenames: list[str], batch_size: int, image_size: int,
                   is_training: bool) -> tf.data.Dataset:
    """Batched (images, labels) of the given shards; see dataset_factory.get_dataset."""
    records = input_pipeline.read_records(filenames, is_training, SHUFFLE_BUFFER)
    return input_pipeline.parse_batch_prefetch(
        records, lambda value: parse_record(value, image_size, is_training), batch_size,
        is_training)
