"""TF-Slim ``resnet_v2`` as an independent reference for tests (graph mode, its own tf.Graph).

The original ALP code ran TF-Slim's ``nets.resnet_v2`` under TF 1.8; the ``tf-slim`` PyPI
package still holds that code and runs in ``tensorflow.compat.v1`` graph mode, so tests can
compare our models and checkpoints against it. Each call builds a fresh ``tf.Graph`` (eager
execution stays on globally).

API:
  slim_variable_shapes(model_name, num_classes, image_size=64) -> dict[name, shape]
      Builds the graph only (no session) and returns every variable's TF1 name (no
      ':0') and shape, in creation order. model_name: 'resnet_v2_50' | '_101' | '_152' |
      '_200' | 'inception_v3' (whose AuxLogits variable names depend on ``image_size``).
  random_variable_values(shapes, seed) -> dict[name, np.ndarray float32]
      Non-trivial values for those variables that give a 50-layer network logits of order
      one that clearly depend on the image: conv weights ~ N(0, 2/fan_in) except the
      classifier convs' (``HEAD_WEIGHTS``) ~ N(0, 0.1/fan_in), biases ~ N(0, 0.1),
      gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2), moving_mean ~ N(0.5, 0.3),
      moving_variance ~ U(0.5, 2).
  run_slim_resnet_v2(model_name, num_classes, images, is_training, values=None,
                     restore_path=None, save_path=None, input_gradient=False) -> SlimRun
      Builds the network under ``resnet_arg_scope()``; sets its variables from ``values``
      (name -> array, every variable), or restores them from the TF1 checkpoint
      ``restore_path`` (``tf.compat.v1.train.Saver``; not both), or else runs Slim's
      initialisers; optionally saves them to ``save_path`` with a Saver (a genuine TF1
      checkpoint, written before the forward pass); then runs one forward pass on ``images``
      (float32 [N, H, W, 3]). With ``is_training`` the pass also runs Slim's UPDATE_OPS (the
      batch-norm moving-average updates). The variables are kept out of the graph's global
      and trainable collections (only a speed-up: Slim's legacy layers scan those lists for
      every new variable); the Saver and initialisers are given the variables explicitly.
      SlimRun.logits: np.ndarray [N, num_classes] (squeezed as the ALP model_fn did).
      SlimRun.variables: name -> value of every variable AFTER the pass (so, in training
      mode, the updated moving statistics), in creation order.
      SlimRun.input_gradient: with ``input_gradient``, d(sum of logits)/d(images), else None.
  build_network(model_name, num_classes, images, is_training, **network_kwargs)
      -> (logits, end_points, variables): Slim's network under its arg_scope in the current
      graph, for tests that need the graph itself (e.g. to save or restore with a Saver).
  set_values(session, variables, values): sets those variables by name, in one run.
  run_slim_inception_v3(images, values, num_classes=1001, dropout_keep_prob=1.0,
                        end_points=()) -> {False: SlimRun, True: SlimRun}
      Builds ``inception_v3`` under ``inception_v3_arg_scope()`` ONCE, with ``is_training``
      a boolean placeholder (Slim's batch norm and dropout accept one), sets its variables
      from ``values`` and runs an inference pass, then a training pass with the UPDATE_OPS.
      The default keep probability 1.0 makes the training pass deterministic. Each SlimRun
      has ``aux_logits`` and the named ``end_points`` (np arrays); the inference run's
      ``variables`` are the values before the training pass, the training run's after it.

Importing this module installs the aliases that let tf-slim 1.1 find the legacy layers of
tf-keras 2.21 (``tf_keras.legacy_tf_layers`` moved to ``tf_keras.src.legacy_tf_layers``).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.checkpoints import variable_name

_LEGACY_LAYER_MODULES = ("base", "core", "convolutional", "normalization", "pooling")


def _install_tf_keras_aliases() -> None:
    """Points ``tf_keras.legacy_tf_layers[.x]`` at ``tf_keras.src.legacy_tf_layers[.x]``."""
    try:
        importlib.import_module("tf_keras.legacy_tf_layers.normalization")
        return
    except ModuleNotFoundError:
        pass
    sys.modules["tf_keras.legacy_tf_layers"] = importlib.import_module(
        "tf_keras.src.legacy_tf_layers"
    )
    for name in _LEGACY_LAYER_MODULES:
        sys.modules[f"tf_keras.legacy_tf_layers.{name}"] = importlib.import_module(
            f"tf_keras.src.legacy_tf_layers.{name}"
        )


_install_tf_keras_aliases()

import tf_slim  # noqa: E402  (needs the aliases above)
from tf_slim.nets import inception_v3 as slim_inception_v3  # noqa: E402
from tf_slim.nets import resnet_v2 as slim_resnet_v2  # noqa: E402

v1 = tf.compat.v1


# Classifier convs: small weights keep the logits near one (see random_variable_values).
HEAD_WEIGHTS = ("/logits/weights", "/Logits/Conv2d_1c_1x1/weights",
                "/AuxLogits/Conv2d_2b_1x1/weights")


@dataclasses.dataclass
class SlimRun:
    logits: np.ndarray
    variables: dict[str, np.ndarray]
    input_gradient: Optional[np.ndarray] = None
    aux_logits: Optional[np.ndarray] = None
    end_points: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


_VARIABLES_COLLECTION = "slim_reference_variables"


def _private_collection_getter(getter, *args, **kwargs):
    # The legacy Keras layers under Slim search ALL global and trainable variables for every
    # new variable (quadratic: ~8 s for resnet_v2_200, ~2 s for resnet_v2_50). Numerics do
    # not depend on the collections or on a variable's trainable flag (batch norm follows
    # the layer's flag), so keep the variables in a private collection only.
    kwargs["collections"] = [_VARIABLES_COLLECTION]
    kwargs["trainable"] = False
    return getter(*args, **kwargs)


def _shapes_only_getter(getter, *args, **kwargs):
    # Without a session the initial values are never computed: skip building their ops.
    kwargs["initializer"] = v1.zeros_initializer()
    kwargs["regularizer"] = None
    return _private_collection_getter(getter, *args, **kwargs)


def build_network(model_name: str, num_classes: int, images, is_training,
                  getter=_private_collection_getter, **network_kwargs):
    """Slim's network in the current graph -> (logits [N, classes], end points, variables).

    Variables come in creation order, in a private collection only (see the module
    docstring); ``is_training`` is a Python bool or a bool tensor.
    """
    if model_name == "inception_v3":
        network = slim_inception_v3.inception_v3
        arg_scope = slim_inception_v3.inception_v3_arg_scope
    else:
        network = getattr(slim_resnet_v2, model_name)
        arg_scope = slim_resnet_v2.resnet_arg_scope
    with v1.variable_scope("", custom_getter=getter):
        with tf_slim.arg_scope(arg_scope()):
            logits, end_points = network(images, num_classes, is_training=is_training,
                                         **network_kwargs)
    variables = v1.get_default_graph().get_collection(_VARIABLES_COLLECTION)
    if logits.shape.rank == 4:  # ResNet v2 leaves the squeeze to the caller (ALP's model_fn)
        logits = tf.squeeze(logits, [1, 2])
    return logits, end_points, variables


def slim_variable_shapes(model_name: str, num_classes: int,
                         image_size: int = 64) -> dict[str, tuple[int, ...]]:
    """TF1 name -> shape of every variable Slim creates, in creation order (no session)."""
    with tf.Graph().as_default():
        images = v1.placeholder(tf.float32, [None, image_size, image_size, 3])
        _, _, variables = build_network(model_name, num_classes, images, False,
                                        _shapes_only_getter)
        return {variable_name(v): tuple(v.shape.as_list()) for v in variables}


def random_variable_values(
    shapes: Mapping[str, tuple[int, ...]], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random but well-scaled values for every variable (see the module docstring)."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape in shapes.items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "weights":
            fan_in = int(np.prod(shape[:-1]))
            # He scaling keeps activations alive through 50 layers; a smaller logits layer
            # keeps the logits near one, where float32 round-off stays well below 1e-4.
            gain = 0.1 if name.endswith(HEAD_WEIGHTS) else 2.0
            value = rng.normal(0.0, np.sqrt(gain / fan_in), shape)
        elif leaf == "biases":
            value = rng.normal(0.0, 0.1, shape)
        elif leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "beta":
            value = rng.normal(0.0, 0.2, shape)
        elif leaf == "moving_mean":
            value = rng.normal(0.5, 0.3, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            raise ValueError(f"no value rule for variable {name}")
        values[name] = value.astype(np.float32)
    return values


def run_slim_resnet_v2(
    model_name: str,
    num_classes: int,
    images: np.ndarray,
    is_training: bool,
    values: Optional[Mapping[str, np.ndarray]] = None,
    restore_path: Optional[str] = None,
    save_path: Optional[str] = None,
    input_gradient: bool = False,
) -> SlimRun:
    """One forward pass of Slim's network (see the module docstring for the details)."""
    if values is not None and restore_path is not None:
        raise ValueError("give values or restore_path, not both")
    images = np.asarray(images, np.float32)
    with tf.Graph().as_default():
        inputs = v1.placeholder(tf.float32, images.shape)
        logits, _, variables = build_network(model_name, num_classes, inputs, is_training)
        updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS) if is_training else []
        fetches = {"logits": logits, "updates": updates}
        if input_gradient:
            fetches["input_gradient"] = tf.gradients(tf.reduce_sum(logits), inputs)[0]
        saver = v1.train.Saver({variable_name(v): v for v in variables})
        with v1.Session() as session:
            if restore_path is not None:
                saver.restore(session, restore_path)
            elif values is None:
                session.run(v1.variables_initializer(variables))
            else:
                set_values(session, variables, values)
            if save_path is not None:
                saver.save(session, save_path, write_meta_graph=False)
            results = session.run(fetches, {inputs: images})
            after = session.run(variables)
    return SlimRun(
        logits=results["logits"],
        variables={variable_name(v): value for v, value in zip(variables, after)},
        input_gradient=results.get("input_gradient"),
    )


