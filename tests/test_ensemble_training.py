"""Ensemble adversarial training (issue 14, acceptance 4): sources drawn per step, frozen, unsaved.

Every model here is ``resnet_v2_tiny`` on 16-pixel images: the model being trained and both
static sources share the scope ``resnet_v2_tiny``, as a trained Inception v3 and the released
``InceptionV3`` checkpoints do in the paper's recipe. The static checkpoints are written by
TF1's ``tf.compat.v1.train.Saver`` from a graph, independently of the library's writer.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack, ensemble, training
from adversarial_logit_pairing.errors import ConfigError, MissingCheckpointError
from adversarial_logit_pairing.models import create_model
from tests.data_builders import write_tiny_imagenet_tfrecords

MODEL = "resnet_v2_tiny"
SIZE = 16
CLASSES = 200  # Tiny ImageNet
ATTACK = "pgdll_16_8_2"
BOUNDS = (-1.0, 1.0)


def _write_tf1_checkpoint(values: dict, prefix: str) -> str:
    """A TF1 checkpoint of ``values`` (name -> array) written by tf.compat.v1's Saver."""
    with tf.Graph().as_default():
        variables = {name: tf.compat.v1.Variable(value, name=name)
                     for name, value in values.items()}
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, prefix)


def _source_values(seed: int) -> dict:
    """Values of a resnet_v2_tiny unlike a fresh one: other weights, non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    model = create_model(MODEL, CLASSES, seed=seed)
    values = {}
    for name, variable in model.variables_by_name.items():
        value = variable.numpy()
        if name.endswith("moving_mean"):
            value = rng.normal(0, 0.1, value.shape).astype(np.float32)
        elif name.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        values[name] = value
    return values


@pytest.fixture(scope="module")
def static_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    return [_write_tf1_checkpoint(_source_values(seed), str(root / f"source{seed}" / "model.ckpt"))
            for seed in (1, 2)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    write_tiny_imagenet_tfrecords(path, num_train=32, num_val=8, image_size=SIZE, seed=0)
    return path


def _scalars(directory: str, tag: str) -> dict[int, float]:
    values = {}
    for path in tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = value.simple_value
    return values


def test_each_step_draws_one_of_three_sources_frozen_unsaved_traced_once(
        tmp_path, data_dir, static_checkpoints, monkeypatch):
    """train() with two static sources of the model's own scope, for 6 steps."""
    kept = {}

    def keep(name):
        original = getattr(training, name)

        def wrapper(*args, **kwargs):
            kept[name] = original(*args, **kwargs)
            return kept[name]
        monkeypatch.setattr(training, name, wrapper)

    keep("build_train_state")
    keep("make_train_step")
    out = str(tmp_path / "run")
    steps = 6
    result = training.train(training.TrainConfig(
        output_dir=out, max_steps=steps, model_name=MODEL, dataset="tiny_imagenet",
        dataset_image_size=SIZE, tiny_imagenet_data_dir=data_dir, save_summaries_steps=1,
        save_model_steps=100, num_summary_images=0, seed=5,
        hparams=f"batch_size=4,train_adv_method={ATTACK},train_lp_weight=0.5",
        ensemble_sources=",".join(f"{MODEL}:{path}" for path in static_checkpoints)))

    # Each step's source is the trained model (0) or one of the static ones, and over 6 steps
    # (--seed=5 draws 2, 0, 1, 1, 1, 1) all three are drawn, by ONE trace of the step.
    sources = _scalars(out, ensemble.SOURCE_OUTPUT)
    assert sorted(sources) == list(range(1, steps + 1))
    assert set(sources.values()) == {0.0, 1.0, 2.0}, sources
    assert kept["make_train_step"].experimental_get_tracing_count() == 1

    # The static variables are frozen and unchanged: equal to their checkpoints, not trainable,
    # not updated by the optimizer (no slot), not averaged.
    state = kept["build_train_state"]
    assert len(state.static_sources) == 2
    trained = {v.ref() for v in state.trainable}
    for source, path in zip(state.static_sources, static_checkpoints):
        reader = tf.train.load_checkpoint(path)
        for name, variable in source.variables_by_name.items():
            assert not variable.trainable and variable.ref() not in trained, name
            np.testing.assert_array_equal(variable.numpy(), reader.get_tensor(name), name)

    # The output checkpoint holds the training state alone, under its own names (no
    # renamed or duplicated copy of a source), with the trained model's values.
    saved = tf.train.load_checkpoint(result.checkpoint_path)
    names = {name for name, _ in tf.train.list_variables(result.checkpoint_path)}
    assert names == set(state.checkpoint_variables())
    static_readers = [tf.train.load_checkpoint(path) for path in static_checkpoints]
    for name, variable in state.model.variables_by_name.items():
        np.testing.assert_array_equal(saved.get_tensor(name), variable.numpy(), name)
    logits = f"{MODEL}/logits/weights"
    for reader in static_readers:
        assert not np.allclose(saved.get_tensor(logits), reader.get_tensor(logits))


