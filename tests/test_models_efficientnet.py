"""EfficientNets against tf_keras' ``EfficientNetB0``/``B2`` and against the table by hand.

tf_keras' applications are an independent implementation of the same network (tensorflow/tpu's
``efficientnet_model.py``): with the same weights mapped by name (``_KERAS_LAYER`` below) the
logits and the moving statistics after a training-mode pass must agree. Two differences of the
reference are neutralised and checked, not hidden:

- its input layers (Rescaling by 1/255, an un-adapted Normalization) are made the identity, so
  both networks see the same tensor (our ``_ap`` models take their input as is);
- its batch norm is fused by default, which moves the moving variance towards the
  Bessel-corrected batch variance; tensorflow/tpu's ``TpuBatchNormalization`` is non-fused
  (biased variance), so the reference's batch norms run with ``fused=False``.

Its explicit ``ZeroPadding2D`` + VALID convolutions are checked to equal TF 'SAME' padding at
the fixed input sizes used (224 and the odd-sized path of 260: 130 -> 65 -> 33 -> 17 -> 9).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.models import (
    ImageClassifier,
    create_model,
    get_model_config,
    list_models,
)
from adversarial_logit_pairing.models import efficientnet as effnet
from adversarial_logit_pairing.models.layers import UnfusedBatchNorm, VariableFactory

tf_keras = pytest.importorskip("tf_keras")

VARIANTS = tuple(f"b{index}" for index in range(9))
# Hand-computed from the table (round_filters by hand: e.g. b5 32 * 1.6 = 51.2 -> 48).
BLOCK_COUNTS = dict(zip(VARIANTS, (16, 23, 23, 26, 32, 39, 45, 55, 61)))
STEM_FILTERS = dict(zip(VARIANTS, (32, 32, 32, 40, 48, 48, 56, 64, 72)))
LAST_BLOCK_FILTERS = dict(zip(VARIANTS, (320, 320, 352, 384, 448, 512, 576, 640, 704)))
HEAD_FILTERS = dict(zip(VARIANTS, (1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560, 2816)))
RESOLUTIONS = dict(zip(VARIANTS, (224, 240, 260, 300, 380, 456, 528, 600, 672)))
# Per stage: kernel and expansion (the same for every variant), then per variant the
# stage's output filters and repeats (ceil(depth * r)).
STAGE_KERNELS = (3, 3, 5, 3, 5, 5, 3)
STAGE_EXPANSIONS = (1, 6, 6, 6, 6, 6, 6)
STAGE_FILTERS = {
    "b0": (16, 24, 40, 80, 112, 192, 320),
    "b8": (32, 56, 88, 176, 248, 424, 704),
}
STAGE_REPEATS = {
    "b0": (1, 2, 2, 3, 3, 4, 1),
    "b8": (4, 8, 8, 11, 11, 15, 4),
}
# The project's own 'efficientnet-tiny' (width 0.25, depth 0.25), by hand: 32 * 0.25 = 8;
# 10 (stage 3) rounds to 8, more than 10% down, so 16; one block per stage (ceil(0.25 r)).
STEM_FILTERS["tiny"], HEAD_FILTERS["tiny"] = 8, 320
STAGE_FILTERS["tiny"] = (8, 8, 16, 24, 32, 48, 80)
STAGE_REPEATS["tiny"] = (1,) * 7
BATCH = 2


def _images(size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (BATCH, size, size, 3)).astype(np.float32)


def _shapes(model: ImageClassifier) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(v.shape.as_list())) for name, v in model.variables_by_name.items()]


@contextlib.contextmanager
def _deterministic(model: effnet.EfficientNet) -> Iterator[None]:
    """Dropout and drop-connect off for a while, so that a training-mode pass is repeatable."""
    rate, survival = model.dropout_rate, [block.survival_prob for block in model.blocks]
    model.dropout_rate = 0.0
    for block in model.blocks:
        block.survival_prob = 1.0
    try:
        yield
    finally:
        model.dropout_rate = rate
        for block, probability in zip(model.blocks, survival):
            block.survival_prob = probability


def _random_values(
    model: effnet.EfficientNet, size: int, seed: int, calibration_seed: Optional[int] = None
) -> dict[str, np.ndarray]:
    """Random weights, and moving statistics near those of the activations.

    With arbitrary moving statistics the activations of 16+ blocks vanish or explode (the
    logits would not depend on the image, a vacuous comparison). So the statistics come from a
    training-mode pass on other images (``_images(size, calibration_seed)``; decay 0: moving =
    batch statistics), then are moved off by a few per cent so that no statistic is the
    batch's exactly.
    """
    rng = np.random.default_rng(seed)
    for name, variable in model.variables_by_name.items():
        shape = tuple(variable.shape.as_list())
        leaf = name.rsplit("/", 1)[-1]
        if leaf in ("kernel", "depthwise_kernel"):
            fan_in = int(np.prod(shape[:-1])) if leaf == "kernel" else shape[0] * shape[1]
            value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
        elif leaf in ("bias", "beta"):
            value = rng.normal(0.0, 0.2, shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = variable.numpy()  # moving statistics: calibrated below
        variable.assign(value.astype(np.float32))
    norms = [m for m in model.submodules if isinstance(m, UnfusedBatchNorm)]
    decays = [norm.decay for norm in norms]
    try:
        for norm in norms:
            norm.decay = 0.0
        with _deterministic(model):
            calibration = seed + 100 if calibration_seed is None else calibration_seed
            model(_images(size, seed=calibration), is_training=True)
    finally:
        for norm, decay in zip(norms, decays):
            norm.decay = decay
    for norm in norms:
        std = np.sqrt(norm.moving_variance.numpy())
        norm.moving_mean.assign_add(rng.normal(0.0, 0.05, std.shape) * std)
        norm.moving_variance.assign(norm.moving_variance * rng.uniform(0.9, 1.1, std.shape))
    return {name: v.numpy() for name, v in model.variables_by_name.items()}


# Our in-block names -> tf_keras' layer suffix, with and without the expansion conv.
_KERAS_LAYER = {
    True: {
        "conv2d": "expand_conv", "tpu_batch_normalization": "expand_bn",
        "depthwise_conv2d": "dwconv", "tpu_batch_normalization_1": "bn",
        "se/conv2d": "se_reduce", "se/conv2d_1": "se_expand",
        "conv2d_1": "project_conv", "tpu_batch_normalization_2": "project_bn",
    },
    False: {
        "depthwise_conv2d": "dwconv", "tpu_batch_normalization": "bn",
        "se/conv2d": "se_reduce", "se/conv2d_1": "se_expand",
        "conv2d": "project_conv", "tpu_batch_normalization_1": "project_bn",
    },
}
_KERAS_OUTER = {
    "stem/conv2d": "stem_conv", "stem/tpu_batch_normalization": "stem_bn",
    "head/conv2d": "top_conv", "head/tpu_batch_normalization": "top_bn",
    "head/dense": "predictions",
}


def _keras_blocks(keras_model) -> list[str]:
    """The reference's block prefixes in layer order: 'block1a', 'block2a', 'block2b', ..."""
    return list(dict.fromkeys(
        match[1] for layer in keras_model.layers
        if (match := re.match(r"(block\d+[a-z])_", layer.name))
    ))