def set_values(session, variables, values: Mapping[str, np.ndarray]) -> None:
    """Sets every variable from ``values`` (name -> array) in one run.

    Raises:
      KeyError: ``values`` lacks some variable.
    """
    missing = sorted({variable_name(v) for v in variables} - set(values))
    if missing:
        raise KeyError(f"values lack {len(missing)} variables, e.g. {missing[:3]}")
    # Feeding the initial values sets everything in one run, without new ops.
    session.run(
        [v.initializer for v in variables],
        {v.initial_value: values[variable_name(v)] for v in variables},
    )


def run_slim_inception_v3(
    images: np.ndarray,
    values: Mapping[str, np.ndarray],
    num_classes: int = 1001,
    dropout_keep_prob: float = 1.0,
    end_points: Sequence[str] = (),
) -> dict[bool, SlimRun]:
    """Slim's inception_v3 in inference then training mode (see the module docstring)."""
    images = np.asarray(images, np.float32)
    with tf.Graph().as_default():
        inputs = v1.placeholder(tf.float32, images.shape)
        is_training = v1.placeholder(tf.bool, [])
        logits, points, variables = build_network(
            "inception_v3", num_classes, inputs, is_training,
            dropout_keep_prob=dropout_keep_prob,
        )
        fetches = {"logits": logits, "aux_logits": points["AuxLogits"],
                   "end_points": {name: points[name] for name in end_points}}
        updates = v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        runs = {}
        with v1.Session() as session:
            set_values(session, variables, values)
            for training in (False, True):
                results = session.run({**fetches, "updates": updates if training else []},
                                      {inputs: images, is_training: training})
                after = session.run(variables)
                runs[training] = SlimRun(
                    logits=results["logits"],
                    variables={variable_name(v): value for v, value in zip(variables, after)},
                    aux_logits=results["aux_logits"],
                    end_points=results["end_points"],
                )
    return runs
