"""The computations the bench scripts time, built from library pieces.

* ``input_gradient_fn``: ONE input-gradient pass (forward + backward to the input, inference
  mode) of a model: the unit of every bound. A PGD step cannot cost less.
* ``attack_fn``: the project's attack as a user calls it, eagerly
  (``adversarial_attack.generate_adversarial_examples`` on ``model.inference``).
* ``make_train_step``: ``training.make_train_step`` on ``training.build_train_state``, the
  step ``train.py`` runs (attack in inference mode; one training-mode pass over
  ``[clean; adversarial]``; the TF1 RMSProp of ``model_lib.get_optimizer``; the moving
  average), without data or checkpoints.
* ``write_static_source`` and ``make_ensemble_train_step``: the same step with static sources
  (``train.py --ensemble_sources``), each a TF1 checkpoint of a fresh model of the same name
  that ``training.build_train_state`` restores through ``ensemble.build_static_sources``.
* ``default_num_classes``: the logits width of the model on the data set its image size
  stands for (Tiny ImageNet at 64 px and below, else ImageNet with the model's own classes).
* ``alp_step_images_per_second``: what ``bench/data_pipeline.py`` compares its pipelines with.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from adversarial_logit_pairing import (  # noqa: E402
    adversarial_attack,
    checkpoints,
    ensemble,
    model_lib,
)
from adversarial_logit_pairing.datasets import dataset_factory  # noqa: E402
from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402
from adversarial_logit_pairing.models import (  # noqa: E402
    ImageClassifier,
    create_model,
    get_model_config,
)

BOUNDS = (-1.0, 1.0)
TINY_IMAGENET_SIZE = 64  # Tiny ImageNet's image side


def images_and_labels(batch: int, size: int, num_classes: int,
                      seed: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Random images in BOUNDS and random labels (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(BOUNDS[0], BOUNDS[1], (batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, batch).astype(np.int64)
    return tf.constant(images), tf.constant(labels)


def build_model(name: str, num_classes: int, compute_dtype: str = "float32") -> ImageClassifier:
    """The registered model ``name`` with seed 0."""
    return create_model(name, num_classes, seed=0, compute_dtype=compute_dtype)


def default_num_classes(model_name: str, image_size: int) -> int:
    """Logits width of ``model_name`` on the data set ``image_size`` stands for.

    Tiny ImageNet (200 classes, 64 px) at 64 px and below, as the ALP paper's Tiny ImageNet
    runs; above, ImageNet with the model's released head: 1001 for a TF-Slim model with the
    background class (``inception_v3``, ``resnet_v2_50``), 1000 for EfficientNet.
    """
    dataset = "tiny_imagenet" if image_size <= TINY_IMAGENET_SIZE else "imagenet"
    return dataset_factory.num_classes(dataset, get_model_config(model_name))


def input_gradient_fn(model: ImageClassifier) -> Callable:
    """Compiled gradient of the summed cross-entropy w.r.t. the input (inference mode)."""

    @tf.function
    def gradient(images, labels):
        with tf.GradientTape() as tape:
            tape.watch(images)
            logits = model(images, is_training=False)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        return tape.gradient(loss, images)

    return gradient


def forward_fn(model: ImageClassifier) -> Callable:
    """Compiled inference-mode logits."""
    return tf.function(lambda images: model(images, is_training=False))


def attack_fn(model: ImageClassifier, description: str, cast_once: bool = True) -> Callable:
    """The project's attack called eagerly, as a user would (its tf.function is cached).

    The model is given as ``model.inference``, so a bfloat16/float16 model casts its weights
    once per attack; ``cast_once=False`` gives it as a lambda instead, which casts them at
    every step (the attack before ``model.cast_weights`` existed).
    """
    model_fn = model.inference if cast_once else (lambda x: model(x, is_training=False))

    def attack(images, seed=(1, 2)):
        return adversarial_attack.generate_adversarial_examples(
            images, BOUNDS, model_fn, description, seed=seed)

    return attack


def _build_step(model_name: str, attack: str, lp_weight: float, num_classes: int,
                compute_dtype: str, moving_average_decay: float, extra_hparams: str,
                advprop: bool, ensemble_sources: Sequence = ()) -> tuple[Callable, object]:
    """``training.build_train_state`` and ``training.make_train_step`` as ``training.train``
    calls them: (the compiled step returning its outputs dict, the training state)."""
    from adversarial_logit_pairing import training

    hparams = model_lib.default_hparams().parse(
        f"train_adv_method={attack},train_lp_weight={lp_weight},advprop={advprop}"
        + (f",{extra_hparams}" if extra_hparams else ""))
    strategy = tf.distribute.get_strategy()
    state = training.build_train_state(
        strategy, model_name, num_classes, hparams,
        TINY_IMAGENET.examples_per_epoch["train"],
        moving_average_decay=moving_average_decay, compute_dtype=compute_dtype,
        ensemble_sources=tuple(ensemble_sources))
    step = training.make_train_step(strategy, state.model, state.trainable, state.optimizer,
                                    state.ema, state.global_step, hparams, num_classes, BOUNDS,
                                    loss_scale=state.loss_scale,
                                    static_sources=state.static_sources)
    return step, state


def make_train_step(model_name: str, attack: str = "pgdll_16_2_10", lp_weight: float = 0.5,
                    num_classes: int = TINY_IMAGENET.stored_classes,
                    compute_dtype: str = "float32",
                    moving_average_decay: float = 0.9999,
                    extra_hparams: str = "",
                    advprop: bool = False) -> tuple[Callable, ImageClassifier]:
    """What ``train.py`` builds and runs each step, without data or checkpoints.

    ``training.build_train_state`` (model, TF1 RMSProp, schedule, moving average, loss scale)
    and ``training.make_train_step``: ALP (or clean, ``attack='clean'``), plus any
    ``extra_hparams`` (e.g. the local linearity regulariser's ``llr_*``); with ``advprop`` the
    AdvProp step (attack through the auxiliary batch norms, two training passes on B).

    Returns:
      ``step(images, labels) -> total_loss`` and the model it trains (for the bounds).
    """
    step, state = _build_step(model_name, attack, lp_weight, num_classes, compute_dtype,
                              moving_average_decay, extra_hparams, advprop)
    return (lambda images, labels: step(images, labels)["total_loss"]), state.model


def write_static_source(model_name: str, num_classes: int, directory: str,
                        seed: int = 1) -> ensemble.StaticSource:
    """A static source for ``make_ensemble_train_step``: a fresh ``model_name`` (weights from
    ``seed``, not the trained model's) saved as a TF1 checkpoint under ``directory``, as a
    released or ``train.py`` checkpoint would be given to ``--ensemble_sources``."""
    model = create_model(model_name, num_classes, seed=seed)
    prefix = checkpoints.save(model.variables_by_name, directory, step=0)
    return ensemble.StaticSource(model_name, prefix)


def make_ensemble_train_step(model_name: str, sources: Sequence[ensemble.StaticSource],
                             attack: str = "stepll_16", lp_weight: float = 0.0,
                             num_classes: int = TINY_IMAGENET.stored_classes,
                             compute_dtype: str = "float32",
                             moving_average_decay: float = 0.9999
                             ) -> tuple[Callable, ImageClassifier, tuple[ImageClassifier, ...]]:
    """The ensemble adversarial training step ``train.py --ensemble_sources`` runs.

    ``training.build_train_state`` builds and restores the static ``sources`` (frozen, inference
    mode: ``ensemble.build_static_sources``) beside the model it trains, and
    ``training.make_train_step`` draws each step's attack source among them
    (``ensemble.adversarial_examples``); the rest is ``make_train_step``'s step.

    Returns:
      ``step(images, labels) -> outputs`` (``total_loss``, ``adv_source``: 0 the trained
      model, i the i-th static source, ...), the model it trains and the static models.
    """
    if not sources:
        raise ValueError("make_ensemble_train_step: no static source given")
    step, state = _build_step(model_name, attack, lp_weight, num_classes, compute_dtype,
                              moving_average_decay, "", False, sources)
    return step, state.model, state.static_sources


def make_training_pass(model: ImageClassifier, num_classes: int) -> Callable:
    """The bound's training part: one training-mode forward/backward to the weights, no update."""
    trainable = list(model.trainable_variables)

    @tf.function
    def training_pass(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, is_training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits))
        return tape.gradient(loss, trainable)

    return training_pass


def make_second_order_pass(model: ImageClassifier, num_classes: int) -> Callable:
    """The LLR bound's last part: a forward pass, its input gradient kept in the graph, and the
    weights' gradient of ``loss + d^T grad_x loss`` (a second-order backward), no update."""
    trainable = list(model.trainable_variables)

    @tf.function
    def second_order_pass(images, labels, delta):
        one_hot = tf.one_hot(labels, num_classes)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(images)
                loss = tf.nn.softmax_cross_entropy_with_logits(
                    labels=one_hot, logits=model(images, is_training=True))
            grad = inner.gradient(loss, images)
            total = tf.reduce_mean(loss) + tf.reduce_mean(tf.reduce_sum(grad * delta, [1, 2, 3]))
        return outer.gradient(total, trainable)

    return second_order_pass


def alp_step_images_per_second(dataset_name: str, image_size: int, batch_size: int,
                               model_name: Optional[str] = None,
                               compute_dtype: str = "float32", repetitions: int = 3) -> float:
    """Images/s of the paper's ALP step (pgdll_16_2_10, lp 0.5) for ``dataset_name``'s model.

    resnet_v2_50 (the paper's network for both data sets) unless ``model_name`` says otherwise.
    """
    from bench._timing import median_seconds

    model_name = model_name or "resnet_v2_50"
    num_classes = dataset_factory.num_classes(dataset_name, get_model_config(model_name))
    step, _ = make_train_step(model_name, num_classes=num_classes, compute_dtype=compute_dtype)
    images, labels = images_and_labels(batch_size, image_size, num_classes)
    seconds = median_seconds(lambda: step(images, labels), repetitions=repetitions, warmup=1)
    return batch_size / seconds