def _keras_weights(keras_model, names: list[str]) -> dict[str, tf.Variable]:
    """Our variable name -> the tf_keras weight holding it (``blocks_K`` is the K-th block)."""
    blocks = _keras_blocks(keras_model)
    layer_names = {layer.name for layer in keras_model.layers}
    weights = {}
    for name in names:
        layer_path, leaf = name.split("/", 1)[1].rsplit("/", 1)
        block = re.fullmatch(r"blocks_(\d+)/(.+)", layer_path)
        if block is None:
            layer_name = _KERAS_OUTER[layer_path]
        else:
            prefix = blocks[int(block[1])]
            expands = f"{prefix}_expand_conv" in layer_names
            layer_name = f"{prefix}_{_KERAS_LAYER[expands][block[2]]}"
        weights[name] = getattr(keras_model.get_layer(layer_name), leaf)
    return weights


@dataclasses.dataclass
class Pair:
    """Our ``_ap`` model and the tf_keras reference holding the same ``values``."""

    ours: effnet.EfficientNet
    keras: object
    keras_weights: dict[str, tf.Variable]  # by our variable names
    values: dict[str, np.ndarray]
    keras_drop_rates: dict[str, float]  # of its Dropout layers, before they were set to 0
    size: int

    def assign(self) -> None:
        for name, variable in self.ours.variables_by_name.items():
            variable.assign(self.values[name])
            self.keras_weights[name].assign(self.values[name])


