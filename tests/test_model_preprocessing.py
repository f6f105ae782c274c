"""A model's registered config drives the data path: crop, resize kernels, labels, normalisation.

A small model is registered whose config differs from ResNet v2's in every preprocessing
field; its evaluation images are compared with references computed independently from the
decoded image with TF1's public ops (``tf.compat.v1.image.resize_*``, ``tf.image.central_crop``)
and hand-computed crop windows, and its ImageNet labels are shifted. ResNet v2's pipeline
output is pinned bit for bit to the formula used before configs drove it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation, export
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import CheckpointError, ConfigError
from adversarial_logit_pairing.models import (
    _REGISTRY,
    ModelConfig,
    create_model,
    get_model_config,
    register_model,
    resnet_v2,
)
from adversarial_logit_pairing.models.layers import IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB
from tests import data_builders

NAME = "preprocessing_test_net"
TWIN = "preprocessing_test_net_unnormalized"
SCOPE = "PrepNet"
SIZE = 20
# Non-square, odd sides: crop offsets round, and the two square crops differ from the
# per-side central crop.
SHAPES = ((37, 53), (61, 42), (45, 45))
CUSTOM = ModelConfig(
    name=NAME, scope=SCOPE, default_image_size=24, num_classes=1000, background_class=False,
    eval_crop="central_fraction", crop_fraction=0.6, eval_resize="bilinear",
    train_resize="bilinear", input_normalization="imagenet_mean_std",
    classifier_scopes=(f"{SCOPE}/logits",),
)


def _tiny_resnet(config: ModelConfig, num_classes: int, seed=None, compute_dtype=tf.float32):
    """resnet_v2_tiny's layers under the config's own name and scope."""
    return resnet_v2.ResNetV2(resnet_v2.SPECS["resnet_v2_tiny"], config.scope, num_classes,
                              config, seed, compute_dtype)


@pytest.fixture(scope="module")
def registered():
    """Registers the test model and its twin without normalisation; unregisters them after."""
    twin = dataclasses.replace(CUSTOM, name=TWIN, input_normalization="none")
    for config in (CUSTOM, twin):
        assert config.name not in _REGISTRY
        register_model(_tiny_resnet, config)
    yield
    for name in (NAME, TWIN):
        del _REGISTRY[name]


def _photos(seed=0):
    rng = np.random.default_rng(seed)
    return [data_builders.synthetic_photo(h, w, rng) for h, w in SHAPES]


def encode_jpeg_444(image: np.ndarray) -> bytes:
    """JPEG bytes without chroma subsampling.

    The pipeline decodes only the crop window of a JPEG; with 4:2:0 chroma, libjpeg's chroma
    upsampling at the window's edge differs from a full decode by several grey levels, while
    4:4:4 JPEGs decode to the same pixels either way, so references can be exact.
    """
    return tf.io.encode_jpeg(image, format="rgb", quality=95,
                             chroma_downsampling=False).numpy()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """ImageNet shards of the photos (stored labels 1..3) as JPEG and as PNG, and the decoded
    pixels of each."""
    directories, decoded = {}, {}
    for encoding, encode in (("jpeg", encode_jpeg_444), ("png", data_builders.encode_png)):
        directory = str(tmp_path_factory.mktemp(encoding))
        encoded = [encode(photo) for photo in _photos()]
        records = [data_builders.imagenet_example(data, label)
                   for label, data in enumerate(encoded, start=1)]
        data_builders.write_imagenet_shards(directory, "validation", [records[:2], records[2:]])
        data_builders.write_imagenet_shards(directory, "train", [records])
        directories[encoding] = directory
        # References start from the whole decoded image (JPEG is lossy).
        decoded[encoding] = [tf.io.decode_image(data, channels=3).numpy() for data in encoded]
    return decoded, directories


def _eval_images(directory, config, size=SIZE):
    dataset, _, num_classes, _ = dataset_factory.get_dataset(
        "imagenet", "validation", 1, size, False, directory, model_config=config)
    images, labels = zip(*[(image[0].numpy(), int(label[0])) for image, label in dataset])
    # Evaluation reads shards in a fixed interleaved order; sort by label to match the photos.
    order = np.argsort(labels)
    return np.stack(images)[order], np.array(labels)[order], num_classes


def reference_eval_image(photo: np.ndarray, config: ModelConfig, size: int) -> np.ndarray:
    """The evaluation image the config describes, from TF1's public ops and plain arithmetic."""
    image = tf.image.convert_image_dtype(tf.constant(photo), tf.float32)
    height, width = photo.shape[:2]
    if config.eval_crop == "central_fraction":
        image = tf.image.central_crop(image, config.crop_fraction)
    else:
        fraction = (config.crop_fraction if config.eval_crop == "short_side"
                    else size / (size + 32))
        crop = int(fraction * min(height, width))
        top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
        image = image[top:top + crop, left:left + crop]
    resize = {"bicubic": tf.compat.v1.image.resize_bicubic,
              "bilinear": tf.compat.v1.image.resize_bilinear}[config.eval_resize]
    image = resize(image[tf.newaxis], [size, size], align_corners=False)[0]
    return np.clip((image.numpy() - 0.5) * 2.0, -1.0, 1.0)


