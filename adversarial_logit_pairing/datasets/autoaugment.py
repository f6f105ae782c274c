"""AutoAugment (policy v0) and RandAugment, as tensorflow/tpu's EfficientNet trained with them.

The published EfficientNet checkpoints were trained with AutoAugment (``ckptsaug/``, the
AdvProp ones) or RandAugment applied after the training crop, resize and flip, to the uint8
image of the model's size. This module holds the image operations (uint8 [H, W, 3] in, uint8
out, TensorFlow ops only so that they run inside tf.data), the two policies, and
``Augmentation``, the hparams-selected choice the ImageNet input calls.

Facts kept from tensorflow/tpu's ``autoaugment.py`` (the numbers are the original's):
  - levels run 0..10 (``MAX_LEVEL``) and map to arguments: rotate ``level/10 * 30`` degrees,
    shear ``level/10 * 0.3``, translate ``level/10 * translate_const`` pixels (each negated
    with probability 1/2); Color/Contrast/Brightness/Sharpness factor ``level/10 * 1.8 + 0.1``;
    Posterize ``int(level/10 * 4)`` bits; Solarize threshold ``int(level/10 * 256)``;
    SolarizeAdd ``int(level/10 * 110)`` (threshold 128); Cutout half-side
    ``int(level/10 * cutout_const)``.
  - AutoAugment: one of the 25 sub-policies of ``POLICY_V0`` chosen uniformly, each of its two
    ops applied with its own probability; translate_const 250, cutout_const 100.
  - RandAugment: ``num_layers`` times, one of the 16 ``RANDAUGMENT_OPS`` chosen uniformly and
    always applied at ``magnitude``; translate_const 100, cutout_const 40.
  - Geometric ops sample the nearest source pixel and fill uncovered pixels with grey 128;
    blends compute in float32 and truncate to uint8 (as PIL's ImageEnhance does).

Deliberate difference: ``contrast`` blends towards the MEAN grey level of the image, as PIL's
``ImageEnhance.Contrast`` (which the original names as its model) does. The original's
``contrast`` took ``sum(histogram) / 256`` (the pixel count / 256, e.g. 196 at 224x224) as
that mean, a bug. Contrast is not in policy v0, so AutoAugment is unaffected; RandAugment is.

Randomness is stateless: the policies take a seed (int32 [2]) and derive every decision from
it, so a given (image, seed) always gives the same output; ``Augmentation.random`` draws a new
seed for each image it sees, so a record's augmentation differs from epoch to epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

MAX_LEVEL = 10.0
# Value of the pixels that geometric ops uncover and that cutout paints (mid grey).
FILL_VALUE = 128

AUGMENTS = ("none", "autoaugment", "randaugment")

Scalar = Union[float, int, tf.Tensor]


# ---- Image operations: uint8 [H, W, 3] -> uint8 [H, W, 3] -----------------------------------

def blend(image1: tf.Tensor, image2: tf.Tensor, factor: Scalar) -> tf.Tensor:
    """``image1 + factor * (image2 - image1)`` in float32, clipped to [0, 255], truncated.

    Factor 0 gives ``image1``, 1 gives ``image2``; above 1 it extrapolates away from
    ``image1`` (the "degenerate" image of PIL's ImageEnhance).
    """
    image1 = tf.cast(image1, tf.float32)
    image2 = tf.cast(image2, tf.float32)
    mixed = image1 + tf.cast(factor, tf.float32) * (image2 - image1)
    return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def _grey(image: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 1] luma from tf.image (the original's greyscale conversion)."""
    return tf.image.rgb_to_grayscale(image)


def color(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
    """Saturation (PIL ImageEnhance.Color): blend from the greyscale image to ``image``."""
    return blend(tf.image.grayscale_to_rgb(_grey(image)), image, factor)


def contrast(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
    """PIL ImageEnhance.Contrast: blend from the image's mean grey level (rounded) to it."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float32)) + 0.5)
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
    """PIL ImageEnhance.Brightness: blend from black to ``image``."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: Scalar) -> tf.Tensor:
    """PIL ImageEnhance.Sharpness: blend from a smoothed image to ``image``.

    The smoothed image is PIL's SMOOTH filter (3x3 kernel, 5 in the centre, 1 around, / 13),
    truncated to uint8, on the interior; border pixels keep their values.
    """
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, tf.newaxis, tf.newaxis], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[tf.newaxis], kernel,
                                    strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def invert(image: tf.Tensor) -> tf.Tensor:
    """``255 - image``."""
    return 255 - image


def posterize(image: tf.Tensor, bits: Scalar) -> tf.Tensor:
    """Keeps the ``bits`` high bits of every value (PIL ImageOps.posterize).

    Fewer than one bit counts as one: the original shifted right then left by ``8 - bits``,
    and TensorFlow clamps a shift of 8 to 7, so its 0-bit posterize (policy v0's level 2)
    kept one bit; PIL would return black.
    """
    bits = tf.clip_by_value(tf.cast(bits, tf.int32), 1, 8)
    mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
    return tf.bitwise.bitwise_and(image, mask)


def solarize(image: tf.Tensor, threshold: Scalar) -> tf.Tensor:
    """Inverts the values >= ``threshold`` (PIL ImageOps.solarize); 256 changes nothing."""
    threshold = tf.cast(threshold, tf.int32)
    return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: Scalar, threshold: Scalar = 128) -> tf.Tensor:
    """Adds ``addition`` (clipped to [0, 255]) to the values below ``threshold``."""
    values = tf.cast(image, tf.int32)
    added = tf.cast(tf.clip_by_value(values + tf.cast(addition, tf.int32), 0, 255), tf.uint8)
    return tf.where(values < tf.cast(threshold, tf.int32), added, image)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Stretches each channel to [0, 255] (PIL ImageOps.autocontrast, no cutoff).

    ``value * 255 / (hi - lo) - lo * 255 / (hi - lo)`` in float32, truncated; a constant
    channel is left as it is.
    """
    values = tf.cast(image, tf.float32)
    low = tf.reduce_min(values, axis=[0, 1])
    high = tf.reduce_max(values, axis=[0, 1])
    spread = high > low
    scale = 255.0 / tf.where(spread, high - low, 1.0)
    stretched = tf.cast(tf.clip_by_value(values * scale - low * scale, 0.0, 255.0), tf.uint8)
    return tf.where(spread, stretched, image)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Histogram equalisation of each channel (PIL ImageOps.equalize).

    With ``n`` pixels and ``last`` the count of the channel's highest value, ``step = (n -
    last) // 255``; value ``v`` maps to ``(count of values < v + step // 2) // step``. A
    channel with ``step == 0`` (nearly constant) is left as it is.
    """
    channels = []
    for c in range(3):
        channel = tf.cast(image[:, :, c], tf.int32)
        histogram = tf.math.bincount(tf.reshape(channel, [-1]), minlength=256, maxlength=256)
        last = tf.gather(histogram, tf.reduce_max(channel))
        step = (tf.reduce_sum(histogram) - last) // 255
        below = tf.concat([[0], tf.cumsum(histogram)[:-1]], axis=0)
        lut = tf.clip_by_value((below + step // 2) // tf.maximum(step, 1), 0, 255)
        channels.append(tf.where(step > 0, tf.gather(lut, channel), channel))
    return tf.cast(tf.stack(channels, axis=2), tf.uint8)


def _transform(image: tf.Tensor, matrix: list) -> tf.Tensor:
    """Maps output pixel (x, y) to the input's nearest pixel of ``matrix @ (x, y, 1)``.

    ``matrix`` holds the first 6 entries ``[a0, a1, a2, b0, b1, b2]`` of a projective
    transform without perspective; uncovered pixels become ``FILL_VALUE``.
    """
    transform = tf.stack([tf.cast(v, tf.float32) for v in matrix] + [0.0, 0.0])[tf.newaxis]
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=shape[:2],
        fill_value=float(FILL_VALUE), interpolation="NEAREST", fill_mode="CONSTANT")
    return out[0]


def rotate(image: tf.Tensor, degrees: Scalar) -> tf.Tensor:
    """Rotates counter-clockwise by ``degrees`` about the image centre."""
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(radians), tf.sin(radians)
    shape = tf.cast(tf.shape(image), tf.float32)
    x_max, y_max = shape[1] - 1.0, shape[0] - 1.0
    # The centre ((w - 1) / 2, (h - 1) / 2) maps to itself.
    x_offset = (x_max - (cos * x_max - sin * y_max)) / 2.0
    y_offset = (y_max - (sin * x_max + cos * y_max)) / 2.0
    return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset])