def _make_pair(variant: str, keras_builder, seed: int) -> Pair:
    size = RESOLUTIONS[variant]
    config = get_model_config(f"efficientnet_{variant}_ap")
    ours = create_model(config.name, 1000)
    keras_model = keras_builder(weights=None, include_top=True, classes=1000,
                                input_shape=(size, size, 3), classifier_activation=None)
    drop_rates = {}
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind == "Rescaling":
            layer.scale, layer.offset = 1.0, 0.0
        elif kind == "Normalization":  # never adapted: mean 0, variance 1 is the identity
            np.testing.assert_array_equal(layer.mean.numpy(), 0.0)
            np.testing.assert_array_equal(layer.variance.numpy(), 1.0)
        elif kind == "BatchNormalization":
            assert (layer.momentum, layer.epsilon) == (0.99, 1e-3)
            layer.fused = False
        elif kind == "Dropout":
            drop_rates[layer.name] = layer.rate
            layer.rate = 0.0
    pair = Pair(ours, keras_model, _keras_weights(keras_model, list(ours.variables_by_name)),
                _random_values(ours, size, seed), drop_rates, size)
    pair.assign()
    return pair


@pytest.fixture(scope="module")
def b0_pair():
    return _make_pair("b0", tf_keras.applications.EfficientNetB0, seed=0)


@pytest.fixture(scope="module")
def b2_pair():
    return _make_pair("b2", tf_keras.applications.EfficientNetB2, seed=2)


