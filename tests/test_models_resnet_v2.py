"""ResNet v2 models against TF-Slim's ``nets.resnet_v2`` (names, numerics, batch-norm updates).

The reference is TF-Slim itself, run in its own TF1 graph by ``tests/slim_reference.py``:
our models must reproduce its variable names, shapes and creation order exactly, and its
logits, input gradients and moving-statistics updates to float32 round-off.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import (
    ImageClassifier,
    create_model,
    get_model_config,
    list_models,
)
from tests import slim_reference
from tests.program_runs import run_child

MOVING_STATISTICS = ("moving_mean", "moving_variance")

pytestmark = pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")


def _leaf(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _images(count: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (count, size, size, 3)).astype(
        np.float32
    )


def _assign(model: ImageClassifier, values: dict[str, np.ndarray]) -> None:
    for name, variable in model.variables_by_name.items():
        variable.assign(values[name])


def _snapshot(model: ImageClassifier) -> dict[str, np.ndarray]:
    return {name: variable.numpy() for name, variable in model.variables_by_name.items()}


def _shapes(model: ImageClassifier) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(v.shape.as_list())) for name, v in model.variables_by_name.items()]


# Three 64x64 images, as the ALP models see them; a small batch makes the Bessel correction of
# the batch variance (n / (n - 1), n = 3 * 2 * 2 in the last block) clearly visible.
IMAGES_64 = _images(3, 64)


@functools.cache
def _resnet_v2_50_case(num_classes: int):
    """Our resnet_v2_50 with random non-trivial values, and Slim's inference run on them."""
    model = create_model("resnet_v2_50", num_classes, seed=0)
    values = slim_reference.random_variable_values(dict(_shapes(model)), seed=num_classes)
    slim = slim_reference.run_slim_resnet_v2(
        "resnet_v2_50", num_classes, IMAGES_64, is_training=False, values=values,
        input_gradient=num_classes == 1001,
    )
    _assign(model, values)
    return model, values, slim


@pytest.fixture(scope="module", autouse=True)
def _release_resnet_v2_50_cases():
    yield
    _resnet_v2_50_case.cache_clear()  # two resnet_v2_50 models need not outlive this module


@pytest.fixture(params=[1001, 200], ids=["1001_classes", "200_classes"])
def resnet_v2_50_case(request):
    return _resnet_v2_50_case(request.param)


def test_resnet_v2_50_variables_match_slim_names_shapes_and_order(resnet_v2_50_case):
    model, _, slim = resnet_v2_50_case
    slim_shapes = [(name, value.shape) for name, value in slim.variables.items()]
    assert _shapes(model) == slim_shapes
    for name, variable in model.variables_by_name.items():
        assert variable.name == name + ":0"


def test_resnet_v2_50_inference_logits_and_input_gradient_match_slim(resnet_v2_50_case):
    model, _, slim = resnet_v2_50_case
    images = tf.constant(IMAGES_64)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = model(images, is_training=False)
        total = tf.reduce_sum(logits)
    assert logits.dtype == tf.float32
    assert logits.shape == slim.logits.shape == (3, model.num_classes)
    # Not a degenerate comparison: the images give different logits.
    assert np.ptp(slim.logits, axis=0).max() > 0.1
    np.testing.assert_allclose(logits.numpy(), slim.logits, atol=1e-4, rtol=0)
    if slim.input_gradient is not None:
        gradient = tape.gradient(total, images).numpy()
        scale = np.abs(slim.input_gradient).max()
        assert scale > 0
        np.testing.assert_allclose(gradient, slim.input_gradient, atol=1e-5 * scale, rtol=0)


