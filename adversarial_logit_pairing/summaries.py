"""TensorBoard summaries written as the original's TF1 ``tf.summary.scalar``/``image`` wrote them.

The original built its summaries with TF1's ``ScalarSummary`` and ``ImageSummary`` ops and a
``SummarySaverHook``: a scalar is a ``Summary.Value`` with a float32 ``simple_value``, and an
image summary is one ``Summary.Image`` (PNG, height, width, colorspace) per image, tagged
``<name>/image/<i>`` (``<name>/image`` alone when ``max_outputs`` is 1). TensorFlow 2.21 still has
both ops (they need no TensorBoard install), so this module runs them and hands the serialized
``Summary`` to the default ``tf.summary`` writer with ``write_raw_pb``: the event files hold the
same tags, value kinds and pixels as the original's, and TensorBoard shows them the same way.

Why not ``tf.summary.scalar``/``image``: without TensorBoard installed they raise
``TBNotInstalledError`` (TF 2.21), and with tensorboard 2.21 they write TF2 summaries (measured):
a scalar as a float32 ``tensor`` value with ``scalars`` plugin metadata instead of a
``simple_value``, and the images as ONE tag ``images`` holding a string tensor instead of TF1's
``images/image/0``, ``images/image/1``, ... (tests/test_summaries.py pins the TF1 form); the
event-file writer itself is TensorFlow's (``tf.summary.create_file_writer``).
"""

from __future__ import annotations

import tensorflow as tf


def scalar(tag: str, value, step: int) -> None:
    """Writes ``value`` as TF1's ``tf.summary.scalar(tag, value)`` did (a float32 simple_value).

    ``tag`` is the full tag: the original's name scope included, e.g. ``Eval/Accuracy``.
    """
    tf.summary.experimental.write_raw_pb(
        tf.raw_ops.ScalarSummary(tags=tag, values=tf.convert_to_tensor(value)), step=step)


@tf.function(reduce_retracing=True)
def _image_summary(tag: tf.Tensor, images: tf.Tensor, max_outputs: int) -> tf.Tensor:
    # In a graph because the op's eager path rejects its own default ``bad_color`` attribute.
    return tf.raw_ops.ImageSummary(tag=tag, tensor=images, max_images=max_outputs)


def image(name: str, images, step: int, max_outputs: int = 3) -> None:
    """Writes images [N, H, W, C] as TF1's ``tf.summary.image(name, images, max_outputs)`` did.

    The first ``max_outputs`` images are written (3 by default, as TF1's default, which the
    original never changed). Float images are mapped to uint8 per image the TF1 way: all
    non-negative values scaled so that the largest is 255; otherwise 0 goes to 128 and the
    largest magnitude to 127 away from it. So the original passed model-unit images in (-1, 1)
    and the same is done here.
    """
    tf.summary.experimental.write_raw_pb(
        _image_summary(tf.constant(name), tf.convert_to_tensor(images), int(max_outputs)),
        step=step)