def shear_x(image: tf.Tensor, level: Scalar) -> tf.Tensor:
    """Output (x, y) takes input (x + level * y, y)."""
    return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, level: Scalar) -> tf.Tensor:
    """Output (x, y) takes input (x, level * x + y)."""
    return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0])


def translate_x(image: tf.Tensor, pixels: Scalar) -> tf.Tensor:
    """Output (x, y) takes input (x + pixels, y): positive ``pixels`` move the content left."""
    return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y(image: tf.Tensor, pixels: Scalar) -> tf.Tensor:
    """Output (x, y) takes input (x, y + pixels): positive ``pixels`` move the content up."""
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels])


def cutout(image: tf.Tensor, half_size: Scalar, center_y: Scalar, center_x: Scalar) -> tf.Tensor:
    """Paints rows ``[cy - s, cy + s)`` x columns ``[cx - s, cx + s)`` (clipped) grey."""
    shape = tf.shape(image)
    half_size = tf.cast(half_size, tf.int32)
    rows = tf.range(shape[0])[:, tf.newaxis, tf.newaxis]
    cols = tf.range(shape[1])[tf.newaxis, :, tf.newaxis]
    inside = ((rows >= center_y - half_size) & (rows < center_y + half_size)
              & (cols >= center_x - half_size) & (cols < center_x + half_size))
    return tf.where(inside, tf.constant(FILL_VALUE, tf.uint8), image)


