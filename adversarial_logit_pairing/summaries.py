"""TensorBoard scalar and image summaries written with TensorFlow alone.

TensorFlow 2.21 no longer installs TensorBoard, and ``tf.summary.scalar``/``image`` live in
the TensorBoard package. The event files only need ``tf.summary.write`` and the plugin
metadata TensorBoard's scalar and image dashboards read, so this module writes those directly:
a float32 scalar tagged for the ``scalars`` plugin, and for ``images`` the string tensor
``[width, height, png_1, ..., png_n]``.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import summary_pb2


def _metadata(plugin_name: str) -> bytes:
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    return metadata.SerializeToString()


_SCALAR_METADATA = _metadata("scalars")
_IMAGE_METADATA = _metadata("images")


def scalar(name: str, value, step: int) -> None:
    """Writes one scalar to the default summary writer."""
    tf.summary.write(name, tf.cast(value, tf.float32), step=step, metadata=_SCALAR_METADATA)


def image(name: str, images: tf.Tensor, step: int, max_outputs: int = 3) -> None:
    """Writes up to ``max_outputs`` images [N, H, W, C] with values in [0, 1] as PNG."""
    images = tf.convert_to_tensor(images)[:max_outputs]
    pixels = tf.image.convert_image_dtype(tf.clip_by_value(images, 0.0, 1.0), tf.uint8,
                                          saturate=True)
    encoded = tf.map_fn(tf.io.encode_png, pixels, fn_output_signature=tf.string)
    shape = tf.shape(images)
    dims = tf.stack([tf.strings.as_string(shape[2]), tf.strings.as_string(shape[1])])
    tf.summary.write(name, tf.concat([dims, encoded], axis=0), step=step,
                     metadata=_IMAGE_METADATA)