def test_resnet_v2_50_training_step_matches_slim_logits_and_moving_statistics():
    model, values, _ = _resnet_v2_50_case(1001)
    slim = slim_reference.run_slim_resnet_v2(
        "resnet_v2_50", 1001, IMAGES_64, is_training=True, values=values
    )

    # Eager (tf.function is covered on the tiny model): tracing resnet_v2_50 costs seconds.
    try:
        with tf.GradientTape() as tape:
            logits = model(tf.constant(IMAGES_64), is_training=True)
            loss = tf.reduce_sum(tf.square(logits))
        gradients = tape.gradient(loss, model.trainable_variables)
        after = _snapshot(model)
    finally:
        _assign(model, values)
    np.testing.assert_allclose(logits.numpy(), slim.logits, atol=1e-4, rtol=0)
    assert all(g is not None for g in gradients)
    moved = 0.0
    for name, value in after.items():
        np.testing.assert_allclose(value, slim.variables[name], atol=1e-5, rtol=1e-5,
                                   err_msg=name)
        moved = max(moved, float(np.abs(value - values[name]).max()))
    assert moved > 1e-3  # the moving statistics really were updated


@pytest.mark.parametrize("model_name", ["resnet_v2_101", "resnet_v2_152", "resnet_v2_200"])
def test_deeper_resnet_v2_variables_match_slim_names_and_shapes(model_name):
    slim_shapes = list(slim_reference.slim_variable_shapes(model_name, 1001).items())
    model = create_model(model_name, 1001)  # unseeded: the stateful generator is faster
    assert _shapes(model) == slim_shapes


def test_resnet_v2_101_inference_logits_match_slim():
    # The deeper variants differ from resnet_v2_50 only by their units per block; one of them
    # compared by value (on small images, 10 classes, to keep it cheap) covers the table.
    model = create_model("resnet_v2_101", 10)  # unseeded: the stateful generator is faster
    values = slim_reference.random_variable_values(dict(_shapes(model)), seed=101)
    images = _images(2, 32, seed=3)
    slim = slim_reference.run_slim_resnet_v2("resnet_v2_101", 10, images, is_training=False,
                                             values=values)
    _assign(model, values)
    logits = model(tf.constant(images), is_training=False).numpy()
    assert np.ptp(slim.logits, axis=0).max() > 0.1
    np.testing.assert_allclose(logits, slim.logits, atol=1e-4, rtol=0)


def test_tiny_resnet_v2_runs_forward_and_backward_and_learns():
    model = create_model("resnet_v2_tiny", 10, seed=0)
    assert model.variables_by_name["resnet_v2_tiny/conv1/weights"].shape == (7, 7, 3, 16)
    assert model.variables_by_name[
        "resnet_v2_tiny/block3/unit_1/bottleneck_v2/conv3/weights"
    ].shape == (1, 1, 32, 128)
    assert model.variables_by_name["resnet_v2_tiny/logits/weights"].shape == (1, 1, 128, 10)
    images = tf.constant(_images(32, 32))
    labels = tf.constant(np.arange(32) % 10)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            logits = model(images, is_training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        for variable, gradient in zip(model.trainable_variables, gradients):
            variable.assign_sub(0.1 * gradient)
        return logits, loss, gradients

    logits, first_loss, gradients = train_step()
    assert logits.shape == (32, 10)
    for variable, gradient in zip(model.trainable_variables, gradients):
        assert np.all(np.isfinite(gradient.numpy())), variable.name
        assert np.any(gradient.numpy() != 0), variable.name
    for _ in range(10):
        _, loss, _ = train_step()
    assert float(loss) < float(first_loss)


def _perturbed_tiny_model() -> ImageClassifier:
    model = create_model("resnet_v2_tiny", 10, seed=3)
    rng = np.random.default_rng(3)
    for name, variable in model.variables_by_name.items():
        if _leaf(name) == "moving_mean":
            variable.assign(rng.normal(0.0, 0.1, variable.shape).astype(np.float32))
        elif _leaf(name) == "moving_variance":
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(np.float32))
    return model