def test_the_drawn_source_makes_the_adversarial_examples(static_checkpoints):
    """Each source gives its own adversarial examples, and the one reported made them."""
    sources = tuple(ensemble.StaticSource(MODEL, path) for path in static_checkpoints)
    models = [create_model(MODEL, CLASSES, seed=0), *ensemble.build_static_sources(sources,
                                                                                   CLASSES)]
    model_fns = [model.inference for model in models]
    images = tf.random.stateless_uniform([4, SIZE, SIZE, 3], (7, 7), -1.0, 1.0)

    @tf.function
    def step(seed):
        return ensemble.adversarial_examples(images, BOUNDS, model_fns, ATTACK, seed)

    drawn = set()
    for i in range(4):  # seeds (5, 0..3) draw sources 2, 0, 1, 1
        seed = tf.constant([5, i], tf.int64)
        adv, source = step(seed)
        # References: the library's plain attack against each model with the same seed.
        references = [adversarial_attack.generate_adversarial_examples(
            images, BOUNDS, model_fn, ATTACK, seed=seed).numpy() for model_fn in model_fns]
        distances = [float(np.mean(np.abs(adv.numpy() - ref))) for ref in references]
        source = int(source)
        drawn.add(source)
        assert distances[source] < 1e-4, (source, distances)
        others = [d for k, d in enumerate(distances) if k != source]
        assert min(others) > 0.05, (source, distances)  # 16/255 steps: 0.125 per flipped sign
    assert drawn == {0, 1, 2}
    assert step.experimental_get_tracing_count() == 1


def test_a_source_is_read_from_its_moving_averages_where_its_checkpoint_has_them(tmp_path):
    """train.py's checkpoints hold shadows (read, as eval.py would); released ones do not."""
    plain = _source_values(3)
    values = dict(plain)
    shadowed = sorted(plain)[::2]
    for name in shadowed:
        values[name + "/ExponentialMovingAverage"] = plain[name] + 1.0
    path = _write_tf1_checkpoint(values, str(tmp_path / "ema" / "model.ckpt"))
    (model,) = ensemble.build_static_sources([ensemble.StaticSource(MODEL, path)], CLASSES)
    for name, variable in model.variables_by_name.items():
        expected = plain[name] + 1.0 if name in shadowed else plain[name]
        np.testing.assert_array_equal(variable.numpy(), expected, name)


@pytest.fixture(scope="module")
def misfit_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("misfit")
    ten_classes = {f"{MODEL}/logits/weights": np.zeros([1, 1, 8, 10], np.float32),
                   f"{MODEL}/logits/biases": np.zeros([10], np.float32)}
    inception_head = {"InceptionV3/Logits/Conv2d_1c_1x1/biases": np.zeros([CLASSES], np.float32)}
    return {"ten_classes": _write_tf1_checkpoint(ten_classes, str(root / "ten" / "model.ckpt")),
            "inception": _write_tf1_checkpoint(inception_head, str(root / "inc" / "model.ckpt"))}


@pytest.mark.parametrize("value, attack, error, culprit", [
    ("resnet_v2_9:{good}", ATTACK, ConfigError,
     r"--ensemble_sources source 1 \(resnet_v2_9:.*unknown model 'resnet_v2_9'"),
    ("{good}", ATTACK, ConfigError, "--ensemble_sources: entry .* is not MODEL:CHECKPOINT"),
    (f"{MODEL}:{{good}},{MODEL}:/no/such/ckpt", ATTACK, MissingCheckpointError,
     "--ensemble_sources source 2=/no/such/ckpt: no such checkpoint"),
    (f"{MODEL}:{{ten_classes}}", ATTACK, ConfigError,
     "source 1 .*the checkpoint has 10 classes .* the model being trained 200"),
    ("inception_v3:{good}", ATTACK, ConfigError,
     "source 1 .*holds no InceptionV3/Logits variables .*not a checkpoint of inception_v3"),
    ("inception_v3:{inception}", ATTACK, ConfigError,
     "source 1 .* at --dataset_image_size=16: InceptionV3 takes images of 75x75"),
    (f"{MODEL}:{{good}}", "clean", ConfigError, "--ensemble_sources: .*train_adv_method=clean"),
])
def test_bad_ensemble_sources_fail_before_any_data_or_output(
        tmp_path, static_checkpoints, misfit_checkpoints, value, attack, error, culprit):
    # The data directory does not exist: a check made after the input pipeline was set up
    # would lose to a missing-data error.
    config = training.TrainConfig(
        output_dir=str(tmp_path / "run"), max_steps=1, model_name=MODEL, dataset="tiny_imagenet",
        dataset_image_size=SIZE, tiny_imagenet_data_dir=str(tmp_path / "no_data"),
        hparams=f"batch_size=4,train_adv_method={attack}",
        ensemble_sources=value.format(good=static_checkpoints[0], **misfit_checkpoints))
    with pytest.raises(error, match=culprit):
        training.train(config)
    assert not os.path.exists(config.output_dir)
