"""export.py: checkpoints to a TF2 SavedModel and a TF-Hub model that give eval.py's logits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub

from adversarial_logit_pairing import checkpoints, export
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import CheckpointError, ConfigError
from adversarial_logit_pairing.models import create_model
from tests import data_builders, slim_reference
from tests.program_runs import run_concurrently, run_program

MODEL = "resnet_v2_tiny"
NUM_CLASSES = 200
IMAGE_SIZE = 32
NUM_IMAGES = 4
EMA = checkpoints.EMA_SUFFIX

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_imagenet"))
    data_builders.write_tiny_imagenet_tfrecords(path, num_train=1, num_val=NUM_IMAGES,
                                                image_size=IMAGE_SIZE, seed=5)
    return path


@pytest.fixture(scope="module")
def images(tiny_dir):
    """The eval pipeline's images, as eval.py sees them."""
    data, _, _, _ = dataset_factory.get_dataset("tiny_imagenet", "validation", NUM_IMAGES,
                                                IMAGE_SIZE, is_training=False, data_dir=tiny_dir)
    return next(iter(data))[0].numpy()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A training checkpoint of resnet_v2_tiny whose shadows differ from its variables."""
    shapes = {name: tuple(v.shape.as_list())
              for name, v in create_model(MODEL, NUM_CLASSES).variables_by_name.items()}
    plain = slim_reference.random_variable_values(shapes, seed=1)
    shadows = slim_reference.random_variable_values(shapes, seed=2)
    variables = {name: tf.Variable(value) for name, value in plain.items()}
    variables.update({name + EMA: tf.Variable(value) for name, value in shadows.items()})
    variables["global_step"] = tf.Variable(7, dtype=tf.int64)
    directory = str(tmp_path_factory.mktemp("train"))
    checkpoints.save(variables, directory, step=7)
    return directory


@pytest.fixture(scope="module")
def eval_logits(tmp_path_factory, tiny_dir, checkpoint_dir):
    """decay -> eval.py's per-example logits (--predictions_file) for this checkpoint."""
    out = tmp_path_factory.mktemp("eval")
    decays = (0.9999, -1.0)
    run_concurrently({decay: ("eval.py", [
        f"--checkpoint_path={checkpoint_dir}", f"--model_name={MODEL}",
        "--dataset=tiny_imagenet", f"--tiny_imagenet_data_dir={tiny_dir}",
        f"--dataset_image_size={IMAGE_SIZE}", f"--hparams=eval_batch_size={NUM_IMAGES}",
        f"--moving_average_decay={decay}", f"--predictions_file={out / f'{decay}.npz'}",
    ]) for decay in decays}, str(out))
    results = {}
    for decay in decays:
        with np.load(out / f"{decay}.npz") as data:
            results[decay] = data["logits"]
    # The shadows give other logits than the plain variables: the tests can tell them apart.
    assert np.abs(results[0.9999] - results[-1.0]).max() > 1e-2
    return results


def _keras_layer_logits(export_dir, images):
    """Logits of ``hub.KerasLayer(export_dir)`` inside a tf-keras model."""
    import tf_keras  # hub.KerasLayer is a tf-keras (Keras 2) layer, not a Keras 3 one

    layer = hub.KerasLayer(export_dir, trainable=True)
    model = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape=images.shape[1:]),
                                 layer])
    return model.predict(images, verbose=0), layer


