"""Decoding, cropping and resizing of encoded images inside tf.data pipelines.

Everything here is made of TensorFlow ops only (no Python callbacks), so the input pipelines
that use it can run as TPU host input pipelines.

Records normally hold RGB JPEG bytes, but real data sets do not always: ImageNet has a PNG
and CMYK JPEGs among its files, and Tiny ImageNet records keep each file's bytes as they
were. JPEGs (any colour space: TF's decoder converts greyscale and CMYK/YCCK to RGB when
asked for 3 channels) take the fast crop-while-decoding path; anything else is decoded in
full by ``tf.io.decode_image`` and then sliced.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

# Crop window as tf.image.decode_and_crop_jpeg wants it: [offset_y, offset_x, height, width].
CropWindowFn = Callable[[tf.Tensor], tf.Tensor]


def decode_rgb(image_buffer: tf.Tensor) -> tf.Tensor:
    """Decodes a JPEG/PNG/GIF/BMP string into a uint8 RGB image of shape [height, width, 3].

    Greyscale, palette, alpha and CMYK sources all come out as 3-channel RGB.
    """
    return tf.io.decode_image(image_buffer, channels=3, expand_animations=False)


def decode_and_crop_rgb(image_buffer: tf.Tensor, crop_window_fn: CropWindowFn) -> tf.Tensor:
    """Decodes only a window of an encoded image; returns uint8 RGB [crop_h, crop_w, 3].

    Args:
      image_buffer: scalar string tensor with the encoded image.
      crop_window_fn: maps the image shape (int32 [height, width, channels]) to the window
        [offset_y, offset_x, height, width]. It is called on the shape read from the JPEG
        header (no decoding) for JPEGs, and on the decoded image's shape otherwise.

    Returns:
      The cropped image. For a JPEG, only the window is decoded, which is what makes the
      ImageNet training crop cheap.
    """

    def jpeg_crop() -> tf.Tensor:
        window = crop_window_fn(tf.image.extract_jpeg_shape(image_buffer))
        return tf.image.decode_and_crop_jpeg(image_buffer, window, channels=3)

    def other_crop() -> tf.Tensor:
        image = decode_rgb(image_buffer)
        window = crop_window_fn(tf.shape(image))
        return tf.slice(image, tf.stack([window[0], window[1], 0]),
                        tf.stack([window[2], window[3], 3]))

    return tf.cond(tf.io.is_jpeg(image_buffer), jpeg_crop, other_crop)


def resize_bicubic_tf1(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bicubic resize of one float image to [image_size, image_size, 3], as TF1 computed it.

    The original called ``tf.image.resize_bicubic`` (TF1): corner-aligned sampling grid
    without half-pixel centres and the Keys kernel with a = -0.75. TF2's
    ``tf.image.resize(method='bicubic')`` uses half-pixel centres and a = -0.5, which changes
    pixel values by up to a few tenths of the range; the released checkpoints were trained
    and evaluated on the TF1 result, so the raw op is called with the TF1 settings.
    """
    resized = tf.raw_ops.ResizeBicubic(
        images=image[tf.newaxis], size=[image_size, image_size],
        align_corners=False, half_pixel_centers=False,
    )
    return tf.reshape(resized, [image_size, image_size, 3])


def to_model_range(image: tf.Tensor) -> tf.Tensor:
    """Maps a float image in [0, 1] to the model's input range [-1, 1], clipped.

    Bicubic interpolation overshoots next to sharp edges, so the resized image can leave
    [0, 1]. The original did not clip; we do, because the attacks clip adversarial images to
    the bounds (-1, 1) and assume the clean image lies inside them (otherwise the "clean"
    starting point of PGD would already be moved by the clipping).
    """
    return tf.clip_by_value((image - 0.5) * 2.0, -1.0, 1.0)