RESNET = get_model_config("resnet_v2_50")
VARIANTS = {
    "resnet_v2_50": RESNET,
    "custom": CUSTOM,
    "padded_size": dataclasses.replace(RESNET, eval_crop="padded_size"),
    "bilinear_only": dataclasses.replace(RESNET, eval_resize="bilinear"),
    "fraction_only": dataclasses.replace(RESNET, crop_fraction=0.6),
}


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_eval_images_follow_each_configs_crop_and_kernel(shards, encoding):
    decoded, directories = shards
    photos = decoded[encoding]
    outputs = {}
    for variant, config in VARIANTS.items():
        images, _, _ = _eval_images(directories[encoding], config)
        for photo, image in zip(photos, images):
            reference = reference_eval_image(photo, config, SIZE)
            np.testing.assert_allclose(image, reference, atol=1e-6,
                                       err_msg=f"{variant} {photo.shape}")
        outputs[variant] = images
    # Every field on its own changes the images, far beyond the round-off tolerance.
    for variant in VARIANTS:
        if variant != "resnet_v2_50":
            difference = np.abs(outputs[variant] - outputs["resnet_v2_50"]).max()
            assert difference > 1e-2, variant


def test_padded_size_crop_depends_on_the_output_size(shards):
    decoded, directories = shards
    photos = decoded["png"]
    config = VARIANTS["padded_size"]
    # 37x53: a 14-pixel square at 20, int(64 / 96 * 37) = 24 pixels at 64.
    for size in (SIZE, 64):
        images, _, _ = _eval_images(directories["png"], config, size)
        np.testing.assert_allclose(images[0], reference_eval_image(photos[0], config, size),
                                   atol=1e-6)