def test_inference_mode_changes_no_variable():
    model = _perturbed_tiny_model()
    before = _snapshot(model)

    @tf.function
    def attack_gradient(images):
        with tf.GradientTape() as tape:
            tape.watch(images)
            total = tf.reduce_sum(model(images, is_training=False))
        return tape.gradient(total, images)

    gradient = attack_gradient(tf.constant(_images(4, 32)))
    assert np.any(gradient.numpy() != 0)
    model(tf.constant(_images(4, 32, seed=2)), is_training=False)
    after = _snapshot(model)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_training_mode_changes_only_moving_statistics():
    model = _perturbed_tiny_model()
    before = _snapshot(model)

    @tf.function
    def train_call(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, is_training=True))
        return tape.gradient(loss, model.trainable_variables)

    train_call(tf.constant(_images(4, 32)))
    after = _snapshot(model)
    for name, value in before.items():
        if _leaf(name) in MOVING_STATISTICS:
            assert np.all(after[name] != value), name
        else:
            np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_model_call_traces_once_per_input_shape():
    model = create_model("resnet_v2_tiny", 10, seed=0)
    traced = tf.function(model)
    for count, size in [(2, 32), (2, 32), (3, 32), (2, 32), (3, 32)]:
        traced(tf.constant(_images(count, size, seed=count)), False)
    assert traced.experimental_get_tracing_count() == 2


def test_seeded_initialisation_is_deterministic_and_follows_slim_initialisers():
    first = _snapshot(create_model("resnet_v2_tiny", 10, seed=5))
    again = _snapshot(create_model("resnet_v2_tiny", 10, seed=5))
    other = _snapshot(create_model("resnet_v2_tiny", 10, seed=6))
    for name, value in first.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
        leaf = _leaf(name)
        if leaf == "weights":
            assert np.any(other[name] != value), name
            fan_in = int(np.prod(value.shape[:-1]))
            # Slim: truncated normal (cut at 2 sigma) with sigma = sqrt(1.3 * 2 / fan_in).
            sigma = np.sqrt(1.3 * 2.0 / fan_in)
            assert np.abs(value).max() <= 2 * sigma + 1e-6, name
            if value.size >= 4096:
                assert abs(value.std() - 0.8796 * sigma) < 0.05 * sigma, name
        else:
            expected = {"gamma": 1.0, "moving_variance": 1.0}.get(leaf, 0.0)
            np.testing.assert_array_equal(value, np.full_like(value, expected), err_msg=name)


def test_trainable_variables_are_weights_biases_gamma_beta():
    model = create_model("resnet_v2_tiny", 10, seed=0)
    trainable = {v.name for v in model.trainable_variables}
    assert len(trainable) == len(model.trainable_variables)
    for name, variable in model.variables_by_name.items():
        if _leaf(name) in MOVING_STATISTICS:
            assert not variable.trainable and variable.name not in trainable
            assert variable.synchronization == tf.VariableSynchronization.ON_READ
            assert variable.aggregation == tf.VariableAggregation.MEAN
        else:
            assert _leaf(name) in ("weights", "biases", "gamma", "beta")
            assert variable.trainable and variable.name in trainable
    assert list(model.variables) == list(model.variables_by_name.values())


def test_variable_names_ignore_an_enclosing_name_scope():
    with tf.name_scope("outer"):
        model = create_model("resnet_v2_tiny", 10, seed=0)
    for name, variable in model.variables_by_name.items():
        assert variable.name == name + ":0"
        assert name.startswith("resnet_v2_tiny/")


def test_registry_lists_models_with_their_default_configs():
    assert {"resnet_v2_50", "resnet_v2_101", "resnet_v2_152", "resnet_v2_200",
            "resnet_v2_tiny"} <= set(list_models())
    config = get_model_config("resnet_v2_50")
    # TF-Slim's ResNets: 1001 classes with background, ALP's ImageNet preprocessing.
    assert (config.scope, config.num_classes, config.background_class) == (
        "resnet_v2_50", 1001, True)
    assert (config.eval_crop, config.crop_fraction, config.eval_resize,
            config.input_normalization) == ("short_side", 0.875, "bicubic", "none")
    assert config.classifier_scopes == ("resnet_v2_50/logits",)
    with pytest.raises(ConfigError, match="eval_crop"):
        dataclasses.replace(config, eval_crop="corner")
    model = create_model("resnet_v2_tiny", 7)
    assert isinstance(model, ImageClassifier)
    assert (model.scope, model.num_classes) == ("resnet_v2_tiny", 7)
    assert model.config == get_model_config("resnet_v2_tiny")