def test_export_py_gives_eval_py_logits_from_saved_model_and_hub(
        tmp_path, checkpoint_dir, images, eval_logits):
    export_dir = str(tmp_path / "export")
    run_program("export.py", f"--checkpoint_path={checkpoint_dir}", f"--model_name={MODEL}",
         "--dataset=tiny_imagenet", f"--export_dir={export_dir}")
    expected = eval_logits[0.9999]  # the default decay reads the moving averages, as eval.py

    serving = tf.saved_model.load(export_dir).signatures["serving_default"]
    outputs = serving(images=tf.constant(images))
    np.testing.assert_allclose(outputs["logits"].numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(outputs["probabilities"].numpy(),
                               tf.nn.softmax(expected).numpy(), rtol=0, atol=1e-6)

    np.testing.assert_allclose(hub.load(export_dir)(images).numpy(), expected, rtol=0, atol=1e-5)
    keras_logits, layer = _keras_layer_logits(export_dir, images)
    np.testing.assert_allclose(keras_logits, expected, rtol=0, atol=1e-5)
    trainable = create_model(MODEL, NUM_CLASSES).trainable_variables
    assert len(layer.trainable_weights) == len(trainable)

    metadata = export.read_metadata(export_dir)
    assert metadata["moving_average"] is True and metadata["global_step"] == 7
    assert metadata["num_classes"] == NUM_CLASSES and metadata["input"]["range"] == [-1.0, 1.0]
    assert not [p for p in os.listdir(tmp_path) if p != "export"]


def test_plain_variable_export_infers_classes_and_gives_eval_py_logits(
        tmp_path, checkpoint_dir, images, eval_logits):
    result = export.export(export.ExportConfig(
        checkpoint_path=checkpoint_dir, export_dir=str(tmp_path / "plain"), model_name=MODEL,
        moving_average_decay=-1, export_format="saved_model"))
    assert result.num_classes == NUM_CLASSES and not result.moving_average
    loaded = tf.saved_model.load(result.export_dir)
    logits = loaded.signatures["serving_default"](images=tf.constant(images))["logits"]
    np.testing.assert_allclose(logits.numpy(), eval_logits[-1.0], rtol=0, atol=1e-5)
    assert not callable(loaded)  # "saved_model" leaves out the Hub call API


def test_hub_format_has_the_reusable_api_and_fixed_image_size(tmp_path, checkpoint_dir, images):
    export_dir = str(tmp_path / "hub")
    export.export(export.ExportConfig(
        checkpoint_path=checkpoint_dir, export_dir=export_dir, model_name=MODEL,
        dataset="tiny_imagenet", export_format="hub", image_size=IMAGE_SIZE))
    loaded = hub.load(export_dir)
    assert not loaded.signatures
    model = create_model(MODEL, NUM_CLASSES)
    assert len(loaded.variables) == len(model.variables)
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert list(loaded.regularization_losses) == []
    assert loaded(images, training=False).shape == (NUM_IMAGES, NUM_CLASSES)
    with pytest.raises((ValueError, TypeError)):
        loaded(images[:, :16, :16, :])
    assert export.read_metadata(export_dir)["input"]["shape"] == [None, 32, 32, 3]


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path, checkpoint_dir):
    export_dir = tmp_path / "taken"
    export_dir.mkdir()
    (export_dir / "keep.txt").write_text("not an export")
    config = export.ExportConfig(checkpoint_path=checkpoint_dir, export_dir=str(export_dir),
                                 model_name=MODEL)
    with pytest.raises(ConfigError) as info:
        export.export(config)
    assert str(info.value) == (f"--export_dir={export_dir}: directory is not empty; pass "
                               "--overwrite to replace it")
    assert os.listdir(export_dir) == ["keep.txt"]

    config.overwrite = True
    export.export(config)
    assert "saved_model.pb" in os.listdir(export_dir)
    assert "keep.txt" not in os.listdir(export_dir)
    assert os.listdir(tmp_path) == ["taken"]  # no temporary or old copy left behind


def test_export_of_a_checkpoint_without_shadows_asks_for_decay_minus_one(tmp_path):
    model = create_model(MODEL, 10, seed=0)
    prefix = checkpoints.save(model.variables_by_name, str(tmp_path / "released"), step=0)
    config = export.ExportConfig(checkpoint_path=prefix, export_dir=str(tmp_path / "out"),
                                 model_name=MODEL)
    with pytest.raises(CheckpointError, match="--moving_average_decay=-1"):
        export.export(config)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--num_classes=10 disagrees with --dataset=imagenet"):
        export.resolve_num_classes(MODEL, prefix, 10, "imagenet")
