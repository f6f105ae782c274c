"""AutoAugment / RandAugment: every op against PIL (or a hand value), the policies' levels,
ranges, determinism per seed and fresh draws per epoch.

PIL's ImageOps / ImageEnhance / Image.transform are the independent reference: the original
ops were written as their TensorFlow equivalents. Geometric ops are compared with PIL's
nearest-neighbour affine transform (PIL samples at pixel centres, hence its half-pixel
offset in the shear references).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from adversarial_logit_pairing.datasets import autoaugment as aa
from adversarial_logit_pairing.errors import ConfigError

GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """uint8 13x17 RGB noise; one channel squeezed into [40, 167] so that autocontrast and
    equalize have work to do."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    pixels[:, :, 1] = pixels[:, :, 1] // 2 + 40
    return pixels


def _pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels)


def _assert_equal(ours, reference, atol=0):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    np.testing.assert_allclose(ours.astype(int), reference.astype(int), atol=atol, rtol=0)


def _affine(pixels, coefficients):
    return np.asarray(_pil(pixels).transform(
        (pixels.shape[1], pixels.shape[0]), Image.AFFINE, coefficients,
        resample=Image.NEAREST, fillcolor=GREY))


def test_histogram_ops_equal_pil(image):
    # Equalize needs at least 256 pixels per channel beyond the top value's count to act at
    # all (step >= 1): a 24x24 image, its values skewed towards the dark end.
    rng = np.random.default_rng(5)
    skewed = (rng.beta(1.5, 4.0, size=(24, 24, 3)) * 255).astype(np.uint8)
    equalized = aa.equalize(skewed)
    _assert_equal(equalized, ImageOps.equalize(_pil(skewed)))
    assert not np.array_equal(equalized, skewed)
    _assert_equal(aa.equalize(image), ImageOps.equalize(_pil(image)))
    _assert_equal(aa.autocontrast(image), ImageOps.autocontrast(_pil(image)))
    _assert_equal(aa.invert(image), ImageOps.invert(_pil(image)))


def test_constant_channel_is_left_alone_by_autocontrast_and_equalize(image):
    flat = image.copy()
    flat[:, :, 2] = 77
    for op in (aa.autocontrast, aa.equalize):
        np.testing.assert_array_equal(op(flat).numpy()[:, :, 2], 77)


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_equals_pil(image, bits):
    _assert_equal(aa.posterize(image, bits), ImageOps.posterize(_pil(image), bits))


def test_posterize_to_zero_bits_keeps_the_top_bit_as_the_original_did(image):
    # The original's shift by 8 was clamped to 7 by TensorFlow: one bit survived.
    _assert_equal(aa.posterize(image, 0), image & 0x80)


@pytest.mark.parametrize("threshold", [0, 77, 128, 256])
def test_solarize_equals_pil(image, threshold):
    _assert_equal(aa.solarize(image, threshold), ImageOps.solarize(_pil(image), threshold))


def test_solarize_add_adds_below_the_threshold_and_clips(image):
    values = image.astype(int)
    expected = np.where(values < 128, np.minimum(values + 150, 255), values)
    assert np.sum(expected == 255) > np.sum(image == 255)  # the clip matters
    _assert_equal(aa.solarize_add(image, 150), expected)


@pytest.mark.parametrize("factor", [0.1, 0.55, 1.0, 1.9])
def test_enhance_ops_equal_pil(image, factor):
    pil = _pil(image)
    # Brightness and contrast blend from an exact constant: bit for bit.
    _assert_equal(aa.brightness(image, factor), ImageEnhance.Brightness(pil).enhance(factor))
    _assert_equal(aa.contrast(image, factor), ImageEnhance.Contrast(pil).enhance(factor))
    # Colour: tf.image's luma weights round differently from PIL's fixed point; sharpness:
    # the smoothed image is truncated (the original) where PIL rounds. One level at most.
    _assert_equal(aa.color(image, factor), ImageEnhance.Color(pil).enhance(factor), atol=1)
    _assert_equal(aa.sharpness(image, factor), ImageEnhance.Sharpness(pil).enhance(factor),
                  atol=1)