def test_unknown_model_name_raises_config_error_naming_known_models():
    with pytest.raises(ConfigError, match="resnet_v2_51.*resnet_v2_50"):
        create_model("resnet_v2_51", 10)
    with pytest.raises(ConfigError, match="resnet_v2_51.*resnet_v2_tiny"):
        get_model_config("resnet_v2_51")
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet_v2_tiny", 0)


# Logical devices must be configured before TensorFlow initialises, hence a fresh process.
_MIRRORED_CHILD = textwrap.dedent(
    """
    import json

    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from adversarial_logit_pairing.models import create_model

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = create_model("resnet_v2_tiny", 10, seed=7)
    reference = create_model("resnet_v2_tiny", 10, seed=7)
    initial = {name: v.numpy() for name, v in reference.variables_by_name.items()}
    images = np.random.default_rng(0).uniform(-1, 1, (2, 4, 32, 32, 3)).astype(np.float32)
    shards = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(images[context.replica_id_in_sync_group]))


    @tf.function
    def replicated(x, is_training):
        def replica_fn(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = model(x, is_training)
                total = tf.reduce_sum(logits)
            return logits, tape.gradient(total, x)
        return strategy.run(replica_fn, args=(x,))


    def local(value):
        return [t.numpy() for t in strategy.experimental_local_results(value)]


    def reference_pass(x, is_training):
        # The same weights on one device, one shard at a time, from the initial state.
        for name, variable in reference.variables_by_name.items():
            variable.assign(initial[name])
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = reference(x, is_training)
            total = tf.reduce_sum(logits)
        gradient = tape.gradient(total, x)
        stats = {n: v.numpy() for n, v in reference.variables_by_name.items()
                 if not v.trainable}
        return logits.numpy(), gradient.numpy(), stats


    def max_diff(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


    report = {"replicas": strategy.num_replicas_in_sync}
    logits, gradients = replicated(shards, False)
    expected = [reference_pass(images[i], False) for i in range(2)]
    report["inference_logits"] = max(
        max_diff(a, e[0]) for a, e in zip(local(logits), expected))
    report["inference_gradient"] = max(
        max_diff(g, e[1]) for g, e in zip(local(gradients), expected))
    logits, _ = replicated(shards, True)
    expected = [reference_pass(images[i], True) for i in range(2)]
    report["training_logits"] = max(
        max_diff(a, e[0]) for a, e in zip(local(logits), expected))
    per_replica = averaged = moved = 0.0
    for name, variable in model.variables_by_name.items():
        if variable.trainable:
            continue
        copies = local(variable)
        per_replica = max(per_replica, *(max_diff(c, e[2][name])
                                         for c, e in zip(copies, expected)))
        mean = (expected[0][2][name] + expected[1][2][name]) / 2
        averaged = max(averaged, max_diff(variable.numpy(), mean))
        moved = max(moved, max_diff(copies[0], initial[name]),
                    max_diff(copies[1], initial[name]))
    report.update(moving_per_replica=per_replica, moving_averaged_read=averaged, moved=moved)
    print("RESULTS" + json.dumps(report))
    """
)


def test_model_runs_per_replica_under_mirrored_strategy_on_two_cpus():
    report = run_child(_MIRRORED_CHILD)
    assert report["replicas"] == 2
    assert report["inference_logits"] < 1e-5
    assert report["inference_gradient"] < 1e-5
    assert report["training_logits"] < 1e-5
    # Each replica updates its own moving statistics from its own shard ...
    assert report["moved"] > 1e-3
    assert report["moving_per_replica"] < 1e-6
    # ... and a read outside strategy.run (checkpointing) averages the replicas.
    assert report["moving_averaged_read"] < 1e-6