@pytest.fixture(params=["b0", "b2"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


def test_name_mapping_to_keras_covers_every_weight_once(pair):
    mapped = list(pair.keras_weights.values())
    for name, weight in zip(pair.ours.variables_by_name, mapped):
        assert tuple(weight.shape) == pair.values[name].shape, name
    keras_weights = {id(w) for layer in pair.keras.layers for w in layer.weights
                     if type(layer).__name__ != "Normalization"}  # the identity input layer
    assert len({id(w) for w in mapped}) == len(mapped) == len(keras_weights)
    assert {id(w) for w in mapped} == keras_weights


def _tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def test_keras_reference_padding_equals_tf_same_at_the_fixed_sizes(pair):
    sizes = []
    for layer in pair.keras.layers:
        if type(layer).__name__ != "ZeroPadding2D":
            continue
        conv = pair.keras.get_layer(layer.name[: -len("_pad")])
        size = layer.input_shape[1]
        kernel, stride = conv.kernel_size[0], conv.strides[0]
        expected = _tf_same_padding(size, kernel, stride)
        assert tuple(layer.padding) == (expected, expected), layer.name
        sizes.append(size)
    assert sizes[0] == pair.size and len(sizes) == 5  # the stem and the four strided stages
    if pair.size == 260:
        assert {65, 33, 17} <= set(sizes)  # odd: one more row/column of padding


def test_inference_logits_match_keras(pair):
    images = _images(pair.size)
    logits = pair.ours(images, is_training=False)
    reference = pair.keras(images, training=False).numpy()
    assert logits.dtype == tf.float32 and logits.shape == (BATCH, 1000)
    assert np.ptp(reference, axis=0).max() > 0.1  # the two images give different logits
    assert np.abs(reference).max() < 30
    np.testing.assert_allclose(logits.numpy(), reference, atol=1e-4, rtol=0)


def test_training_pass_matches_keras_logits_and_moving_statistics(pair):
    pair.assign()
    images = _images(pair.size, seed=7)
    model = pair.ours
    with _deterministic(model):  # as the reference's are
        logits = model(images, is_training=True).numpy()
    reference = pair.keras(images, training=True).numpy()
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=0)
    statistics = [name for name in model.variables_by_name
                  if name.endswith(("/moving_mean", "/moving_variance"))]
    moved = 0
    for name in statistics:
        value = model.variables_by_name[name].numpy()
        np.testing.assert_allclose(value, pair.keras_weights[name].numpy(),
                                   atol=2e-5, rtol=2e-5, err_msg=name)
        moved += not np.allclose(value, pair.values[name], atol=1e-5, rtol=0)
    assert moved == len(statistics)
    pair.assign()  # back to the inference values for the other tests


def test_survival_probabilities_match_keras_drop_rates(pair):
    # tf_keras drops block b with rate 0.2 * b / n: tensorflow/tpu's 1 - survival_prob.
    keras_blocks = _keras_blocks(pair.keras)
    n = len(pair.ours.blocks)
    assert len(keras_blocks) == n
    for index, (block, keras_block) in enumerate(zip(pair.ours.blocks, keras_blocks)):
        assert block.survival_prob == pytest.approx(1.0 - 0.2 * index / n)
        keras_rate = pair.keras_drop_rates.get(keras_block + "_drop")
        if block.has_skip and index > 0:
            assert keras_rate == pytest.approx(1.0 - block.survival_prob)
        else:  # no residual (or keras' rate 0 for block 0): no drop-connect
            assert keras_rate is None
    assert pair.ours.dropout_rate == pair.keras_drop_rates["top_dropout"]


def _expected_variables(variant: str, num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every (name, shape) in tensorflow/tpu's creation order, from the literal stage table."""
    scope = f"efficientnet-{variant}"
    stem = STEM_FILTERS[variant]

    def conv(path, k, cin, cout, bias=False):
        rows = [(f"{scope}/{path}/kernel", (k, k, cin, cout))]
        return rows + ([(f"{scope}/{path}/bias", (cout,))] if bias else [])

    def bn(path, c):
        return [(f"{scope}/{path}/{leaf}", (c,))
                for leaf in ("gamma", "beta", "moving_mean", "moving_variance")]

    rows = conv("stem/conv2d", 3, 3, stem) + bn("stem/tpu_batch_normalization", stem)
    block, cin = 0, stem
    for stage in range(7):
        for _ in range(STAGE_REPEATS[variant][stage]):
            cout, expansion = STAGE_FILTERS[variant][stage], STAGE_EXPANSIONS[stage]
            k, mid, b = STAGE_KERNELS[stage], cin * STAGE_EXPANSIONS[stage], f"blocks_{block}"
            bns = [f"{b}/tpu_batch_normalization{suffix}" for suffix in ("", "_1", "_2")]
            if expansion != 1:
                rows += conv(f"{b}/conv2d", 1, cin, mid) + bn(bns.pop(0), mid)
            rows += [(f"{scope}/{b}/depthwise_conv2d/depthwise_kernel", (k, k, mid, 1))]
            rows += bn(bns.pop(0), mid)
            reduced = max(1, cin // 4)
            rows += conv(f"{b}/se/conv2d", 1, mid, reduced, bias=True)
            rows += conv(f"{b}/se/conv2d_1", 1, reduced, mid, bias=True)
            rows += conv(f"{b}/conv2d" + ("_1" if expansion != 1 else ""), 1, mid, cout)
            rows += bn(bns.pop(0), cout)
            block, cin = block + 1, cout
    head = HEAD_FILTERS[variant]
    rows += conv("head/conv2d", 1, cin, head) + bn("head/tpu_batch_normalization", head)
    rows += [(f"{scope}/head/dense/kernel", (head, num_classes)),
             (f"{scope}/head/dense/bias", (num_classes,))]
    return rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_variables_match_the_table(variant, request):
    if variant in ("b0", "b2"):  # built already
        model = request.getfixturevalue(f"{variant}_pair").ours
    else:
        model = create_model(f"efficientnet_{variant}_ap", 1000)
    shapes = _shapes(model)
    scope = f"efficientnet-{variant}"
    assert all(name.startswith(scope + "/") for name, _ in shapes)
    assert all(v.name == name + ":0" and v.dtype == tf.float32
               for name, v in model.variables_by_name.items())
    assert len(model.blocks) == BLOCK_COUNTS[variant]
    named = dict(shapes)
    assert named[f"{scope}/stem/conv2d/kernel"] == (3, 3, 3, STEM_FILTERS[variant])
    head = HEAD_FILTERS[variant]
    assert named[f"{scope}/head/conv2d/kernel"] == (1, 1, LAST_BLOCK_FILTERS[variant], head)
    assert named[f"{scope}/head/dense/kernel"] == (head, 1000)
    assert f"{scope}/blocks_{BLOCK_COUNTS[variant] - 1}/conv2d_1/kernel" in named
    assert f"{scope}/blocks_{BLOCK_COUNTS[variant]}/conv2d/kernel" not in named
    if variant in STAGE_FILTERS:  # the full list, in creation order
        assert shapes == _expected_variables(variant, 1000)


def test_tiny_variant_follows_the_table_at_its_registry_size():
    model = create_model("efficientnet_tiny", 10, seed=0)
    assert _shapes(model) == _expected_variables("tiny", 10)
    config = get_model_config("efficientnet_tiny")
    assert (config.scope, config.default_image_size, config.input_normalization) == (
        "efficientnet-tiny", 32, "none")
    logits = model(tf.constant(_images(32)), is_training=False)
    assert logits.shape == (BATCH, 10) and np.isfinite(logits.numpy()).all()


def test_round_filters_and_block_strings():
    assert [effnet.round_filters(32, effnet.SPECS[f"efficientnet-{v}"].width)
            for v in VARIANTS] == [STEM_FILTERS[v] for v in VARIANTS]
    assert [effnet.round_filters(1280, effnet.SPECS[f"efficientnet-{v}"].width)
            for v in VARIANTS] == [HEAD_FILTERS[v] for v in VARIANTS]
    assert effnet.round_repeats(3, 3.6) == 11 and effnet.round_repeats(1, 1.1) == 2
    assert effnet.decode_block_string("r2_k5_s22_e6_i24_o40_se0.25") == effnet.StageArgs(
        repeats=2, kernel_size=5, stride=2, expand_ratio=6, input_filters=24,
        output_filters=40, se_ratio=0.25)
    with pytest.raises(ValueError, match="block string"):
        effnet.decode_block_string("r2_k5_s12_e6_i24_o40_se0.25")


def test_registry_configs():
    names = [f"efficientnet_{v}{suffix}" for v in VARIANTS for suffix in ("", "_ap")]
    assert set(names) <= set(list_models())
    for name in names:
        config = get_model_config(name)
        variant = name.split("_")[1]
        size = RESOLUTIONS[variant]
        assert config.scope == f"efficientnet-{variant}"
        assert config.default_image_size == size
        assert (config.num_classes, config.background_class) == (1000, False)
        assert (config.eval_crop, config.eval_resize, config.train_resize) == (
            "padded_size", "bicubic", "bicubic")
        assert config.crop_fraction == pytest.approx(size / (size + 32), abs=1e-3)
        assert config.input_normalization == (
            "none" if name.endswith("_ap") else "imagenet_mean_std")
        assert config.classifier_scopes == (f"efficientnet-{variant}/head/dense",)


def test_standard_model_equals_advprop_model_on_hand_normalised_inputs(b0_pair):
    standard = create_model("efficientnet_b0", 1000)
    for name, value in b0_pair.values.items():
        standard.variables_by_name[name].assign(value)
    # The network input in the range the statistics were calibrated for, and the dataset
    # images the standard model turns into it: x = (255 * (images + 1) / 2 - mean) / std.
    network_input = _images(b0_pair.size)
    mean = 255 * np.array([0.485, 0.456, 0.406], np.float32)
    std = 255 * np.array([0.229, 0.224, 0.225], np.float32)
    images = (network_input * std + mean) / 127.5 - 1.0
    expected = b0_pair.ours(network_input, is_training=False).numpy()
    np.testing.assert_allclose(standard(images, is_training=False).numpy(), expected,
                               atol=1e-4, rtol=0)


def test_unfused_batch_norm_moves_towards_the_biased_batch_variance():
    # tf.layers.BatchNormalization(fused=False), tensorflow/tpu's: no Bessel correction.
    x = np.random.default_rng(0).normal(1.0, 2.0, (2, 3, 3, 4)).astype(np.float32)
    norm = UnfusedBatchNorm("bn", 4, VariableFactory(0), decay=0.99, epsilon=1e-3)
    y = norm(tf.constant(x), is_training=True).numpy()
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(variance + 1e-3), atol=1e-5)
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.01 * mean, rtol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), 0.99 + 0.01 * variance,
                               rtol=1e-6)


