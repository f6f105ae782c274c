"""Inception v3 against TF-Slim's ``nets.inception_v3`` (names, numerics, batch-norm updates).

The reference is TF-Slim itself, run in its own TF1 graph by ``tests/slim_reference.py``, at
299x299 and at 224x224, where Slim shrinks the AuxLogits conv and so renames its variables
(``Conv2d_2a_5x5`` -> ``Conv2d_2a_3x3``). Our model must reproduce the variable names, shapes
and creation order exactly, and the logits, AuxLogits and moving-statistics updates to
float32 round-off, with random weights transplanted by name.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import create_model, get_model_config, inception_v3
from adversarial_logit_pairing.models.layers import BatchNorm
from tests import slim_reference

pytestmark = pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")

BATCH = 2
COMPARED_END_POINTS = ("Mixed_5b", "Mixed_6e", "Mixed_7c", "PreLogits")


def _images(count: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (count, size, size, 3)).astype(
        np.float32
    )


def _assign(model, values: dict[str, np.ndarray]) -> None:
    for name, variable in model.variables_by_name.items():
        variable.assign(values[name])


def _snapshot(model) -> dict[str, np.ndarray]:
    return {name: variable.numpy() for name, variable in model.variables_by_name.items()}


def calibrated_values(model, values, images, seed: int) -> dict[str, np.ndarray]:
    """``values`` with moving statistics that follow the activations of ``images``.

    Inception has no residual path: with independent random moving means and variances the
    signal fades through ~50 layers and every image gets the same inference logits. So each
    batch norm's statistics are first set to its batch statistics (one training pass with
    decay 0), then perturbed (mean by 0.2 sigma, variance by a factor 0.7..1.4) so that
    inference and training passes still differ clearly.
    """
    _assign(model, values)
    norms = [module for module in model.submodules if isinstance(module, BatchNorm)]
    assert len(norms) == 96  # 94 in the base, 2 in AuxLogits
    decays = [norm.decay for norm in norms]
    try:
        for norm in norms:
            norm.decay = 0.0
        model.end_points(tf.constant(images), is_training=True)
    finally:
        for norm, decay in zip(norms, decays):
            norm.decay = decay
    rng = np.random.default_rng(seed)
    calibrated = dict(values)
    for norm in norms:
        mean, variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
        calibrated[norm.scope + "/moving_mean"] = (
            mean + 0.2 * np.sqrt(variance) * rng.normal(size=mean.shape)).astype(np.float32)
        calibrated[norm.scope + "/moving_variance"] = (
            variance * rng.uniform(0.7, 1.4, variance.shape)).astype(np.float32)
    _assign(model, calibrated)
    return calibrated


@functools.cache
def _case(size: int):
    """(size, model, values, images, Slim's {is_training: SlimRun}): one Slim build per size."""
    if size == 299:
        model = create_model("inception_v3", 1001)  # unseeded: the stateful generator is faster
    else:
        model = inception_v3.build(get_model_config("inception_v3"), 1001, image_size=size)
    shapes = {name: tuple(v.shape.as_list()) for name, v in model.variables_by_name.items()}
    images = _images(BATCH, size, seed=size)
    values = slim_reference.random_variable_values(shapes, seed=size)
    values = calibrated_values(model, values, images, seed=size)
    slim = slim_reference.run_slim_inception_v3(images, values, end_points=COMPARED_END_POINTS)
    return size, model, values, images, slim


@functools.cache
def _small_model():
    """A seeded 10-class model for 107x107 images (the smallest AuxLogits size: cheap)."""
    return inception_v3.build(get_model_config("inception_v3"), 10, seed=0, image_size=107)


@pytest.fixture(scope="module", autouse=True)
def _release_cases():
    yield
    _case.cache_clear()  # the models need not outlive this module
    _small_model.cache_clear()


@pytest.fixture(params=[299, 224], ids=["299", "224"])
def case(request):
    return _case(request.param)


def test_variables_match_slim_names_shapes_and_order(case):
    size, model, _, _, slim = case
    ours = [(name, tuple(v.shape.as_list())) for name, v in model.variables_by_name.items()]
    assert ours == [(name, value.shape) for name, value in slim[False].variables.items()]
    assert len(ours) == 388
    for name, variable in model.variables_by_name.items():
        assert variable.name == name + ":0"
        assert variable.dtype == tf.float32
    names = set(model.variables_by_name)
    kernel = {299: 5, 224: 3}[size]
    assert f"InceptionV3/AuxLogits/Conv2d_2a_{kernel}x{kernel}/weights" in names
    # Slim's naming traps, which the released checkpoints carry.
    for trap in ("Mixed_5c/Branch_1/Conv2d_0b_1x1", "Mixed_5c/Branch_1/Conv_1_0c_5x5",
                 "Mixed_6a/Branch_0/Conv2d_1a_1x1", "Mixed_6a/Branch_1/Conv2d_1a_1x1",
                 "Mixed_7b/Branch_1/Conv2d_0b_3x1", "Mixed_7c/Branch_1/Conv2d_0c_3x1"):
        assert f"InceptionV3/{trap}/weights" in names
    # Batch norm without gamma; the two classifier convs with biases and no batch norm.
    assert not any(name.endswith("/gamma") for name in names)
    assert {name for name in names if name.endswith("/biases")} == {
        "InceptionV3/AuxLogits/Conv2d_2b_1x1/biases", "InceptionV3/Logits/Conv2d_1c_1x1/biases"}


def test_inference_logits_and_aux_logits_match_slim(case):
    _, model, _, images, slim = case
    reference = slim[False]
    points = model.end_points(tf.constant(images), is_training=False)
    logits, aux_logits = points["Logits"].numpy(), points["AuxLogits"].numpy()
    assert logits.dtype == aux_logits.dtype == np.float32
    assert logits.shape == aux_logits.shape == (BATCH, 1001)
    # Not a degenerate comparison: the two images give clearly different outputs.
    assert np.ptp(reference.logits, axis=0).max() > 0.1
    assert np.ptp(reference.aux_logits, axis=0).max() > 0.1
    np.testing.assert_allclose(logits, reference.logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux_logits, reference.aux_logits, atol=1e-4, rtol=0)
    for name in COMPARED_END_POINTS:
        np.testing.assert_allclose(points[name].numpy(), reference.end_points[name],
                                   atol=1e-4, rtol=0, err_msg=name)
    # model(...) is the same network without the AuxLogits head.
    np.testing.assert_array_equal(model(tf.constant(images), is_training=False).numpy(),
                                  logits)


def test_training_step_matches_slim_logits_and_moving_statistics(case):
    size, model, values, images, slim = case
    reference = slim[True]
    # Slim's training pass ran with keep probability 1, which makes it deterministic; the
    # 0.8 dropout itself is pinned by test_dropout_keeps_0_8_in_training_only.
    model.dropout_keep_prob = 1.0
    try:
        with tf.GradientTape() as tape:
            logits, aux_logits = model.logits_and_aux(tf.constant(images), is_training=True)
            loss = tf.reduce_sum(tf.square(logits)) + 0.4 * tf.reduce_sum(tf.square(aux_logits))
        gradients = tape.gradient(loss, model.trainable_variables) if size == 224 else None
        after = _snapshot(model)
    finally:
        model.dropout_keep_prob = inception_v3.DROPOUT_KEEP_PROB
        _assign(model, values)
    np.testing.assert_allclose(logits.numpy(), reference.logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux_logits.numpy(), reference.aux_logits, atol=1e-4, rtol=0)
    assert np.ptp(reference.logits, axis=0).max() > 0.1
    if gradients is not None:
        assert all(g is not None for g in gradients)
    # Decay 0.9997 moves a statistic by 3e-4 of its distance to the batch's: compare the
    # moves themselves, each to 1e-3 of the largest move of its variable (plus the float32
    # spacing of the statistic, in which the moves are rounded).
    moved = 0
    for name, value in after.items():
        ours, theirs = value - values[name], reference.variables[name] - values[name]
        if name.endswith(("/moving_mean", "/moving_variance")):
            scale = np.abs(theirs).max()
            assert scale > 0, name
            spacing = np.spacing(np.abs(values[name]).max())
            np.testing.assert_allclose(ours, theirs, atol=1e-3 * scale + 2 * spacing, rtol=0,
                                       err_msg=name)
            moved += 1
        else:
            np.testing.assert_array_equal(value, values[name], err_msg=name)
            np.testing.assert_array_equal(theirs, 0, err_msg=name)
    assert moved == 2 * 96


def test_dropout_keeps_0_8_in_training_only():
    _, model, values, _, _ = _case(299)
    images = tf.constant(_images(4, 75, seed=7))  # the smallest size the Logits take
    try:
        dropped = model.end_points(images, True, include_aux=False)["PreLogits"].numpy()
        model.dropout_keep_prob = 1.0
        kept = model.end_points(images, True, include_aux=False)["PreLogits"].numpy()
    finally:
        model.dropout_keep_prob = inception_v3.DROPOUT_KEEP_PROB
        _assign(model, values)
    alive = kept > 0
    zeroed = dropped[alive] == 0
    assert alive.sum() > 1000
    assert abs(zeroed.mean() - 0.2) < 0.03
    np.testing.assert_allclose(dropped[alive][~zeroed], kept[alive][~zeroed] / 0.8, rtol=1e-6)
    first = model.end_points(images, False, include_aux=False)["PreLogits"].numpy()
    again = model.end_points(images, False, include_aux=False)["PreLogits"].numpy()
    np.testing.assert_array_equal(first, again)


def test_image_size_limits_are_config_errors_naming_the_sizes():
    model = _case(299)[1]
    # The limits of Slim's graph construction (it fails at 74, 106 with AuxLogits, 347 with
    # AuxLogits and 363), computed here from the layout.
    assert inception_v3.image_size_range(with_aux=False) == (75, 362)
    assert inception_v3.image_size_range(with_aux=True) == (107, 346)
    with pytest.raises(ConfigError, match=r"75x75 to 362x362 pixels, got 74x74"):
        model(tf.zeros([1, 74, 74, 3]), is_training=False)
    with pytest.raises(ConfigError, match=r"got 80x363"):
        model(tf.zeros([1, 80, 363, 3]), is_training=False)
    with pytest.raises(ConfigError, match=r"AuxLogits takes images of 107x107.*got 106x106"):
        model.logits_and_aux(tf.zeros([1, 106, 106, 3]), is_training=False)
    with pytest.raises(ConfigError, match=r"Conv2d_2a_3x3.*built for 299x299.*image_size=224"):
        model.logits_and_aux(tf.zeros([1, 224, 224, 3]), is_training=False)
    with pytest.raises(ConfigError, match=r"got 100x100"):
        inception_v3.build(get_model_config("inception_v3"), 10, image_size=100)
    assert model(tf.zeros([1, 75, 75, 3]), is_training=False).shape == (1, 1001)


def test_seeded_initial_values_follow_slim_initialisers():
    model = _small_model()
    for name, variable in model.variables_by_name.items():
        value = variable.numpy()
        leaf = name.rsplit("/", 1)[-1]
        if leaf != "weights":
            expected = 1.0 if leaf == "moving_variance" else 0.0
            np.testing.assert_array_equal(value, np.full_like(value, expected), err_msg=name)
            continue
        # Truncated normals cut at two sigmas: the AuxLogits convs use Slim's
        # trunc_normal(0.01) and (0.001), every other conv variance scaling (2 / fan_in).
        sigma = {"InceptionV3/AuxLogits/Conv2d_2a_1x1/weights": 0.01,
                 "InceptionV3/AuxLogits/Conv2d_2b_1x1/weights": 0.001}.get(
                     name, np.sqrt(1.3 * 2.0 / np.prod(value.shape[:-1])))
        assert np.abs(value).max() <= 2 * sigma + 1e-7, name
        if value.size >= 4096:
            assert abs(value.std() - 0.8796 * sigma) < 0.05 * sigma, name


def test_bfloat16_model_keeps_float32_variables_and_logits():
    model = _small_model()
    images = tf.constant(_images(2, 107))
    exact = model.end_points(images, is_training=False)
    model.compute_dtype = tf.bfloat16  # the same weights, computed in bfloat16
    try:
        points = model.end_points(images, is_training=False)
    finally:
        model.compute_dtype = tf.float32
    assert points["Mixed_7c"].dtype == tf.bfloat16
    assert points["Logits"].dtype == points["AuxLogits"].dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in model.variables)
    for name in ("Logits", "AuxLogits"):
        scale = np.abs(exact[name].numpy()).max()
        assert scale > 0
        np.testing.assert_allclose(points[name].numpy(), exact[name].numpy(),
                                   atol=0.05 * scale, rtol=0, err_msg=name)


def test_registry_row_carries_slim_inception_preprocessing():
    config = get_model_config("inception_v3")
    assert (config.scope, config.default_image_size, config.num_classes,
            config.background_class) == ("InceptionV3", 299, 1001, True)
    assert (config.eval_crop, config.crop_fraction, config.eval_resize, config.train_resize,
            config.input_normalization) == ("central_fraction", 0.875, "bilinear", "bilinear",
                                            "none")
    assert config.classifier_scopes == ("InceptionV3/Logits", "InceptionV3/AuxLogits")
