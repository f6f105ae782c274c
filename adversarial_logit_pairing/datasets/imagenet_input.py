"""ImageNet input: TF-Slim TFRecord shards ``train-*`` and ``validation-*``.

Records are those written by TF-Slim's ``build_imagenet_data.py`` (and by our
``alp-convert-imagenet``): ``image/encoded`` (JPEG), ``image/class/label`` (1..1000) and the
relative object boxes ``image/object/bbox/{xmin,ymin,xmax,ymax}`` that guide the training crop.

The model decides the rest (its ``ModelConfig``): the training and evaluation crops, both
resize kernels, and the labels. A model whose class 0 is a background class (TF-Slim's 1001
classes) gets the stored labels as they are; any other (1000 classes) gets them shifted to
0..999. The hparams may add AutoAugment or RandAugment to the training images.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from adversarial_logit_pairing.datasets import image_decoding, input_pipeline
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.datasets.dataset_facts import IMAGENET
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import ModelConfig

SHUFFLE_BUFFER = 1024

_BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")  # tf.image's box order


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


def _sample_training_box(image_shape: tf.Tensor, boxes: tf.Tensor,
                         aspect_ratio_range: tuple[float, float] = (0.75, 1.33)) -> tf.Tensor:
    """Random crop window covering >= 10% of some box of ``boxes`` (whole image if none)."""
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=boxes,
        min_object_covered=0.1,
        aspect_ratio_range=list(aspect_ratio_range),
        area_range=[0.08, 1.0],
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def training_crop_window(image_shape: tf.Tensor, boxes: tf.Tensor, image_size: int,
                         model_config: ModelConfig) -> tf.Tensor:
    """Window [offset_y, offset_x, height, width] of the model's random training crop.

    ``model_config.train_crop`` (see ``models.TRAIN_CROPS``): 'object_boxes' samples around
    the record's boxes; 'whole_image_box' ignores them, samples around the whole image with
    aspect 3/4..4/3 and, when that gives the whole image (every attempt failed, or the one
    that fitted covers it all), takes the evaluation centre crop instead, as tensorflow/tpu's
    EfficientNet did.
    """
    if model_config.train_crop == "object_boxes":
        return _sample_training_box(image_shape, boxes)
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32)
    window = _sample_training_box(image_shape, whole_image, (3.0 / 4.0, 4.0 / 3.0))
    centre = image_decoding.eval_crop_window(image_shape, model_config.eval_crop,
                                             model_config.crop_fraction, image_size)
    covers_all = tf.reduce_all(tf.equal(window[2:], image_shape[:2]))
    return tf.where(covers_all, centre, window)


def num_classes(model_config: ModelConfig) -> int:
    """Width of the logits on ImageNet: 1001 with a background class (TF-Slim), else 1000.

    Raises:
      ConfigError: the model's ``num_classes`` disagrees with its ``background_class``.
    """
    expected = IMAGENET.stored_classes + int(model_config.background_class)
    if model_config.num_classes != expected:
        raise ConfigError(
            f"model {model_config.name!r}: num_classes={model_config.num_classes} with "
            f"background_class={model_config.background_class}; ImageNet gives {expected}")
    return expected


def first_label(model_config: ModelConfig) -> int:
    """The stored label that becomes class 0: 0 with a background class, else 1 (shift)."""
    return 0 if model_config.background_class else 1


def preprocess_image(image_buffer: tf.Tensor, boxes: tf.Tensor, image_size: int,
                     is_training: bool, model_config: ModelConfig,
                     augmentation: Optional[Augmentation] = None) -> tf.Tensor:
    """Decodes and preprocesses one image into float32 [image_size, image_size, 3] in [-1, 1].

    Training: crop the model's random window (``training_crop_window``; decoding only that
    crop), resize with ``model_config.train_resize``, random left-right flip, then the
    ``augmentation`` (AutoAugment / RandAugment on the uint8 image, as the original). Evaluation:
    the model's centre crop (``eval_crop``, see ``image_decoding.eval_crop_window``), decoding
    only that window, resize with ``eval_resize``. Every model gets [-1, 1]; normalisation
    beyond it is the model's own (``ImageClassifier.normalize_inputs``).
    """
    if is_training:
        image = image_decoding.decode_and_crop_rgb(
            image_buffer,
            lambda shape: training_crop_window(shape, boxes, image_size, model_config))
        kernel = model_config.train_resize
    else:
        image = image_decoding.decode_and_crop_rgb(
            image_buffer, lambda shape: image_decoding.eval_crop_window(
                shape, model_config.eval_crop, model_config.crop_fraction, image_size))
        kernel = model_config.eval_resize
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = image_decoding.resize_tf1(image, image_size, kernel)
    if is_training:
        image = tf.image.random_flip_left_right(image)
        if augmentation is not None:
            image = augmentation.apply_to_unit_range(image)
    return image_decoding.to_model_range(image)


def _checked_label(parsed: dict[str, tf.Tensor], model_config: ModelConfig) -> tf.Tensor:
    return input_pipeline.checked_label(parsed["image/class/label"], num_classes(model_config),
                                        "image/class/label", first_label(model_config))


def parse_record(serialized: tf.Tensor, image_size: int, is_training: bool,
                 model_config: ModelConfig, augmentation: Optional[Augmentation] = None,
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized record -> (image float32 [s, s, 3] in [-1, 1], int64 label).

    The label is the stored 1..1000 for a model with a background class, else 0..999.
    """
    parsed = _parse(serialized)
    image = preprocess_image(parsed["image/encoded"], _object_boxes(parsed), image_size,
                             is_training, model_config, augmentation)
    return image, _checked_label(parsed, model_config)


def check_record(serialized: tf.Tensor, model_config: ModelConfig) -> tf.Tensor:
    """Decodes a whole record the way the pipeline would; fails like the pipeline would.

    Used by the bad-record scan: the full image is decoded (not just a crop) so that every
    byte is checked, the boxes go through the training box sampler and the label through
    the model's label range.
    """
    parsed = _parse(serialized)
    image = image_decoding.decode_rgb(parsed["image/encoded"])
    window = _sample_training_box(tf.shape(image), _object_boxes(parsed))
    label = _checked_label(parsed, model_config)
    return tf.reduce_sum(window) + tf.cast(label, tf.int32)


def imagenet_input(filenames: list[str], batch_size: int, image_size: int,
                   is_training: bool, model_config: ModelConfig,
                   augmentation: Optional[Augmentation] = None) -> tf.data.Dataset:
    """Batched (images, labels) of the given shards; see dataset_factory.get_dataset."""
    records = input_pipeline.read_records(filenames, is_training, SHUFFLE_BUFFER)
    return input_pipeline.parse_batch_prefetch(
        records, lambda value: parse_record(value, image_size, is_training, model_config,
                                            augmentation),
        batch_size, is_training)