def test_drop_connect_keeps_whole_samples_scaled_by_survival():
    tf.random.set_seed(0)
    x = tf.ones([4000, 2, 2, 3])
    y = effnet.drop_connect(x, 0.75).numpy()
    per_sample = y.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
    assert abs((per_sample[:, 0] > 0).mean() - 0.75) < 0.03


def test_training_mode_is_stochastic_and_inference_deterministic(b0_pair):
    model, images = b0_pair.ours, _images(64)
    assert model.dropout_rate == 0.2
    try:
        first, second = (model(images, is_training=True).numpy() for _ in range(2))
    finally:
        b0_pair.assign()  # the moving statistics moved
    assert not np.allclose(first, second)
    with _deterministic(model):
        first, second = (model(images, is_training=True).numpy() for _ in range(2))
    b0_pair.assign()
    np.testing.assert_allclose(first, second, atol=1e-3, rtol=1e-3)  # only the statistics moved
    np.testing.assert_array_equal(model(images, is_training=False).numpy(),
                                  model(images, is_training=False).numpy())

    x = tf.constant(images)
    with tf.GradientTape() as tape:  # what the attacks need
        tape.watch(x)
        loss = tf.reduce_sum(model(x, is_training=False))
    gradient = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(gradient)) and np.abs(gradient).max() > 0