# ---- Levels to arguments, policies ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Draws:
    """The random numbers one op may use: uniforms in [0, 1) for its sign and cutout centre."""

    sign: tf.Tensor
    center_y: tf.Tensor
    center_x: tf.Tensor


def _fraction(level: Scalar) -> tf.Tensor:
    # float64 as the original's Python arithmetic, so that int() truncates at the same values.
    return tf.cast(level, tf.float64) / MAX_LEVEL


def _signed(value: tf.Tensor, draws: _Draws) -> tf.Tensor:
    # Negated with probability 1/2.
    value = tf.cast(value, tf.float32)
    return tf.where(draws.sign < 0.5, -value, value)


def _enhance_factor(level: Scalar) -> tf.Tensor:
    return tf.cast(_fraction(level) * 1.8 + 0.1, tf.float32)


def _int(value: tf.Tensor) -> tf.Tensor:
    return tf.cast(value, tf.int32)  # truncates like Python's int() for values >= 0


OpFn = Callable[[tf.Tensor, Scalar, _Draws], tf.Tensor]


def _ops(translate_const: float, cutout_const: float) -> dict[str, OpFn]:
    """Each op by its original name, as ``fn(image, level, draws)``; ``level`` may be a
    Python number or a tensor."""

    def cutout_op(image: tf.Tensor, level: Scalar, draws: _Draws) -> tf.Tensor:
        shape = tf.cast(tf.shape(image), tf.float32)
        center_y = tf.cast(tf.floor(draws.center_y * shape[0]), tf.int32)
        center_x = tf.cast(tf.floor(draws.center_x * shape[1]), tf.int32)
        return cutout(image, _int(_fraction(level) * cutout_const), center_y, center_x)

    def translate(level: Scalar, draws: _Draws) -> tf.Tensor:
        return _signed(_fraction(level) * float(translate_const), draws)

    return {
        "AutoContrast": lambda image, level, draws: autocontrast(image),
        "Equalize": lambda image, level, draws: equalize(image),
        "Invert": lambda image, level, draws: invert(image),
        "Rotate": lambda image, level, draws: rotate(image, _signed(_fraction(level) * 30.0,
                                                                    draws)),
        "Posterize": lambda image, level, draws: posterize(image, _int(_fraction(level) * 4)),
        "Solarize": lambda image, level, draws: solarize(image, _int(_fraction(level) * 256)),
        "SolarizeAdd": lambda image, level, draws: solarize_add(
            image, _int(_fraction(level) * 110)),
        "Color": lambda image, level, draws: color(image, _enhance_factor(level)),
        "Contrast": lambda image, level, draws: contrast(image, _enhance_factor(level)),
        "Brightness": lambda image, level, draws: brightness(image, _enhance_factor(level)),
        "Sharpness": lambda image, level, draws: sharpness(image, _enhance_factor(level)),
        "ShearX": lambda image, level, draws: shear_x(image, _signed(_fraction(level) * 0.3,
                                                                     draws)),
        "ShearY": lambda image, level, draws: shear_y(image, _signed(_fraction(level) * 0.3,
                                                                     draws)),
        "TranslateX": lambda image, level, draws: translate_x(image, translate(level, draws)),
        "TranslateY": lambda image, level, draws: translate_y(image, translate(level, draws)),
        "Cutout": cutout_op,
    }