def test_contrast_blends_towards_the_mean_grey_not_the_pixel_count():
    # 16x16 mid-dark image: mean grey 40, while the original's sum(histogram) / 256 is 1.
    dark = np.full((16, 16, 3), 40, np.uint8)
    dark[::2, ::2] = 60
    mean = int(np.round(np.mean(np.asarray(_pil(dark).convert("L")))))
    expected = np.clip(mean + 0.5 * (dark.astype(np.float32) - mean), 0, 255).astype(np.uint8)
    _assert_equal(aa.contrast(dark, 0.5), expected)


@pytest.mark.parametrize("degrees", [17.0, -23.0, 90.0])
def test_rotate_equals_pil_about_the_centre(image, degrees):
    reference = _pil(image).rotate(degrees, resample=Image.NEAREST, fillcolor=GREY)
    _assert_equal(aa.rotate(image, degrees), reference)


def test_rotate_by_90_degrees_is_numpy_rot90(image):
    square = image[:, :13]
    _assert_equal(aa.rotate(square, 90.0), np.rot90(square))


@pytest.mark.parametrize("level", [0.27, -0.13, 0.3])
def test_shears_equal_pil_affine(image, level):
    _assert_equal(aa.shear_x(image, level), _affine(image, (1, level, -level / 2, 0, 1, 0)))
    _assert_equal(aa.shear_y(image, level), _affine(image, (1, 0, 0, level, 1, -level / 2)))


@pytest.mark.parametrize("pixels", [3, -5, 40])
def test_translations_shift_the_content_and_fill_grey(image, pixels):
    expected_x = np.full_like(image, 128)
    expected_y = np.full_like(image, 128)
    height, width = image.shape[:2]
    # Output column x takes input column x + pixels.
    for x in range(width):
        if 0 <= x + pixels < width:
            expected_x[:, x] = image[:, x + pixels]
    for y in range(height):
        if 0 <= y + pixels < height:
            expected_y[y] = image[y + pixels]
    _assert_equal(aa.translate_x(image, float(pixels)), expected_x)
    _assert_equal(aa.translate_y(image, float(pixels)), expected_y)


def test_cutout_paints_a_clipped_grey_square(image):
    expected = image.copy()
    expected[2:8, 0:3] = 128  # centre (5, 0), half side 3: rows 2..7, columns -3..2
    _assert_equal(aa.cutout(image, 3, 5, 0), expected)


def test_levels_map_to_the_originals_arguments(image):
    """Level -> argument of each op, with the sign draw at 'positive' (u >= 0.5)."""
    keep_sign = aa._Draws(sign=tf.constant(0.9), center_y=tf.constant(0.5),
                          center_x=tf.constant(0.0))
    flip_sign = aa._Draws(sign=tf.constant(0.1), center_y=tf.constant(0.5),
                          center_x=tf.constant(0.0))
    auto = aa._ops(aa.AUTOAUGMENT_TRANSLATE_CONST, aa.AUTOAUGMENT_CUTOUT_CONST)
    rand = aa._ops(aa.RANDAUGMENT_TRANSLATE_CONST, aa.RANDAUGMENT_CUTOUT_CONST)
    pil = _pil(image)
    cases = [
        # Posterize level 6 -> int(2.4) = 2 bits; Solarize level 3 -> int(76.8) = 76.
        (auto["Posterize"](image, 6.0, keep_sign), ImageOps.posterize(pil, 2)),
        (auto["Solarize"](image, 3.0, keep_sign), ImageOps.solarize(pil, 76)),
        # SolarizeAdd level 3 -> + int(33.0) = 33 below 128.
        (auto["SolarizeAdd"](image, 3.0, keep_sign),
         np.where(image < 128, np.minimum(image.astype(int) + 33, 255), image)),
        # Brightness level 5 -> 5/10 * 1.8 + 0.1 = 1.0: identity; level 9 -> 1.72.
        (rand["Brightness"](image, 5.0, keep_sign), image),
        (rand["Brightness"](image, 9.0, keep_sign),
         ImageEnhance.Brightness(pil).enhance(1.72)),
        # Rotate level 8 -> 24 degrees, negated by the sign draw.
        (auto["Rotate"](image, 8.0, keep_sign),
         pil.rotate(24.0, resample=Image.NEAREST, fillcolor=GREY)),
        (auto["Rotate"](image, 8.0, flip_sign),
         pil.rotate(-24.0, resample=Image.NEAREST, fillcolor=GREY)),
        # ShearX level 9 -> 0.27.
        (auto["ShearX"](image, 9.0, keep_sign), _affine(image, (1, 0.27, -0.135, 0, 1, 0))),
        # Translate level 1: 25 pixels in AutoAugment (const 250), 10 in RandAugment (100).
        (auto["TranslateX"](image, 1.0, flip_sign), _affine(image, (1, 0, -25, 0, 1, 0))),
        (rand["TranslateY"](image, 1.0, keep_sign), _affine(image, (1, 0, 0, 0, 1, 10))),
        # Cutout level 1 in RandAugment: half side int(4.0) = 4, centre (int(0.5 * 13), 0).
        (rand["Cutout"](image, 1.0, keep_sign), aa.cutout(image, 4, 6, 0)),
    ]
    for index, (ours, reference) in enumerate(cases):
        assert np.array_equal(np.asarray(ours), np.asarray(reference)), f"case {index}"