def test_bfloat16_compute_runs_with_float32_variables_and_logits(b0_pair):
    bfloat16 = create_model("efficientnet_b0_ap", 1000, compute_dtype="bfloat16")
    for name, value in b0_pair.values.items():
        bfloat16.variables_by_name[name].assign(value)
    images = _images(b0_pair.size)
    high = b0_pair.ours(images, is_training=False).numpy()
    low = bfloat16(images, is_training=False)
    assert low.dtype == tf.float32
    # The same function to bfloat16 precision; random weights amplify round-off over 16
    # blocks, so the logits' correlation is pinned rather than their difference.
    assert np.corrcoef(high.ravel(), low.numpy().ravel())[0, 1] > 0.98
    low = bfloat16(images, is_training=True)  # dropout and drop-connect on
    assert low.dtype == tf.float32 and np.all(np.isfinite(low.numpy()))
    assert all(v.dtype == tf.float32 for v in bfloat16.variables)


def test_round_filters_never_rounds_down_by_more_than_ten_percent():
    for filters in range(8, 2000, 8):
        for width in (0.5, 1.1, 1.3, 2.2):
            rounded = effnet.round_filters(filters, width)
            assert rounded % 8 == 0 and rounded >= 0.9 * filters * width
            assert math.isclose(rounded, filters * width, abs_tol=8)