# AutoAugment's ImageNet policy ("v0"): 25 sub-policies of (op, probability, level).
POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)
AUTOAUGMENT_TRANSLATE_CONST = 250
AUTOAUGMENT_CUTOUT_CONST = 100

RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Cutout", "SolarizeAdd",
)
RANDAUGMENT_TRANSLATE_CONST = 100
RANDAUGMENT_CUTOUT_CONST = 40

# Uniform draws per op: apply?, sign, cutout centre (y, x).
_DRAWS_PER_OP = 4


def _check_image(image: tf.Tensor) -> None:
    if image.dtype != tf.uint8:
        raise ValueError(f"augmentation needs a uint8 image, got {image.dtype.name}")


def _draws(uniforms: tf.Tensor, start: int) -> _Draws:
    return _Draws(sign=uniforms[start + 1], center_y=uniforms[start + 2],
                  center_x=uniforms[start + 3])


def _index(uniform: tf.Tensor, count: int) -> tf.Tensor:
    """A uniform index in [0, count) from a uniform draw in [0, 1)."""
    return tf.minimum(tf.cast(uniform * count, tf.int32), count - 1)


def _apply_one_of(image: tf.Tensor, names: tuple, ops: dict, op_index: tf.Tensor,
                  level: tf.Tensor, draws: _Draws) -> tf.Tensor:
    """Applies ``names[op_index]`` (``op_index == len(names)``: nothing) at ``level``.

    One switch over the distinct ops keeps the graph small: each op is built once per
    step, whatever the number of sub-policies that use it.
    """
    branches = [lambda name=name: ops[name](image, level, draws) for name in names]
    return tf.switch_case(op_index, branches + [lambda: image])


