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


def eval_crop_window(image_shape: tf.Tensor, eval_crop: str, crop_fraction: float,
                     image_size: int) -> tf.Tensor:
    """Window [offset_y, offset_x, height, width] of a model's evaluation centre crop.

    Args:
      image_shape: int32 [height, width, channels] of the whole image.
      eval_crop: ``ModelConfig.eval_crop``:
        'short_side': a square of ``int(crop_fraction * min(h, w))``, offsets
          ``((side - crop) + 1) // 2`` (ALP's ImageNet eval crop);
        'padded_size': a square of ``int(image_size / (image_size + 32) * min(h, w))``, same
          offsets (tensorflow/tpu EfficientNet's ``CROP_PADDING = 32``);
        'central_fraction': the window ``tf.image.central_crop(image, crop_fraction)`` takes:
          per side ``start = int((side - side * crop_fraction) / 2)`` (float64, truncated)
          and ``size = side - 2 * start`` (TF-Slim / adv_imagenet_models Inception).
      crop_fraction: ``ModelConfig.crop_fraction`` (unused by 'padded_size').
      image_size: side of the output image ('padded_size' depends on it).

    The float arithmetic follows each original (float32 for the square crops, float64 for
    ``central_crop``) so that the truncation lands on the same pixel.
    """
    height, width = image_shape[0], image_shape[1]
    if eval_crop == "central_fraction":
        def start(side):
            side = tf.cast(side, tf.float64)
            return tf.cast((side - side * crop_fraction) / 2, tf.int32)

        top, left = start(height), start(width)
        return tf.stack([top, left, height - 2 * top, width - 2 * left])
    if eval_crop == "short_side":
        fraction = crop_fraction
    elif eval_crop == "padded_size":
        fraction = image_size / (image_size + 32)
    else:
        raise ValueError(f"unknown eval_crop {eval_crop!r}")
    crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    return tf.stack([((height - crop) + 1) // 2, ((width - crop) + 1) // 2, crop, crop])


def resize_tf1(image: tf.Tensor, image_size: int, kernel: str) -> tf.Tensor:
    """Resizes one float image to [image_size, image_size, 3] as TF1's resize ops did.

    ``kernel`` is 'bicubic' or 'bilinear' (``ModelConfig.eval_resize``/``train_resize``).
    The originals called TF1's ``tf.image.resize_bicubic`` / ``resize_bilinear``: a
    corner-aligned sampling grid without half-pixel centres (and, for bicubic, the Keys
    kernel with a = -0.75). TF2's ``tf.image.resize`` uses half-pixel centres (and a = -0.5),
    which shifts the image by half a source pixel and changes values by up to a few tenths of
    the range; released checkpoints were trained and evaluated on the TF1 result, so the raw
    ops are called with the TF1 settings.
    """
    ops = {"bicubic": tf.raw_ops.ResizeBicubic, "bilinear": tf.raw_ops.ResizeBilinear}
    if kernel not in ops:
        raise ValueError(f"unknown resize kernel {kernel!r}")
    resized = ops[kernel](images=image[tf.newaxis], size=[image_size, image_size],
                          align_corners=False, half_pixel_centers=False)
    return tf.reshape(resized, [image_size, image_size, 3])


def to_model_range(image: tf.Tensor) -> tf.Tensor:
    """Maps a float image in [0, 1] to the model's input range [-1, 1], clipped.

    Bicubic interpolation overshoots next to sharp edges, so the resized image can leave
    [0, 1]. The original did not clip; we do, because the attacks clip adversarial images to
    the bounds (-1, 1) and assume the clean image lies inside them (otherwise the "clean"
    starting point of PGD would already be moved by the clipping).
    """
    return tf.clip_by_value((image - 0.5) * 2.0, -1.0, 1.0)
