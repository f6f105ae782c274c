"""Evaluation and export read EVERY model variable from its moving-average shadow.

The original ``eval.py`` gave ``ExponentialMovingAverage.variables_to_restore`` the model
variables explicitly, so weights and batch-norm moving statistics all came from their
``/ExponentialMovingAverage`` shadows; ``--trainable_scopes`` only re-filtered the trainable
collection and changed nothing in the restore. The reference here is TF1's own
``variables_to_restore`` run in a ``tf.Graph`` over variables with the model's names.
"""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation, export, model_lib
from adversarial_logit_pairing.checkpoints import EMA_SUFFIX
from tests.data_builders import write_tiny_imagenet_tfrecords

MODEL = "resnet_v2_tiny"
NUM_CLASSES = 200
SCOPES = f"{MODEL}/logits,{MODEL}/postnorm"
v1 = tf.compat.v1


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_imagenet")
    write_tiny_imagenet_tfrecords(str(path), num_train=0, num_val=8, image_size=32, seed=5)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint whose plain and shadow values tell apart where each value came from.

    Variable i holds ``i`` (plain) and ``1000 + i`` (shadow) everywhere, batch-norm moving
    variances included (positive either way).
    """
    model = model_lib.get_model(MODEL, NUM_CLASSES)
    names = list(model.variables_by_name)
    values = {}
    for index, (name, variable) in enumerate(model.variables_by_name.items()):
        values[name] = tf.Variable(tf.fill(variable.shape, float(index + 1)))
        values[name + EMA_SUFFIX] = tf.Variable(tf.fill(variable.shape, float(1000 + index)))
    values["global_step"] = tf.Variable(7, dtype=tf.int64)
    prefix = checkpoints.save(values, str(tmp_path_factory.mktemp("ckpt")), step=7)
    return prefix, names


def _tf1_sources(names, shapes, trainable_names):
    """Checkpoint name per variable, from TF1's ``variables_to_restore(model variables)``."""
    with tf.Graph().as_default():
        variables = []
        for name in names:
            variables.append(v1.get_variable(name, shape=shapes[name],
                                             trainable=name in trainable_names))
        var_list = v1.train.ExponentialMovingAverage(0.9999).variables_to_restore(variables)
        return {variable.op.name: source for source, variable in var_list.items()}


def _source_of(value, index):
    if np.all(value == index + 1):
        return "plain"
    if np.all(value == 1000 + index):
        return "shadow"
    return "other"


@pytest.mark.parametrize("trainable_scopes", [None, SCOPES])
def test_eval_restores_every_variable_from_its_shadow(checkpoint, data_dir, trainable_scopes):
    prefix, names = checkpoint
    config = evaluation.EvalConfig(
        checkpoint_path=prefix, model_name=MODEL, dataset="tiny_imagenet",
        dataset_image_size=32, tiny_imagenet_data_dir=data_dir, hparams="eval_batch_size=4",
        moving_average_decay=0.9999, trainable_scopes=trainable_scopes)
    evaluator = evaluation.Evaluator(config)
    evaluator.evaluate(prefix)
    model = evaluator.model
    shapes = {name: v.shape for name, v in model.variables_by_name.items()}
    trainable = {model_lib.variable_name(v) for v in model_lib.filter_trainable_variables(
        trainable_scopes, model.trainable_variables)}
    expected = _tf1_sources(names, shapes, trainable)
    assert set(expected) == set(names)
    for index, (name, variable) in enumerate(model.variables_by_name.items()):
        assert expected[name] == name + EMA_SUFFIX, name
        assert _source_of(variable.numpy(), index) == "shadow", name
    # Batch-norm statistics are among them.
    assert any(name.endswith("moving_variance") for name in names)


def test_eval_with_moving_average_off_reads_plain_values(checkpoint, data_dir):
    prefix, _ = checkpoint
    config = evaluation.EvalConfig(
        checkpoint_path=prefix, model_name=MODEL, dataset="tiny_imagenet",
        dataset_image_size=32, tiny_imagenet_data_dir=data_dir, hparams="eval_batch_size=4",
        moving_average_decay=-1, trainable_scopes=SCOPES)
    evaluator = evaluation.Evaluator(config)
    evaluator.evaluate(prefix)
    for index, (name, variable) in enumerate(evaluator.model.variables_by_name.items()):
        assert _source_of(variable.numpy(), index) == "plain", name


@pytest.mark.parametrize("trainable_scopes", [None, SCOPES])
def test_export_restores_every_variable_from_its_shadow(checkpoint, trainable_scopes):
    prefix, _ = checkpoint
    model = export.restore_model(prefix, MODEL, NUM_CLASSES, 0.9999, trainable_scopes)
    for index, (name, variable) in enumerate(model.variables_by_name.items()):
        assert _source_of(variable.numpy(), index) == "shadow", name
