"""Synthetic photo-like data sets in the original TFRecord layouts, for the bench scripts.

Smooth shapes plus sensor-like noise compress about as well as real photos, so JPEG sizes and
decode costs are realistic (Tiny ImageNet: 64x64 JPEGs of ~3 KB; ImageNet: 300..500 px JPEGs
of ~75 KB in TF-Slim shards; real ImageNet files average ~110 KB). No flags here: the scripts
that import this module define their own.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.datasets.dataset_facts import IMAGENET, TINY_IMAGENET
from adversarial_logit_pairing.datasets.tfrecord_files import (
    bytes_feature,
    float_feature,
    int64_feature,
    make_example,
)

_DISTINCT_IMAGES = 48  # generated pictures, reused cyclically across records


def synthetic_photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth shapes plus sensor-like noise: compresses about as well as a real photo."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    image = np.zeros((height, width, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 8, size=2)
        image += rng.uniform(0.05, 0.2, size=3) * np.sin(
            2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi, size=3))
    image = 0.5 + image + rng.normal(0, 0.05, size=image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=90).numpy()


def write_tiny_imagenet(directory: str, count: int, rng: np.random.Generator,
                        filename: str = TINY_IMAGENET.file_patterns["train"]) -> float:
    """``filename`` with ``count`` 64x64 JPEG records; returns the mean JPEG size in bytes."""
    images = [_jpeg(synthetic_photo(64, 64, rng)) for _ in range(_DISTINCT_IMAGES)]
    with tf.io.TFRecordWriter(os.path.join(directory, filename)) as writer:
        for i in range(count):
            writer.write(make_example({
                "image/encoded": bytes_feature(images[i % len(images)]),
                "label/tiny_imagenet": int64_feature(i % TINY_IMAGENET.stored_classes),
            }))
    return float(np.mean([len(image) for image in images]))


def write_imagenet(directory: str, count: int, num_shards: int,
                   rng: np.random.Generator) -> float:
    """TF-Slim train shards of ``count`` photo-sized JPEGs with one object box each."""
    images = []
    for _ in range(_DISTINCT_IMAGES):
        height, width = int(rng.integers(300, 500)), int(rng.integers(350, 500))
        images.append(_jpeg(synthetic_photo(height, width, rng)))
    for shard in range(num_shards):
        path = os.path.join(directory, f"train-{shard:05d}-of-{num_shards:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(shard, count, num_shards):
                box = sorted(rng.uniform(0, 1, size=2)), sorted(rng.uniform(0, 1, size=2))
                writer.write(make_example({
                    "image/encoded": bytes_feature(images[i % len(images)]),
                    "image/class/label": int64_feature(1 + i % IMAGENET.stored_classes),
                    "image/object/bbox/xmin": float_feature(box[0][0]),
                    "image/object/bbox/xmax": float_feature(box[0][1]),
                    "image/object/bbox/ymin": float_feature(box[1][0]),
                    "image/object/bbox/ymax": float_feature(box[1][1]),
                }))
    return float(np.mean([len(image) for image in images]))
