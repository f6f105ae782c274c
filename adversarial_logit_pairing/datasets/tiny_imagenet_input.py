"""Tiny ImageNet input: ``train.tfrecord`` and ``validation.tfrecord`` from the converter.

Records carry the source file's bytes as ``image/encoded`` (JPEG, occasionally PNG) and the
class index ``label/tiny_imagenet`` (0..199, the line of the wnid in ``wnids.txt``).

No evaluation crop, whatever the model's ``eval_crop``: Tiny ImageNet's 64x64 images are
already crops around the object (the data set was made that way), and the original resized
them whole. The model's resize kernels (``eval_resize``, ``train_resize``) are used, and its
class count never matters here: 200 classes, labels as stored.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from adversarial_logit_pairing.datasets import image_decoding, input_pipeline
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET
from adversarial_logit_pairing.models import ModelConfig

NUM_CLASSES = TINY_IMAGENET.stored_classes
SHUFFLE_BUFFER = 10000

# The training crop is sampled around a box that covers the whole image.
_WHOLE_IMAGE_BOX = ((0.0, 0.0, 1.0, 1.0),)


def _parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    return tf.io.parse_single_example(serialized, {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "label/tiny_imagenet": tf.io.FixedLenFeature([], tf.int64),
    })


def preprocess_image(image_buffer: tf.Tensor, image_size: int, is_training: bool,
                     model_config: ModelConfig,
                     augmentation: Optional[Augmentation] = None) -> tf.Tensor:
    """Decodes and preprocesses one image into float32 [image_size, image_size, 3] in [-1, 1].

    Training takes a random crop of at least half the image (no flip, as in the original)
    and resizes with the model's ``train_resize``, then applies ``augmentation`` (if any);
    evaluation resizes the whole image with its ``eval_resize`` (bicubic for ALP's ResNets).
    """
    image = image_decoding.decode_rgb(image_buffer)
    if is_training:
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([_WHOLE_IMAGE_BOX], tf.float32),
            min_object_covered=0.5,
            aspect_ratio_range=[0.75, 1.33],
            area_range=[0.5, 1.0],
            max_attempts=20,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
    kernel = model_config.train_resize if is_training else model_config.eval_resize
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = image_decoding.resize_tf1(image, image_size, kernel)
    if is_training and augmentation is not None:
        image = augmentation.apply_to_unit_range(image)
    return image_decoding.to_model_range(image)


def parse_record(serialized: tf.Tensor, image_size: int, is_training: bool,
                 model_config: ModelConfig, augmentation: Optional[Augmentation] = None,
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized record -> (image float32 [s, s, 3] in [-1, 1], label int64 in 0..199)."""
    parsed = _parse(serialized)
    image = preprocess_image(parsed["image/encoded"], image_size, is_training, model_config,
                             augmentation)
    label = input_pipeline.checked_label(parsed["label/tiny_imagenet"], NUM_CLASSES,
                                         "label/tiny_imagenet")
    return image, label


def check_record(serialized: tf.Tensor, model_config: ModelConfig) -> tf.Tensor:
    """Decodes a record the way the pipeline would; fails like the pipeline would.

    ``model_config`` is unused (labels do not depend on the model here); it keeps the
    signature of ``imagenet_input.check_record``.
    """
    del model_config
    parsed = _parse(serialized)
    image = image_decoding.decode_rgb(parsed["image/encoded"])
    label = input_pipeline.checked_label(parsed["label/tiny_imagenet"], NUM_CLASSES,
                                         "label/tiny_imagenet")
    return tf.reduce_sum(tf.shape(image)) + tf.cast(label, tf.int32)


def tiny_imagenet_input(filenames: list[str], batch_size: int, image_size: int,
                        is_training: bool, model_config: ModelConfig,
                        augmentation: Optional[Augmentation] = None) -> tf.data.Dataset:
    """Batched (images, labels) of the given record file; see dataset_factory.get_dataset."""
    records = tf.data.TFRecordDataset(filenames, buffer_size=input_pipeline.READ_BUFFER_BYTES)
    if is_training:
        # Shuffle before repeat: every epoch is a full, freshly shuffled pass.
        records = records.shuffle(SHUFFLE_BUFFER).repeat()
    return input_pipeline.parse_batch_prefetch(
        records, lambda value: parse_record(value, image_size, is_training, model_config,
                                            augmentation),
        batch_size, is_training)


def num_classes(model_config: ModelConfig) -> int:
    """200, whatever the model (its ImageNet class count does not apply here)."""
    del model_config
    return NUM_CLASSES
