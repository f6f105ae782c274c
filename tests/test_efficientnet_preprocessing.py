"""EfficientNet's ImageNet preprocessing, read from the registered ``efficientnet_b*`` configs.

Evaluation (SPEC section 3): a centred square of ``int(size / (size + 32) * min(h, w))``
pixels, offsets ``((side - crop) + 1) // 2``, TF1 ``resize_bicubic`` (no half-pixel centres) to
size x size. The windows below are computed by hand; the kernel reference is
``tf.compat.v1.image.resize_bicubic`` on the hand-cropped decoded pixels.

Training (tensorflow/tpu ``_decode_and_random_crop``): a distorted box sampled around the
WHOLE image (aspect 3/4..4/3, area 0.08..1, the record's object boxes ignored), the eval
centre crop when the sampler gives the whole image, bicubic resize, random flip, and the
hparams' AutoAugment / RandAugment.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.datasets import dataset_factory, imagenet_input
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.models import get_model_config
from tests import data_builders

B0 = get_model_config("efficientnet_b0")
B0_AP = get_model_config("efficientnet_b0_ap")
RESNET = get_model_config("resnet_v2_50")

# (height, width, output size) -> hand-computed window (top, left, crop side).
#   37x53 at 224: int(224/256 * 37) = int(32.375) = 32; top (5 + 1) // 2 = 3, left 22 // 2 = 11.
#   91x74 at 20:  int(20/52 * 74) = int(28.46) = 28; top (63 + 1) // 2 = 32, left 47 // 2 = 23
#                 (padding 31 or 33 instead of 32 would give 29 or 27).
#   45x45 at 240: int(240/272 * 45) = int(39.7) = 39; top = left = (6 + 1) // 2 = 3.
#   4x64 at 16:   int(16/48 * 4) = int(1.33) = 1; top (3 + 1) // 2 = 2, left 64 // 2 = 32.
EVAL_WINDOWS = {
    (37, 53, 224): (3, 11, 32),
    (91, 74, 20): (32, 23, 28),
    (45, 45, 240): (3, 3, 39),
    (4, 64, 16): (2, 32, 1),
}


def _jpeg_444(pixels: np.ndarray) -> bytes:
    """JPEG without chroma subsampling: a window decodes to the same pixels as the whole."""
    return tf.io.encode_jpeg(pixels, format="rgb", quality=95,
                             chroma_downsampling=False).numpy()


def _decode(data: bytes) -> np.ndarray:
    return tf.io.decode_jpeg(data, channels=3).numpy()


def _model_units(unit: np.ndarray) -> np.ndarray:
    return np.clip((unit - 0.5) * 2.0, -1.0, 1.0)


def _tf1_bicubic(pixels: np.ndarray, size: int) -> np.ndarray:
    image = tf.constant(pixels, tf.float32)[tf.newaxis] / 255.0
    return tf.compat.v1.image.resize_bicubic(image, [size, size], align_corners=False)[0].numpy()


@pytest.mark.parametrize("shape", list(EVAL_WINDOWS))
def test_eval_crop_window_is_the_padded_centre_square(shape):
    height, width, size = shape
    top, left, crop = EVAL_WINDOWS[shape]
    for config in (B0, B0_AP):
        window = imagenet_input.image_decoding.eval_crop_window(
            tf.constant([height, width, 3]), config.eval_crop, config.crop_fraction, size)
        assert window.numpy().tolist() == [top, left, crop, crop]


@pytest.fixture(scope="module")
def photos():
    rng = np.random.default_rng(3)
    return {shape: data_builders.synthetic_photo(shape[0], shape[1], rng)
            for shape in EVAL_WINDOWS}


def test_eval_images_are_tf1_bicubic_of_the_hand_window(tmp_path, photos):
    """Through the real pipeline (TFRecord shards, decode-and-crop), one image per size.

    The standard and AdvProp names preprocess alike ([-1, 1]; their normalisation is inside
    the model), so the sizes alternate between the two.
    """
    assert B0.eval_crop == B0_AP.eval_crop == "padded_size"
    for index, (shape, photo) in enumerate(photos.items()):
        height, width, size = shape
        config = (B0, B0_AP)[index % 2]
        directory = str(tmp_path / str(index))
        data = _jpeg_444(photo)
        data_builders.write_imagenet_shards(
            directory, "validation", [[data_builders.imagenet_example(data, 7)]])
        dataset, _, classes, _ = dataset_factory.get_dataset(
            "imagenet", "validation", 1, size, False, directory, model_config=config)
        (image, label), = list(dataset.as_numpy_iterator())
        assert classes == 1000 and label.tolist() == [6]  # stored 1..1000 -> 0..999
        top, left, crop = EVAL_WINDOWS[shape]
        window = _decode(data)[top:top + crop, left:left + crop]
        reference = _model_units(_tf1_bicubic(window, size))
        np.testing.assert_allclose(image[0], reference, atol=2e-6,
                                   err_msg=f"{config.name} {shape}")
        if crop > 1:
            # The kernel and the window matter: TF2's half-pixel bicubic, or the window one
            # row lower, are far off.
            half_pixel = tf.image.resize(tf.constant(window, tf.float32)[tf.newaxis] / 255.0,
                                         [size, size], method="bicubic")[0].numpy()
            assert np.abs(_model_units(half_pixel) - reference).max() > 1e-2
            shifted = _decode(data)[top + 1:top + 1 + crop, left:left + crop]
            assert np.abs(_model_units(_tf1_bicubic(shifted, size)) - reference).max() > 1e-2


def _windows(config, shape, boxes, size, count):
    window_fn = tf.function(lambda: imagenet_input.training_crop_window(
        tf.constant(shape, tf.int32), tf.constant(boxes, tf.float32), size, config))
    return np.array([window_fn().numpy() for _ in range(count)])


def test_training_window_samples_the_whole_image_box_within_the_originals_ranges():
    height, width, size = 90, 120, 224
    # A small object box in the top-left corner: ALP's crop must cover 10% of it, the
    # EfficientNet crop ignores it.
    corner = [[[0.0, 0.0, 0.1, 0.1]]]
    windows = _windows(B0, (height, width, 3), corner, size, 60)
    top, left, crop_h, crop_w = windows.T
    assert np.all((top >= 0) & (left >= 0) & (top + crop_h <= height) & (left + crop_w <= width))
    aspect = crop_w / crop_h
    # Integer sides round the sampled aspect and area.
    assert np.all((aspect >= 0.75 - 0.05) & (aspect <= 4 / 3 + 0.05)), aspect
    assert np.all(crop_h * crop_w >= 0.08 * height * width * 0.9)
    assert not np.any((crop_h == height) & (crop_w == width))
    # Many sampled windows miss the object box entirely (the eval-crop fallback, window
    # (6, 21, 78, 78), would miss it too, so it does not count).
    centre = (top == 6) & (left == 21) & (crop_h == 78) & (crop_w == 78)
    off_corner = ((top >= 9) | (left >= 12)) & ~centre
    assert off_corner.sum() >= 10

    alp = _windows(RESNET, (height, width, 3), corner, size, 30)
    top, left, crop_h, crop_w = alp.T
    covered = (np.clip(9 - top, 0, None) * np.clip(12 - left, 0, None)) / (9 * 12)
    assert np.all(covered >= 0.1 - 1e-6)


def test_training_window_falls_back_to_the_eval_crop_when_no_box_fits():
    # 4x64: any window of aspect 3/4..4/3 has at most 4x5 = 20 < 0.08 * 256 pixels, so every
    # attempt fails and the sampler returns the whole image.
    windows = _windows(B0, (4, 64, 3), np.zeros([1, 0, 4]), 16, 5)
    assert windows.tolist() == [[2, 32, 1, 1]] * 5  # EVAL_WINDOWS[(4, 64, 16)]
    # ALP's ImageNet crop keeps the whole image instead.
    assert _windows(RESNET, (4, 64, 3), np.zeros([1, 0, 4]), 16, 2).tolist() == [[0, 0, 4, 64]] * 2


def _train_images(directory, config, size, count, augmentation=None):
    dataset, *_ = dataset_factory.get_dataset("imagenet", "train", 1, size, True, directory,
                                              model_config=config, augmentation=augmentation)
    return np.stack([image[0] for image, _ in dataset.take(count).as_numpy_iterator()])


def test_training_pipeline_uses_the_registered_crop_then_flips(tmp_path, photos):
    photo = photos[(4, 64, 16)]
    data = _jpeg_444(photo)
    # The record's object box must not matter to EfficientNet.
    data_builders.write_imagenet_shards(str(tmp_path), "train", [[
        data_builders.imagenet_example(data, 3, [(0.0, 0.0, 1.0, 0.5)])]])
    centre = _model_units(_tf1_bicubic(_decode(data)[2:3, 32:33], 16))
    images = _train_images(str(tmp_path), B0, 16, 6)
    for image in images:
        assert (np.allclose(image, centre, atol=2e-6)
                or np.allclose(image, centre[:, ::-1], atol=2e-6))


def test_augmentation_runs_in_the_training_pipeline_and_differs_per_epoch(tmp_path):
    # A uniform grey image: crops, resizes and flips all give the same image, so any
    # difference between epochs comes from the augmentation. (RandAugment inside tf.data is
    # covered by test_autoaugment.)
    flat = np.full((24, 30, 3), 90, np.uint8)
    data_builders.write_imagenet_shards(str(tmp_path), "train", [[
        data_builders.imagenet_example(_jpeg_444(flat), 5)]])
    plain = _train_images(str(tmp_path), B0, 12, 4)
    assert len({image.round(4).tobytes() for image in plain}) == 1
    images = _train_images(str(tmp_path), B0, 12, 16, Augmentation("autoaugment"))
    assert images.dtype == np.float32 and images.shape == (16, 12, 12, 3)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert len({image.round(3).tobytes() for image in images}) >= 3