def test_policy_v0_table():
    assert len(aa.POLICY_V0) == 25
    assert all(len(steps) == 2 for steps in aa.POLICY_V0)
    ops = aa._ops(1, 1)
    for steps in aa.POLICY_V0:
        for name, probability, level in steps:
            assert name in ops and 0 <= probability <= 1 and 0 <= level <= 10
    assert len(aa.RANDAUGMENT_OPS) == 16 and set(aa.RANDAUGMENT_OPS) == set(ops)


@pytest.mark.parametrize("augmentation", [
    aa.Augmentation("autoaugment"),
    aa.Augmentation("randaugment", num_layers=2, magnitude=10.0),
    aa.Augmentation("randaugment", num_layers=3, magnitude=20.0),
])
def test_policies_are_deterministic_per_seed_and_vary_across_seeds(image, augmentation):
    outputs = []
    for seed in range(12):
        first = augmentation(tf.constant(image), tf.constant([seed, 7]))
        again = augmentation(tf.constant(image), tf.constant([seed, 7]))
        assert first.dtype == tf.uint8 and first.shape == image.shape
        np.testing.assert_array_equal(first.numpy(), again.numpy())
        outputs.append(first.numpy().tobytes())
    assert len(set(outputs)) >= 4


def test_float_path_stays_in_the_unit_range_inside_tf_data_and_differs_per_epoch(image):
    """The pipeline's use: float [0, 1] in and out, a fresh seed for every element read.

    As in the training input, the data repeats before the map: each repetition of this
    one-image data set is an epoch. (AutoAugment inside the ImageNet training pipeline:
    test_efficientnet_preprocessing.)
    """
    unit = tf.constant(image, tf.float32) / 255.0
    for augmentation in (aa.Augmentation("randaugment"),):
        epochs = tf.data.Dataset.from_tensors(unit).repeat(12).map(
            augmentation.apply_to_unit_range)
        seen = []
        for values in epochs.as_numpy_iterator():
            assert values.dtype == np.float32 and values.shape == image.shape
            assert values.min() >= 0.0 and values.max() <= 1.0
            # Multiples of 1/255: the augmentation really went through uint8.
            np.testing.assert_allclose(values * 255, np.round(values * 255), atol=1e-4)
            seen.append(values.tobytes())
        assert len(set(seen)) >= 4, augmentation.name


def test_none_is_the_identity_and_bad_settings_name_the_hparam(image):
    unit = tf.constant(image, tf.float32) / 255.0
    assert aa.Augmentation().apply_to_unit_range(unit) is unit
    with pytest.raises(ConfigError, match="hparam 'augment'.*autoaugment"):
        aa.Augmentation("autoaugmnt")
    with pytest.raises(ConfigError, match="randaugment_num_layers"):
        aa.Augmentation("randaugment", num_layers=-1)
    with pytest.raises(ConfigError, match="randaugment_magnitude"):
        aa.Augmentation("randaugment", magnitude=-2.0)
    with pytest.raises(ValueError, match="uint8"):
        aa.autoaugment_v0(unit, tf.constant([0, 0]))