def test_resnet_pipeline_is_bit_identical_to_the_formula_before_configs(tmp_path):
    encoded = [data_builders.encode_jpeg(photo) for photo in _photos()]  # 4:2:0 chroma
    data_builders.write_imagenet_shards(str(tmp_path), "validation", [[
        data_builders.imagenet_example(data, label) for label, data in enumerate(encoded, 1)]])
    expected = []
    for data in encoded:
        # ALP's eval preprocessing as the pipeline computed it before this change.
        shape = tf.image.extract_jpeg_shape(data)
        crop = tf.cast(0.875 * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
        window = tf.stack([((shape[0] - crop) + 1) // 2, ((shape[1] - crop) + 1) // 2,
                           crop, crop])
        image = tf.image.convert_image_dtype(
            tf.image.decode_and_crop_jpeg(data, window, channels=3), tf.float32)
        image = tf.raw_ops.ResizeBicubic(images=image[tf.newaxis], size=[SIZE, SIZE],
                                         align_corners=False, half_pixel_centers=False)[0]
        expected.append(tf.clip_by_value((image - 0.5) * 2.0, -1.0, 1.0).numpy())
    for config in (None, RESNET, get_model_config("resnet_v2_tiny")):
        images, labels, num_classes = _eval_images(str(tmp_path), config)
        assert np.array_equal(images, np.stack(expected))
        assert labels.tolist() == [1, 2, 3] and num_classes == 1001


def test_labels_are_shifted_for_a_model_without_background_class(shards):
    _, directories = shards
    _, labels, num_classes = _eval_images(directories["jpeg"], CUSTOM)
    assert labels.tolist() == [0, 1, 2] and num_classes == 1000
    _, labels, num_classes = _eval_images(directories["jpeg"], RESNET)
    assert labels.tolist() == [1, 2, 3] and num_classes == 1001
    train, _, num_classes, _ = dataset_factory.get_dataset(
        "imagenet", "train", 3, SIZE, True, directories["jpeg"], model_config=CUSTOM)
    seen = np.concatenate([labels.numpy() for _, labels in train.take(4)])
    assert set(seen.tolist()) <= {0, 1, 2} and 0 in seen and num_classes == 1000


def test_stored_label_zero_is_a_bad_record_for_a_1000_class_model(tmp_path):
    data = encode_jpeg_444(_photos()[0])
    data_builders.write_imagenet_shards(str(tmp_path), "validation", [[
        data_builders.imagenet_example(data, label) for label in (5, 0, 1000)]])
    # TF-Slim models: 0 is the background class, a valid label.
    _, labels, _ = _eval_images(str(tmp_path), RESNET)
    assert sorted(labels.tolist()) == [0, 5, 1000]
    dataset, *_ = dataset_factory.get_dataset("imagenet", "validation", 1, SIZE, False,
                                              str(tmp_path), model_config=CUSTOM)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image/class/label outside"):
        list(dataset)
    where = dataset_factory.locate_bad_record("imagenet", "validation", str(tmp_path), CUSTOM)
    assert where == "validation-00000-of-00001, record 1: image/class/label outside [1, 1001): 0"
    assert dataset_factory.locate_bad_record("imagenet", "validation", str(tmp_path)) is None


def test_inconsistent_class_count_and_background_class_is_a_config_error(shards):
    _, directories = shards
    with pytest.raises(ConfigError, match="num_classes=1001 with background_class=False"):
        dataset_factory.get_dataset("imagenet", "validation", 1, SIZE, False,
                                    directories["jpeg"],
                                    model_config=dataclasses.replace(CUSTOM, num_classes=1001))


def test_tiny_imagenet_resizes_the_whole_image_with_the_models_kernel(tmp_path):
    photo = _photos()[1]
    data_builders.write_records(str(tmp_path / "validation.tfrecord"), [
        data_builders.tiny_imagenet_example(data_builders.encode_png(photo), 7)])
    outputs = {}
    for name, config in (("custom", CUSTOM), ("resnet", RESNET)):
        dataset, _, num_classes, _ = dataset_factory.get_dataset(
            "tiny_imagenet", "validation", 1, SIZE, False, str(tmp_path), model_config=config)
        image, label = next(iter(dataset))
        # No crop, whatever eval_crop says: Tiny ImageNet's images are already crops.
        whole = dataclasses.replace(config, eval_crop="central_fraction", crop_fraction=1.0)
        np.testing.assert_allclose(image[0], reference_eval_image(photo, whole, SIZE),
                                   atol=1e-6, err_msg=name)
        assert (int(label[0]), num_classes) == (7, 200)
        outputs[name] = image[0].numpy()
    assert np.abs(outputs["custom"] - outputs["resnet"]).max() > 0.01


def _training_candidates(photo, kernel):
    """Every image a training crop (any window) of a 3x3 image, flipped or not, can give."""
    whole = dataclasses.replace(RESNET, eval_crop="central_fraction", crop_fraction=1.0,
                                eval_resize=kernel)
    candidates = []
    for height in (1, 2, 3):
        for width in (1, 2, 3):
            for top in range(4 - height):
                for left in range(4 - width):
                    window = photo[top:top + height, left:left + width]
                    image = reference_eval_image(window, whole, SIZE)
                    candidates += [image, image[:, ::-1]]
    return candidates


@pytest.mark.parametrize("name", ["imagenet", "tiny_imagenet"])
def test_training_resize_uses_the_models_train_kernel(tmp_path, name):
    # The training crop is random, but a 3x3 image has few windows: all are listed, and
    # every training image must be one of them resized with the train kernel.
    photo = _photos()[0][:3, :3]
    data = data_builders.encode_png(photo)
    if name == "imagenet":
        data_builders.write_imagenet_shards(str(tmp_path), "train", [[
            data_builders.imagenet_example(data, 1)]])
    else:
        data_builders.write_records(str(tmp_path / "train.tfrecord"), [
            data_builders.tiny_imagenet_example(data, 1)])
    for kernel, other in (("bilinear", "bicubic"), ("bicubic", "bilinear")):
        # The eval kernel is set to the other one: it must not leak into training.
        config = dataclasses.replace(CUSTOM, train_resize=kernel, eval_resize=other)
        dataset, *_ = dataset_factory.get_dataset(name, "train", 1, SIZE, True,
                                                  str(tmp_path), model_config=config)
        images = np.concatenate([image.numpy() for image, _ in dataset.take(12)])
        ours = _training_candidates(photo, kernel)
        theirs = _training_candidates(photo, other)

        def matches(image, candidates):
            return any(np.abs(image - c).max() < 1e-5 for c in candidates)

        assert all(matches(image, ours) for image in images), kernel
        # 1-pixel crops look alike under both kernels; larger ones tell them apart.
        assert not all(matches(image, theirs) for image in images), kernel


def test_normalisation_is_inside_the_model(registered):
    images = tf.constant(np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)),
                         tf.float32)
    model = create_model(NAME, 1000, seed=3)
    twin = create_model(TWIN, 1000, seed=3)  # same scope and seed: same weights
    by_hand = (255.0 * (images + 1.0) / 2.0 - IMAGENET_MEAN_RGB) / IMAGENET_STDDEV_RGB
    logits = model(images, is_training=False).numpy()
    np.testing.assert_allclose(logits, twin(by_hand, is_training=False).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(logits - twin(images, is_training=False).numpy()).max() > 1e-3


def _checkpoint_favouring(model, favoured, directory):
    """Saves ``model`` with a head that predicts ``favoured`` for every image."""
    scope = model.scope
    variables = model.variables_by_name
    variables[f"{scope}/logits/weights"].assign(
        tf.zeros_like(variables[f"{scope}/logits/weights"]))
    biases = np.zeros(model.num_classes, np.float32)
    biases[favoured] = 10.0
    variables[f"{scope}/logits/biases"].assign(biases)
    return checkpoints.save(variables, directory, step=1)


@pytest.mark.parametrize("model_name, favoured, accuracy", [
    (NAME, 1, 1.0),              # stored label 2 -> class 1
    ("resnet_v2_tiny", 1, 0.0),  # stored label 2 stays 2
    ("resnet_v2_tiny", 2, 1.0),
])
def test_evaluator_applies_the_registered_label_shift(
        registered, tmp_path, caplog, model_name, favoured, accuracy):
    data = data_builders.encode_jpeg(_photos()[0])
    data_builders.write_imagenet_shards(str(tmp_path / "data"), "validation", [[
        data_builders.imagenet_example(data, 2) for _ in range(4)]])
    num_classes = get_model_config(model_name).num_classes
    prefix = _checkpoint_favouring(create_model(model_name, num_classes, seed=0), favoured,
                                   str(tmp_path / "ckpt"))
    config = evaluation.EvalConfig(
        checkpoint_path=prefix, model_name=model_name, dataset="imagenet",
        dataset_image_size=SIZE, hparams="eval_batch_size=2", moving_average_decay=-1,
        imagenet_data_dir=str(tmp_path / "data"))
    # The absl logger's own level: an earlier in-process flag parse may have set WARNING.
    with caplog.at_level(logging.INFO, logger="absl"):
        evaluator = evaluation.Evaluator(config)
    result = evaluator.evaluate(prefix)
    assert (result.accuracy, result.num_examples) == (accuracy, 4)
    native = get_model_config(model_name).default_image_size
    assert f"--dataset_image_size={SIZE} differs from {model_name}'s native size {native}" in (
        caplog.text)


def test_export_and_hints_read_the_classifier_scopes(registered, tmp_path):
    model = create_model(NAME, 1000, seed=0)
    prefix = checkpoints.save(model.variables_by_name, str(tmp_path), step=1)
    assert export.resolve_num_classes(NAME, prefix, None, None) == 1000
    assert export.resolve_num_classes(NAME, prefix, None, "imagenet") == 1000
    assert export.resolve_num_classes("resnet_v2_tiny", prefix, None, "imagenet") == 1001
    with pytest.raises(ConfigError, match="1000 classes for preprocessing_test_net"):
        export.resolve_num_classes(NAME, prefix, 1001, "imagenet")
    # Another family's head name: the hint names it as the scope to exclude.
    head = {"e/head/dense/kernel": tf.Variable(tf.ones([4, 1000])),
            "e/head/dense/bias": tf.Variable(tf.ones([1000]))}
    prefix = checkpoints.save(head, str(tmp_path / "e"), step=1)
    smaller = {"e/head/dense/kernel": tf.Variable(tf.ones([4, 200])),
               "e/head/dense/bias": tf.Variable(tf.ones([200]))}
    with pytest.raises(CheckpointError) as info:
        checkpoints.restore(smaller, prefix, classifier_scopes=("e/head/dense",))
    assert "trained for 1000 classes, the model has 200" in str(info.value)
    assert "--finetune_exclude_pretrained_scopes=e/head/dense" in str(info.value)