def autoaugment_v0(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Applies one random sub-policy of ``POLICY_V0`` to a uint8 [H, W, 3] image.

    Args:
      image: uint8 [H, W, 3].
      seed: int32/int64 [2], the stateless seed every random choice comes from.
    """
    _check_image(image)
    ops = _ops(AUTOAUGMENT_TRANSLATE_CONST, AUTOAUGMENT_CUTOUT_CONST)
    names = tuple(sorted({name for steps in POLICY_V0 for name, _, _ in steps}))
    uniforms = tf.random.stateless_uniform([1 + 2 * _DRAWS_PER_OP], seed=seed)
    policy = _index(uniforms[0], len(POLICY_V0))
    for step in range(2):
        op_index = tf.gather([names.index(steps[step][0]) for steps in POLICY_V0], policy)
        probability = tf.gather([float(steps[step][1]) for steps in POLICY_V0], policy)
        level = tf.gather(tf.constant([steps[step][2] for steps in POLICY_V0], tf.float64),
                          policy)
        start = 1 + step * _DRAWS_PER_OP
        # Applied when u < probability (the original: floor(u + probability)).
        op_index = tf.where(uniforms[start] < probability, op_index, len(names))
        image = _apply_one_of(image, names, ops, op_index, level, _draws(uniforms, start))
    return image


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor) -> tf.Tensor:
    """Applies ``num_layers`` ops drawn uniformly from ``RANDAUGMENT_OPS``, each at ``magnitude``.

    Args:
      image: uint8 [H, W, 3].
      num_layers: number of ops applied in sequence (N of the paper).
      magnitude: the level of every op (M of the paper; 0..10 is the ops' designed range,
        more extrapolates as in the original).
      seed: int32/int64 [2] stateless seed.
    """
    _check_image(image)
    ops = _ops(RANDAUGMENT_TRANSLATE_CONST, RANDAUGMENT_CUTOUT_CONST)
    uniforms = tf.random.stateless_uniform([max(num_layers, 1) * _DRAWS_PER_OP], seed=seed)
    level = tf.constant(magnitude, tf.float64)
    for layer in range(num_layers):
        start = layer * _DRAWS_PER_OP
        # Always applied: the original drew a probability for each op but never used it.
        op_index = _index(uniforms[start], len(RANDAUGMENT_OPS))
        image = _apply_one_of(image, RANDAUGMENT_OPS, ops, op_index, level,
                              _draws(uniforms, start))
    return image


# ---- The hparams' choice ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What the hparams ``augment``, ``randaugment_num_layers`` and ``randaugment_magnitude``
    ask for; applied by the ImageNet training input after crop, resize and flip.

    Attributes:
      name: 'none', 'autoaugment' (policy v0) or 'randaugment'.
      num_layers: RandAugment's N (tensorflow/tpu's default 2).
      magnitude: RandAugment's M (tensorflow/tpu's default 10).
    """

    name: str = "none"
    num_layers: int = 2
    magnitude: float = 10.0

    def __post_init__(self) -> None:
        if self.name not in AUGMENTS:
            raise ConfigError(f"hparam 'augment': expected one of {', '.join(AUGMENTS)}, "
                              f"got '{self.name}'")
        if self.num_layers < 0:
            raise ConfigError(f"hparam 'randaugment_num_layers': must be >= 0, got "
                              f"{self.num_layers}")
        if self.magnitude < 0:
            raise ConfigError(f"hparam 'randaugment_magnitude': must be >= 0, got "
                              f"{self.magnitude}")

    @classmethod
    def from_hparams(cls, hparams: Any) -> Augmentation:
        """The augmentation of parsed hparams (``hparams.augment`` and the RandAugment two)."""
        return cls(hparams.augment, hparams.randaugment_num_layers,
                   hparams.randaugment_magnitude)

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def __call__(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The augmented uint8 image for a given stateless ``seed`` (int [2])."""
        if self.name == "autoaugment":
            return autoaugment_v0(image, seed)
        if self.name == "randaugment":
            return randaugment(image, self.num_layers, self.magnitude, seed)
        return image

    def random(self, image: tf.Tensor) -> tf.Tensor:
        """The augmented image with a fresh seed drawn for this call.

        Inside a tf.data map the draw is a new one for every element and every epoch, so the
        same record is augmented differently each time it is read.
        """
        if not self.enabled:
            return image
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
        return self(image, seed)

    def apply_to_unit_range(self, image: tf.Tensor) -> tf.Tensor:
        """Augments a float image in [0, 1] as the original did its float [0, 255] one.

        The value is clipped, scaled to [0, 255] and truncated to uint8 (the original's
        cast), augmented, and returned as float32 in [0, 1].
        """
        if not self.enabled:
            return image
        pixels = tf.cast(tf.clip_by_value(image * 255.0, 0.0, 255.0), tf.uint8)
        return tf.cast(self.random(pixels), tf.float32) / 255.0
