"""The training loop behind ``train.py``: mixed clean + adversarial minibatches and ALP.

``train(config)`` reads top to bottom: every flag check (``validate``, before any model or
data), the training state (``build_train_state``: model, global step, schedule, optimizer,
moving averages; also what the benchmarks and tests build), the data, resume or fine-tune
(``restore_or_finetune``), the compiled training step, then the loop with its marked sections
(step, log, summaries, checkpoint). The step follows the original ``train.py``:

* clean: logits of the batch in training mode;
* adversarial: attack the batch with the model in inference mode (no gradient flows back
  through the attack), then run ``[clean; adversarial]`` as ONE batch of 2B in training mode,
  so batch norm sees the statistics of the mixed batch, with the labels duplicated;
* loss = label-smoothed softmax cross-entropy (mean over the batch)
  + for a model with an auxiliary head (``inception_v3``), ``aux_loss_weight`` (0.4) x the
  same cross-entropy of its auxiliary logits, as Slim's Inception training;
  + ``train_lp_weight * mean((first_half - second_half)**2)`` of the logits when
  ``train_lp_weight > 0``: ``[clean; adversarial]`` halves with an attack (ALP), the two
  halves of the clean batch without one (clean logit pairing), as the original;
  + ``weight_decay * sum(l2_loss(v))`` over the trainable variables;
* Kurakin et al.'s mixed batch instead of ``[clean; adversarial]`` when
  ``train_adv_fraction > 0`` (``mixed_batch``): k of the B examples replaced by their
  adversarial examples, cross-entropies weighed by ``train_adv_loss_weight``;
* the optimizer step increments ``global_step``; then the TF1-style moving average of all model
  variables (weights and batch-norm statistics) is updated with ``num_updates = global_step``.

Distribution (``train(config, strategy)``, see ``distribution``): ``batch_size`` is per replica,
so every replica attacks and trains on its own ``batch_size`` clean images; the optimizer
applies the mean of the replicas' gradients once, the learning rate is multiplied by the
replicas in sync and the steps per epoch divided by them (what ``--replicas_to_aggregate`` did
for the original's SyncReplicasOptimizer), and the moving average follows that one update.
``--replicas_to_aggregate=N`` above the replicas in sync keeps the original's meaning: each
replica accumulates ``N / replicas`` successive micro-batches into its gradient, so one update
averages N gradients and the learning rate is multiplied by N (``learning_rate_replicas``).
Batch norm uses each replica's own statistics, as the original's workers did, unless
``sync_batch_norm``. Only the chief writes summaries and checkpoints; the other workers take
part in every checkpoint (reading batch-norm statistics is a collective under
MultiWorkerMirroredStrategy) by writing it to a temporary directory they delete.

Fault tolerance: a checkpoint becomes the latest only when complete (``checkpoints.save``), so
a run killed at any moment and restarted with the same command resumes from the last complete
checkpoint with its global step, model, moving averages and optimizer slots.

Progress is one absl log line per step (``global_step N: total_loss = ...``, which
tests/test_fault_tolerance.py parses), not ``tf.keras.utils.Progbar``: Keras 3.15's Progbar
redraws with carriage returns, backspaces and ANSI colours on stdout even when stdout is a file
(measured: 5 updates wrote one 898-byte line of them), outside the timestamped absl log.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Callable, Optional, Union

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import (
    adversarial_attack,
    advprop,
    checkpoints,
    distribution,
    ensemble,
    llr_regularizer,
    mixed_batch,
    model_lib,
    moving_average,
    optimizers,
    precision,
    summaries,
    tf_error_text,
)
from adversarial_logit_pairing.datasets import dataset_factory, dataset_facts
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.errors import ConfigError, DataError, TrainingDivergedError
from adversarial_logit_pairing.models import ImageClassifier, ModelConfig, get_model_config
from adversarial_logit_pairing.moving_average import ExponentialMovingAverage
from adversarial_logit_pairing.progress import format_seconds


@dataclasses.dataclass
class TrainConfig:
    """Plain-data mirror of ``train.py``'s flags (same names, same defaults)."""

    output_dir: str
    max_steps: int = -1
    model_name: str = "resnet_v2_50"
    dataset: str = "imagenet"
    dataset_image_size: int = 64
    num_summary_images: int = 3
    save_summaries_steps: Optional[int] = 100
    save_summaries_secs: Optional[int] = None
    save_model_steps: int = 500
    hparams: str = ""
    replicas_to_aggregate: int = 1
    moving_average_decay: float = 0.9999
    finetune_checkpoint_path: Optional[str] = None
    finetune_exclude_pretrained_scopes: str = ""
    finetune_trainable_scopes: Optional[str] = None
    imagenet_data_dir: Optional[str] = None
    tiny_imagenet_data_dir: Optional[str] = None
    seed: int = 0
    max_checkpoints_to_keep: int = 5
    sync_batch_norm: bool = False
    jit_compile: bool = False
    compute_dtype: str = "float32"
    ensemble_sources: str = ""


@dataclasses.dataclass
class TrainResult:
    """What a finished ``train`` call leaves behind."""

    global_step: int
    checkpoint_path: Optional[str]
    last_losses: dict


def smoothed_cross_entropy(one_hot: tf.Tensor, logits: tf.Tensor, label_smoothing: float,
                           example_weights: Optional[tf.Tensor] = None) -> tf.Tensor:
    """``tf.compat.v1.losses.softmax_cross_entropy`` with label smoothing: batch mean.

    With ``example_weights`` (Kurakin's mixed batch), ``sum(w * loss) / sum(w)`` instead.
    """
    if label_smoothing > 0:
        num_classes = tf.cast(tf.shape(one_hot)[-1], one_hot.dtype)
        one_hot = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
    per_example = tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
    return mixed_batch.weighted_mean(per_example, example_weights)


def aux_loss_weight(hparams: model_lib.HParams, model_config: Optional[ModelConfig]) -> float:
    """The weight of the auxiliary head's cross-entropy in the training loss; 0: no such term.

    The ``aux_loss_weight`` hparam when the hparams have it (``default_hparams(model_config)``
    adds it for a model with an auxiliary head), else the model's registered default (None
    for a model without an auxiliary head).

    Raises:
      ConfigError: a negative weight, or one given for a model without an auxiliary head.
    """
    registered = getattr(model_config, "aux_loss_weight", None)
    if "aux_loss_weight" not in hparams:
        return float(registered or 0.0)
    weight = hparams.aux_loss_weight
    if registered is None:
        name = getattr(model_config, "name", "this model")
        raise ConfigError(f"--hparams: aux_loss_weight={weight}, but {name} has no auxiliary "
                          "head")
    if weight < 0:
        raise ConfigError(f"--hparams: aux_loss_weight={weight} must be >= 0")
    return float(weight)


def check_logit_pairing(hparams: model_lib.HParams) -> None:
    """Clean logit pairing splits each batch in two halves: it needs an even batch.

    Raises:
      ConfigError: naming the hparams, for an odd ``batch_size`` with
        ``train_adv_method=clean`` and ``train_lp_weight > 0``.
    """
    clean = adversarial_attack.parse_attack_description(hparams.train_adv_method).is_clean
    if clean and hparams.train_lp_weight > 0 and hparams.batch_size % 2:
        raise ConfigError(
            f"--hparams: train_lp_weight={hparams.train_lp_weight} with "
            f"train_adv_method=clean pairs the first half of each batch with the second "
            f"(clean logit pairing) and needs an even batch_size, got {hparams.batch_size}")


def alp_losses(
    logits: tf.Tensor,
    one_hot: tf.Tensor,
    trainable: list,
    hparams: model_lib.HParams,
    aux_logits: Optional[tf.Tensor] = None,
    aux_weight: float = 0.0,
    example_weights: Optional[tf.Tensor] = None,
    sum_halves: bool = False,
) -> dict:
    """The loss terms of the original ``train.py`` and their sum, ``total_loss``.

    Args:
      logits: [N, K] logits of the training-mode forward pass: ``[clean; adversarial]`` in
        adversarial training, the clean batch in clean training.
      one_hot: [N, K] one-hot labels (duplicated for the adversarial half).
      trainable: variables subject to weight decay.
      hparams: reads label_smoothing, train_lp_weight, weight_decay.
      aux_logits: [N, K] auxiliary-head logits of the same pass, or None; with
        ``aux_weight > 0`` they add ``loss_aux``, ``aux_weight`` x their cross-entropy
        (same labels and label smoothing), as Slim's Inception training does.
      example_weights: [N] weights of Kurakin's mixed batch for both cross-entropies
        (``mixed_batch``), or None for the batch mean.
      sum_halves: AdvProp's loss: the cross-entropy is the SUM of the two halves' means
        (clean through the main batch norms, adversarial through the auxiliary ones).

    Whenever ``train_lp_weight > 0`` the first half of ``logits`` is paired with the second,
    as the original did whatever the attack: with an attack that is adversarial logit
    pairing, with ``train_adv_method=clean`` it is the paper's clean logit pairing (the two
    halves of the clean batch; N must be even, see ``check_logit_pairing``).
    """
    logits = tf.cast(logits, tf.float32)
    if sum_halves:
        losses = {"loss_xent": tf.add_n([
            smoothed_cross_entropy(labels, half, hparams.label_smoothing)
            for labels, half in zip(tf.split(one_hot, 2), tf.split(logits, 2))])}
    else:
        losses = {"loss_xent": smoothed_cross_entropy(one_hot, logits, hparams.label_smoothing,
                                                      example_weights)}
    total = losses["loss_xent"]
    if aux_logits is not None and aux_weight > 0:
        losses["loss_aux"] = aux_weight * smoothed_cross_entropy(
            one_hot, tf.cast(aux_logits, tf.float32), hparams.label_smoothing, example_weights)
        total += losses["loss_aux"]
    if hparams.train_lp_weight > 0:
        first, second = tf.split(logits, 2)
        losses["loss_lp"] = hparams.train_lp_weight * tf.reduce_mean(tf.square(first - second))
        total += losses["loss_lp"]
    if hparams.weight_decay > 0 and trainable:
        losses["loss_wd"] = hparams.weight_decay * tf.add_n(
            [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in trainable]
        )
        total += losses["loss_wd"]
    losses["total_loss"] = total
    return losses


def finetune_assignments(model, checkpoint_path: str, exclude_scopes, trainable_names: set,
                         use_moving_average: bool) -> dict:
    """Checkpoint name -> model variable for fine-tuning, as the original's init function.

    Variables under ``exclude_scopes`` keep their fresh initialisation. When the moving average
    is on, trainable variables are read from their ``/ExponentialMovingAverage`` shadows and the
    others (frozen ones, batch-norm statistics) from their plain names.
    """
    excluded = model_lib.parse_scopes(exclude_scopes)
    assignments = {}
    for name, variable in model.variables_by_name.items():
        if any(name.startswith(scope) for scope in excluded):
            continue
        if use_moving_average and name in trainable_names:
            assignments[name + "/ExponentialMovingAverage"] = variable
        else:
            assignments[name] = variable
    return assignments


SCALAR_OUTPUTS = ("loss_xent", "loss_aux", "loss_lp", "loss_wd", "loss_llr_gamma",
                  "loss_llr_grad", "total_loss", "learning_rate")
SCALAR_OUTPUTS += (ensemble.SOURCE_OUTPUT,)  # ensemble adversarial training only

# Errors by which a multi-worker job learns that a peer died or stopped answering.
_CLUSTER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                   tf.errors.AbortedError, tf.errors.CancelledError)


def learning_rate_replicas(num_replicas_in_sync: int, replicas_to_aggregate: int) -> int:
    """The gradients averaged per update: the learning-rate factor and steps-per-epoch divisor.

    The original's SyncReplicasOptimizer averaged ``--replicas_to_aggregate`` gradients into
    each update, whoever computed them (one worker: N successive batches), and multiplied the
    learning rate by N. Here each replica in sync accumulates ``N / replicas`` successive
    micro-batches (``group_micro_batches``) into its gradient, so the factor is
    ``max(N, replicas)``; the default N=1 means "the replicas in sync".

    Raises:
      ConfigError: ``replicas_to_aggregate`` is below 1, or neither 1 nor a multiple of the
        replicas in sync (the replicas could not share the batches evenly).
    """
    if replicas_to_aggregate < 1:
        raise ConfigError(f"--replicas_to_aggregate={replicas_to_aggregate}: must be >= 1")
    if replicas_to_aggregate % num_replicas_in_sync and replicas_to_aggregate != 1:
        raise ConfigError(
            f"--replicas_to_aggregate={replicas_to_aggregate}: must be 1 or a multiple of the "
            f"{num_replicas_in_sync} replicas in sync (each replica averages "
            f"replicas_to_aggregate / {num_replicas_in_sync} successive batches per update)")
    return max(replicas_to_aggregate, num_replicas_in_sync)


def group_micro_batches(dataset: tf.data.Dataset, num_micro_batches: int,
                        num_replicas_in_sync: int) -> tf.data.Dataset:
    """Groups ``num_micro_batches`` global batches into the element of one update.

    ``dataset`` yields global batches ``[replicas * B, ...]``; the result yields
    ``[replicas * k, B, ...]`` ordered replica-major, because
    ``experimental_distribute_dataset`` gives each replica its slice of dimension 0: replica
    ``r`` receives ``[k, B, ...]`` whose micro-batch ``j`` is its usual share of the ``j``-th
    global batch. ``k = 1`` returns ``dataset`` itself.
    """
    if num_micro_batches == 1:
        return dataset
    k, replicas = num_micro_batches, num_replicas_in_sync

    def replica_major(x: tf.Tensor) -> tf.Tensor:
        inner = x.shape[2:].as_list()  # static: the training pipeline drops partial batches
        x = tf.reshape(x, [k, replicas, -1] + inner)
        x = tf.transpose(x, [1, 0] + list(range(2, x.shape.rank)))
        return tf.reshape(x, [replicas * k, -1] + inner)

    return dataset.batch(k, drop_remainder=True).map(
        lambda images, labels: (replica_major(images), replica_major(labels)),
        num_parallel_calls=tf.data.AUTOTUNE)


def make_train_step(
    strategy: tf.distribute.Strategy,
    model,
    trainable: list,
    optimizer,
    ema: Optional[ExponentialMovingAverage],
    global_step: tf.Variable,
    hparams: model_lib.HParams,
    num_classes: int,
    bounds: tuple[float, float],
    seed: int = 0,
    num_summary_images: int = 0,
    jit_compile: bool = False,
    loss_scale: Optional[precision.LossScale] = None,
    num_micro_batches: int = 1,
    static_sources: Sequence[ImageClassifier] = (),
) -> Callable:
    """The compiled training step: ``train_step(images, labels) -> outputs``.

    ``images`` and ``labels`` are one batch of ``strategy.experimental_distribute_dataset``
    (per replica ``batch_size`` clean images), or plain tensors without a strategy. Each
    replica attacks its images, runs ``[clean; adversarial]`` in training mode and computes its
    losses; the optimizer applies the mean gradient, then the moving average is updated.

    With ``num_micro_batches`` k > 1 (``--replicas_to_aggregate`` above the replicas in sync),
    each replica receives ``[k, batch_size, ...]`` (``group_micro_batches``) and runs the
    attack and the training pass on each micro-batch in turn, in one in-graph loop, so batch
    norm's moving statistics move with every micro-batch; the optimizer then applies the mean
    of all k x replicas gradients ONCE (one ``global_step``), and the moving average follows
    that update, as the original's SyncReplicasOptimizer did. The reported losses are means
    over the micro-batches too.

    With ``static_sources`` (ensemble adversarial training, see ``ensemble``), each batch's
    adversarial examples come from a source drawn among the model and them, reported as
    ``adv_source``.

    Returns:
      A ``tf.function``; its outputs hold the loss terms and ``learning_rate`` averaged over
      the replicas (float32 scalars) and, when ``num_summary_images > 0``, the first
      ``images``/``adv_images`` of this process's first replica (its first micro-batch).

    With a ``loss_scale`` (float16 compute), the loss is scaled before differentiation and
    the gradients unscaled after; a step whose gradients overflow is skipped (the global step
    still counts it) and the scale shrinks.
    """
    attack = adversarial_attack.parse_attack_description(hparams.train_adv_method)
    mixing = mixed_batch.from_hparams(hparams)
    aux_weight = aux_loss_weight(hparams, getattr(model, "config", None))
    learning_rate = optimizer.learning_rate
    names: list[str] = []  # the scalars step_fn stacks, known once it is traced
    use_advprop = advprop.enabled(hparams)

    def forward_backward(images, labels, micro_batch=None):
        one_hot = tf.one_hot(labels, num_classes)
        adv_images = example_weights = None
        if attack.is_clean:
            inputs = images
        else:
            step_seed = distribution.replica_seed(
                tf.stack([tf.constant(seed, tf.int64), tf.cast(global_step, tf.int64)]))
            if micro_batch is not None:
                # (seed, step, replica, micro-batch) is unique, and a resumed run (which starts
                # at an update boundary) draws the same starts again.
                step_seed = tf.random.experimental.stateless_fold_in(step_seed, micro_batch)
            # model.inference: a bfloat16/float16 model casts its weights once for the attack
            # (the training pass below keeps its own casts, which the tape differentiates).
            to_attack = mixing.to_attack(images)
            with advprop.attack_context(model, hparams):  # AdvProp: the auxiliary BNs
                if static_sources:
                    adv_images, source = ensemble.adversarial_examples(
                        to_attack, bounds,
                        [model.inference] + [s.inference for s in static_sources],
                        hparams.train_adv_method, step_seed)
                else:
                    adv_images = adversarial_attack.generate_adversarial_examples(
                        to_attack, bounds, model.inference, hparams.train_adv_method,
                        seed=step_seed)
            inputs, one_hot, example_weights = mixing.training_batch(images, adv_images, one_hot)
        with tf.GradientTape() as tape:
            aux_logits = None
            if use_advprop:  # two passes: clean via the main BNs, adversarial via the twins
                logits = advprop.training_logits(model, images, adv_images)
            elif aux_weight > 0:
                logits, aux_logits = model.logits_and_aux(inputs, is_training=True)
            else:
                logits = model(inputs, is_training=True)
            losses = alp_losses(logits, one_hot, trainable, hparams, aux_logits, aux_weight,
                                example_weights, sum_halves=use_advprop)
            losses = llr_regularizer.add_llr_losses(
                losses, model, images, labels, num_classes, hparams, bounds, seed, global_step,
                micro_batch)
            objective = losses["total_loss"]
            if loss_scale is not None:
                objective = loss_scale.scale(objective)
        grads = tape.gradient(objective, trainable)
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
        if static_sources and not attack.is_clean:
            losses[ensemble.SOURCE_OUTPUT] = tf.cast(source, tf.float32)
        return grads, losses, adv_images

    # The loss terms step_fn reports (those alp_losses may return).
    loss_names = [name for name in SCALAR_OUTPUTS if name != "learning_rate"]
    tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    # Synchronised batch norm all-reduces in the middle of the pass; under Mirrored and
    # MultiWorkerMirrored strategies that is a merge_call, which TensorFlow refuses inside a
    # tf.while_loop: there the micro-batch loop is unrolled (k copies of the pass).
    unroll = (strategy.num_replicas_in_sync > 1 and not tpu and any(
        isinstance(m, distribution.CrossReplicaBatchNorm) for m in model.submodules))

    def accumulate(images, labels):
        """``forward_backward`` over the ``[k, B, ...]`` micro-batches: mean gradients/losses.

        One ``tf.while_loop`` (the model is traced once, whatever k); gradients that are None
        (a variable the loss does not reach) are carried as zeros and given back as None so the
        optimizer skips them as it would for one batch.
        """
        k = num_micro_batches
        none_grads: set[int] = set()
        present: list[str] = []  # the loss terms this configuration has, found while tracing
        shown_init = tf.zeros_like(mixing.to_attack(images[0])[:num_summary_images])

        def body(i, grad_sums, loss_sums, shown):
            grads, losses, adv_images = forward_backward(images[i], labels[i], i)
            none_grads.update(j for j, g in enumerate(grads) if g is None)
            present[:] = [name for name in loss_names if name in losses]
            grad_sums = [s if g is None else s + tf.cast(g, s.dtype)
                         for s, g in zip(grad_sums, grads)]
            loss_sums = loss_sums + tf.stack([tf.cast(losses.get(name, 0.0), tf.float32)
                                              for name in loss_names])
            if adv_images is not None:
                shown = tf.where(i == 0, adv_images[:num_summary_images], shown)
            return i + 1, grad_sums, loss_sums, shown

        state = (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in trainable],
                 tf.zeros([len(loss_names)]), shown_init)
        if unroll:
            for _ in range(k):
                state = body(*state)
        else:
            # parallel_iterations=1: micro-batch i+1's attack must see the moving statistics
            # that micro-batch i's training pass left.
            state = tf.while_loop(lambda i, *_: i < k, body, state, parallel_iterations=1,
                                  maximum_iterations=k)
        _, grad_sums, loss_sums, shown = state
        grads = [None if j in none_grads else s / k for j, s in enumerate(grad_sums)]
        means = dict(zip(loss_names, tf.unstack(loss_sums / k)))
        losses = {name: means[name] for name in present}
        return grads, losses, None if attack.is_clean else shown

    compile_whole_step = jit_compile and strategy.num_replicas_in_sync == 1 and not tpu
    if jit_compile and strategy.num_replicas_in_sync > 1 and not tpu:
        # XLA cannot span devices, and the update reaches every replica's copy: compile each
        # replica's attack, forward and backward pass, and apply the update outside.
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def step_fn(images, labels):
        if num_micro_batches == 1:
            grads, losses, adv_images = forward_backward(images, labels)
        else:
            grads, losses, adv_images = accumulate(images, labels)
            images = images[0]
        current_lr = learning_rate(global_step) if callable(learning_rate) else learning_rate
        losses["learning_rate"] = tf.cast(current_lr, tf.float32)
        if loss_scale is None:
            optimizer.apply_gradients(list(zip(grads, trainable)), global_step)
        else:
            def apply():
                optimizer.apply_gradients(list(zip(grads, trainable)), global_step)
                return tf.constant(True)

            def skip():
                global_step.assign_add(1)
                return tf.constant(False)

            tf.cond(loss_scale.update(grads), apply, skip)
        if ema is not None:
            ema.apply(global_step)
        names[:] = [name for name in SCALAR_OUTPUTS if name in losses]
        scalars = tf.stack([tf.cast(losses[name], tf.float32) for name in names])
        images_out = {}
        if num_summary_images:
            images_out["images"] = images[:num_summary_images]
            if adv_images is not None:
                images_out["adv_images"] = adv_images[:num_summary_images]
        return scalars, images_out

    def train_step(images, labels):
        scalars, images_out = strategy.run(step_fn, args=(images, labels))
        # One all-reduce for all scalars; every worker takes part in it.
        scalars = strategy.reduce(tf.distribute.ReduceOp.MEAN, scalars, axis=None)
        outputs = dict(zip(names, tf.unstack(scalars, num=len(names))))
        for name, value in images_out.items():
            outputs[name] = strategy.experimental_local_results(value)[0]
        return outputs

    # TPUStrategy compiles the replica computation with XLA itself.
    return tf.function(train_step, jit_compile=True if compile_whole_step else None)


def shard_policy(dataset_name: str, data_dir: Optional[str],
                 workers: int) -> tf.data.experimental.AutoShardPolicy:
    """How each worker of a multi-worker job gets its own share of the training data.

    By files when there are enough of them (ImageNet's 1024 shards), otherwise by records:
    every worker then reads the whole file and keeps every ``workers``-th batch.
    """
    files = dataset_factory.data_files(dataset_name, "train", data_dir)
    if len(files) >= workers:
        return tf.data.experimental.AutoShardPolicy.FILE
    return tf.data.experimental.AutoShardPolicy.DATA


# ---- Checks, before anything is built -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What the flags decide, known before any file is opened or model built (``validate``).

    Attributes:
      hparams: the parsed ``--hparams``.
      model_config: the registered config of ``--model_name`` (preprocessing, head scopes).
      num_classes: logits of the model on ``--dataset``.
      examples_per_epoch: the original's training-split size (the schedule counts epochs).
      lr_replicas: gradients averaged per update: the learning-rate factor and the
        steps-per-epoch divisor (``learning_rate_replicas``).
      num_micro_batches: successive batches each replica accumulates per update.
      data_dir: the directory flag that belongs to ``--dataset``.
      ensemble_sources: the static sources of ensemble adversarial training, checkpoints
        resolved (``ensemble.check_sources``).
    """

    hparams: model_lib.HParams
    model_config: ModelConfig
    num_classes: int
    examples_per_epoch: int
    lr_replicas: int
    num_micro_batches: int
    data_dir: Optional[str]
    ensemble_sources: tuple[ensemble.StaticSource, ...] = ()


def validate(config: TrainConfig,
             strategy: Optional[tf.distribute.Strategy] = None) -> TrainPlan:
    """Checks every flag, hparam and their combinations with the strategy; opens no data file.

    (The one file read is the index of each ``--ensemble_sources`` checkpoint: its names and
    shapes.)

    A mistake in the command line should cost seconds, not the minutes of building a model
    and reading data (or, on a cluster, the wait for every worker).

    Raises:
      ConfigError: no ``output_dir``; bad hparams (attack, learning-rate schedule, optimizer);
        clean logit pairing with an odd batch; ``--jit_compile --sync_batch_norm`` off TPU on
        several replicas; a bad ``--replicas_to_aggregate``; float16 on several replicas; an
        unknown model, data set or compute dtype; ``--ensemble_sources`` that do not fit.
      MissingCheckpointError, CheckpointError: an ``--ensemble_sources`` checkpoint missing or
        unreadable.
    """
    if not config.output_dir:
        raise ConfigError("--output_dir has to be provided")
    model_config = get_model_config(config.model_name)
    # A model with an auxiliary head has the aux_loss_weight hparam too.
    hparams = model_lib.default_hparams(model_config).parse(config.hparams)
    check_logit_pairing(hparams)  # parses train_adv_method too
    mixed_batch.from_hparams(hparams)
    advprop.check_hparams(hparams, aux_loss_weight(hparams, model_config))
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if (config.jit_compile and config.sync_batch_norm and replicas > 1
            and not isinstance(strategy, tf.distribute.TPUStrategy)):
        raise ConfigError("--jit_compile with --sync_batch_norm needs --strategy=tpu: on other "
                          "devices XLA compiles each replica alone, and synchronised batch norm "
                          "talks to the others in the middle of the step")
    if precision.needs_loss_scaling(config.compute_dtype) and replicas > 1:
        raise ConfigError("--compute_dtype=float16 (loss scaling) runs on one device only for "
                          "now; use bfloat16 with several replicas")
    lr_replicas = learning_rate_replicas(replicas, config.replicas_to_aggregate)
    examples_per_epoch = dataset_factory.examples_per_epoch(config.dataset, "train")
    # Schedule and optimizer hold no variables: making them checks their hparams, for nothing.
    model_lib.get_optimizer(hparams, model_lib.get_lr_schedule(
        hparams, examples_per_epoch, lr_replicas)[0])
    num_classes = dataset_factory.num_classes(config.dataset, model_config)
    sources = ensemble.check_sources(config.ensemble_sources, hparams.train_adv_method,
                                     config.dataset, num_classes, config.dataset_image_size)
    return TrainPlan(
        hparams, model_config, num_classes, examples_per_epoch, lr_replicas,
        lr_replicas // replicas, dataset_facts.data_dir(config.dataset, config), sources)


def log_plan(config: TrainConfig, plan: TrainPlan, strategy: tf.distribute.Strategy) -> None:
    """Logs the hparams and, when one update averages several batches, how many examples."""
    logging.info("User provided hparams: %s", config.hparams)
    logging.info("All hyper parameters: %s", plan.hparams)
    if plan.lr_replicas > 1:
        logging.info("%d replicas in sync x %d micro-batches per update: %d examples per "
                     "update, learning rate x%d", strategy.num_replicas_in_sync,
                     plan.num_micro_batches, plan.hparams.batch_size * plan.lr_replicas,
                     plan.lr_replicas)


# ---- The training state: model, step, schedule, optimizer, moving averages -----------------

@dataclasses.dataclass
class TrainState:
    """Everything the training step changes and a training checkpoint holds.

    Built by ``build_train_state`` for ``train``, the benchmarks and the tests alike, so that
    what they time or check is what ``train.py`` runs.
    """

    strategy: tf.distribute.Strategy
    model: ImageClassifier
    trainable: list  # the variables the optimizer updates (and weight decay covers)
    global_step: tf.Variable
    learning_rate: Union[Callable, float]  # the schedule, already multiplied by lr_replicas
    steps_per_epoch: float
    optimizer: optimizers.TF1Optimizer
    ema: Optional[ExponentialMovingAverage]
    loss_scale: Optional[precision.LossScale]
    # Frozen models the attack may use (ensemble adversarial training); not in checkpoints.
    static_sources: tuple[ImageClassifier, ...] = ()

    def checkpoint_variables(self) -> dict[str, tf.Variable]:
        """Every variable a training checkpoint holds, by TF1 name."""
        variables = dict(self.model.variables_by_name)
        variables["global_step"] = self.global_step
        variables.update(self.optimizer.variables_by_name())
        if self.ema is not None:
            variables.update(self.ema.variables_by_name())
        if self.loss_scale is not None:
            variables["loss_scale/current"] = self.loss_scale.current
            variables["loss_scale/good_steps"] = self.loss_scale.good_steps
        return variables


def build_train_state(
    strategy: tf.distribute.Strategy,
    model_name: str,
    num_classes: int,
    hparams: model_lib.HParams,
    examples_per_epoch: int,
    lr_replicas: int = 1,
    moving_average_decay: float = 0.9999,
    trainable_scopes: Optional[str] = None,
    sync_batch_norm: bool = False,
    compute_dtype: str = "float32",
    seed: int = 0,
    ensemble_sources: Sequence[ensemble.StaticSource] = (),
) -> TrainState:
    """Builds the training state under ``strategy``'s scope, freshly initialised.

    Args:
      strategy: where the variables live.
      model_name, num_classes, seed, compute_dtype: the model (``model_lib.get_model``).
      hparams: the optimizer and learning-rate hparams.
      examples_per_epoch: the schedule's epoch (``dataset_factory.examples_per_epoch``).
      lr_replicas: gradients averaged per update (``learning_rate_replicas``).
      moving_average_decay: ``moving_average.enabled`` decides whether there are shadows.
      trainable_scopes: ``--finetune_trainable_scopes``; None: every trainable variable.
      sync_batch_norm: normalise with the statistics of the global batch.
      ensemble_sources: static sources, built frozen and restored from their checkpoints.

    Raises:
      ConfigError: ``trainable_scopes`` matches no variable of the model.
      CheckpointError: an ``ensemble_sources`` checkpoint does not fit its model.
    """
    with strategy.scope():
        model = model_lib.get_model(model_name, num_classes, seed=seed,
                                    compute_dtype=compute_dtype)
        model_lib.set_drop_connect_rate(model, hparams.drop_connect_rate)
        if sync_batch_norm:
            distribution.use_cross_replica_batch_norm(model)
        if advprop.enabled(hparams):
            advprop.add_auxiliary_batch_norms(model)
        trainable = model_lib.filter_trainable_variables(trainable_scopes,
                                                         model.trainable_variables)
        if not trainable:
            raise ConfigError(f"--finetune_trainable_scopes={trainable_scopes}: matches no "
                              f"variable of {model_name} (its variables start with "
                              f"'{model.scope}/')")
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        learning_rate, steps_per_epoch = model_lib.get_lr_schedule(
            hparams, examples_per_epoch, lr_replicas)
        optimizer = model_lib.get_optimizer(hparams, learning_rate)
        optimizer.build(trainable)
        ema = (ExponentialMovingAverage(moving_average_decay, model.variables_by_name)
               if moving_average.enabled(moving_average_decay) else None)
        loss_scale = precision.LossScale() if precision.needs_loss_scaling(compute_dtype) else None
        static_sources = ensemble.build_static_sources(ensemble_sources, num_classes,
                                                       compute_dtype)
    return TrainState(strategy, model, trainable, global_step, learning_rate, steps_per_epoch,
                      optimizer, ema, loss_scale, static_sources)


def restore_or_finetune(state: TrainState, config: TrainConfig, plan: TrainPlan) -> Optional[str]:
    """Resumes from ``output_dir``'s latest checkpoint, else fine-tunes when asked to.

    Fine-tuning (only for a run without a checkpoint yet) reads the model variables outside
    ``--finetune_exclude_pretrained_scopes``; with the moving average on, the trainable ones
    from their shadows (or, for a checkpoint saved without any, their plain names). The shadows
    then restart from the fine-tuned values.

    Returns:
      The checkpoint resumed from; None for a fresh or fine-tuned start.

    Raises:
      CheckpointError, MissingCheckpointError: a checkpoint that is missing or does not fit.
    """
    resume_from = checkpoints.latest_checkpoint(config.output_dir)
    if resume_from is not None:
        logging.info("Resuming from %s", resume_from)
        checkpoints.restore(state.checkpoint_variables(), resume_from, what="training state")
        return resume_from
    if not config.finetune_checkpoint_path:
        return None
    source = checkpoints.resolve_checkpoint(config.finetune_checkpoint_path,
                                            "--finetune_checkpoint_path")
    logging.info("Fine-tuning from %s", source)
    assignments = finetune_assignments(
        state.model, source, config.finetune_exclude_pretrained_scopes,
        {model_lib.variable_name(v) for v in state.trainable}, state.ema is not None)
    # AdvProp from a checkpoint without auxiliary BNs (the released ones): copy the main ones.
    assignments, twins_to_copy = advprop.finetune_without_missing_twins(
        state.model, assignments, set(checkpoints.variable_shapes(source)))
    checkpoints.restore(checkpoints.plain_names_without_shadows(assignments, source), source,
                        what=f"{config.model_name} ({plan.num_classes} classes) for fine-tuning",
                        classifier_scopes=plan.model_config.classifier_scopes)
    with state.strategy.scope():
        advprop.copy_main_into_auxiliary(twins_to_copy)
    if state.ema is not None:
        with state.strategy.scope():
            for name, variable in state.model.variables_by_name.items():
                state.ema.shadow(name).assign(variable.read_value())
    return None


# ---- Pieces of the loop -----------------------------------------------------------------------

def training_input(config: TrainConfig, plan: TrainPlan,
                   strategy: tf.distribute.Strategy) -> tf.distribute.DistributedDataset:
    """``batch_size`` clean images per replica, in the micro-batches of one update each.

    The model's registered config decides the preprocessing and labels; a multi-worker job
    shards the data between its workers (``shard_policy``).
    """
    replicas = strategy.num_replicas_in_sync
    dataset, _, _, _ = dataset_factory.get_dataset(
        config.dataset, "train", plan.hparams.batch_size * replicas, config.dataset_image_size,
        is_training=True, data_dir=plan.data_dir, model_config=plan.model_config,
        augmentation=Augmentation.from_hparams(plan.hparams))
    dataset_factory.log_image_size(plan.model_config, config.dataset_image_size)
    dataset = group_micro_batches(dataset, plan.num_micro_batches, replicas)
    workers = distribution.num_workers(strategy)
    if workers > 1:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = shard_policy(
            config.dataset, plan.data_dir, workers)
        dataset = dataset.with_options(options)
    return strategy.experimental_distribute_dataset(dataset)


def prepare_output_dir(output_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Creates ``output_dir``, clears what a killed run left there; returns where to save.

    The chief saves into ``output_dir``; the other workers take part in every checkpoint
    (reading synchronised variables is collective) by writing it to a temporary directory of
    their own, deleted after each save.

    Raises:
      DataError: ``output_dir`` cannot be created.
    """
    chief = distribution.is_chief(strategy)
    save_dir = output_dir if chief else distribution.worker_temp_dir(output_dir, strategy)
    try:
        tf.io.gfile.makedirs(output_dir)
    except tf.errors.OpError as exc:
        raise DataError(f"--output_dir={output_dir}: cannot create it "
                        f"({tf_error_text.reason(exc)})") from None
    if chief:
        checkpoints.remove_stale_temporaries(output_dir)
    elif tf.io.gfile.exists(save_dir):
        tf.io.gfile.rmtree(save_dir)
    return save_dir


class StepLog:
    """The per-step log line: loss, seconds per step, examples per second and ETA.

    ``tests/test_fault_tolerance.py`` reads ``global_step N: total_loss = X`` from it. A loss
    that is NaN or infinite stops training here, before the step is summarised or saved.
    """

    def __init__(self, start_step: int, examples_per_update: int, max_steps: int):
        self.start_step, self.start_time = start_step, time.time()
        self.examples_per_update, self.max_steps = examples_per_update, max_steps

    def log(self, step: int, total_loss: float, step_seconds: float) -> None:
        """Logs one finished update.

        Raises:
          TrainingDivergedError: the loss is not finite.
        """
        if not math.isfinite(total_loss):
            raise TrainingDivergedError(
                f"loss is {total_loss} at global step {step}; lower the learning rate "
                "(--hparams=learning_rate=...) or check the data")
        done, elapsed = step - self.start_step, time.time() - self.start_time
        rate = done * self.examples_per_update / max(elapsed, 1e-9)
        eta = ""
        if self.max_steps > 0 and done > 0:
            eta = f", ETA {format_seconds((self.max_steps - step) * elapsed / done)}"
        logging.info("global_step %d: total_loss = %.4f (%.3f s/step, %.1f examples/s%s)",
                     step, total_loss, step_seconds, rate, eta)


class SummarySchedule:
    """When summaries are due: every ``secs`` seconds when set, else every ``steps`` steps.

    The first call is due; ``steps`` of 0 or None (without ``secs``) means never.
    """

    def __init__(self, steps: Optional[int], secs: Optional[int]):
        self.steps, self.secs = steps or 0, secs
        self.last_time: Optional[float] = None
        self.last_step: Optional[int] = None

    def due(self, step: int) -> bool:
        """Whether to write at ``step``; a due step restarts the count."""
        if self.secs:
            due = self.last_time is None or time.time() - self.last_time >= self.secs
        else:
            due = self.steps > 0 and (self.last_step is None
                                      or step - self.last_step >= self.steps)
        if due:
            self.last_time, self.last_step = time.time(), step
        return due


def write_summaries(writer: tf.summary.SummaryWriter, outputs: dict, step: int,
                    steps_per_epoch: float, num_images: int) -> None:
    """The original's TensorBoard scalars and images of one step (host-side writes)."""
    with writer.as_default():
        for name in SCALAR_OUTPUTS:
            if name in outputs:
                summaries.scalar(name, outputs[name], step)
        summaries.scalar("current_epoch", step / steps_per_epoch, step)
        for name in ("images", "adv_images"):
            if num_images and name in outputs:
                # As the original: tf.summary.image(name, x[:num_summary_images]) of
                # model-unit images, with TF1's default max_outputs of 3.
                summaries.image(name, outputs[name][:num_images], step)
    writer.flush()


def save_checkpoint(state: TrainState, save_dir: str, step: int, max_to_keep: int) -> str:
    """Writes the training state at ``step``; a non-chief worker then deletes its copy."""
    path = checkpoints.save(state.checkpoint_variables(), save_dir, step, max_to_keep)
    if not distribution.is_chief(state.strategy):
        tf.io.gfile.rmtree(save_dir)
    return path


def lost_worker(exc: tf.errors.OpError, step: int,
                last_saved_step: Optional[int]) -> distribution.ClusterError:
    """The error a multi-worker job stops with when a peer died or stopped answering."""
    return distribution.ClusterError(
        f"lost contact with another worker at global step {step} "
        f"({tf_error_text.reason(exc)}); restart every worker with the same command "
        f"to resume from the last checkpoint (global step {last_saved_step})")


# ---- The training loop ------------------------------------------------------------------------

def train(config: TrainConfig,
          strategy: Optional[tf.distribute.Strategy] = None) -> TrainResult:
    """Trains ``config.model_name`` on ``config.dataset`` until ``config.max_steps``.

    Resumes from the latest checkpoint of ``config.output_dir`` when there is one; otherwise
    initialises from ``config.finetune_checkpoint_path`` when given.

    Args:
      config: the flags of train.py.
      strategy: where to train (``distribution.create_strategy``); None: the current one
        (the default strategy unless called under ``strategy.scope()``).

    Raises:
      ConfigError, DataError, CheckpointError: bad flags, data or checkpoints.
      TrainingDivergedError: the loss became NaN or infinite.
      ClusterError: another worker of a multi-worker job died or stopped answering.
    """
    # ---- Checks: every flag and hparam, before any model or data ------------------------------
    strategy = strategy or tf.distribute.get_strategy()
    plan = validate(config, strategy)
    hparams, chief = plan.hparams, distribution.is_chief(strategy)
    log_plan(config, plan, strategy)

    # ---- Model, step, schedule, optimizer, moving averages (fresh) ---------------------------
    state = build_train_state(
        strategy, config.model_name, plan.num_classes, hparams, plan.examples_per_epoch,
        lr_replicas=plan.lr_replicas, moving_average_decay=config.moving_average_decay,
        trainable_scopes=config.finetune_trainable_scopes,
        sync_batch_norm=config.sync_batch_norm, compute_dtype=config.compute_dtype,
        seed=config.seed, ensemble_sources=plan.ensemble_sources)

    # ---- Data, output directory, restore (resume, or fine-tune from another run) -------------
    dataset = training_input(config, plan, strategy)
    save_dir = prepare_output_dir(config.output_dir, strategy)
    resume_from = restore_or_finetune(state, config, plan)
    step = int(state.global_step.numpy())
    distribution.check_same_on_all_workers(strategy, step, "global step to resume from")

    # ---- The compiled training step ----------------------------------------------------------
    num_images = max(0, config.num_summary_images)
    train_step = make_train_step(
        strategy, state.model, state.trainable, state.optimizer, state.ema, state.global_step,
        hparams, plan.num_classes, dataset_factory.BOUNDS, seed=config.seed,
        num_summary_images=num_images, jit_compile=config.jit_compile,
        loss_scale=state.loss_scale, num_micro_batches=plan.num_micro_batches,
        static_sources=state.static_sources)

    # ---- The loop ----------------------------------------------------------------------------
    writer = (tf.summary.create_file_writer(config.output_dir) if chief
              else tf.summary.create_noop_writer())
    keep = config.max_checkpoints_to_keep
    last_checkpoint = resume_from or save_checkpoint(state, save_dir, step, keep)
    last_saved_step = step
    step_log = StepLog(step, hparams.batch_size * plan.lr_replicas, config.max_steps)
    summary_schedule = SummarySchedule(config.save_summaries_steps, config.save_summaries_secs)
    batches, outputs = iter(dataset), {}
    try:
        while config.max_steps < 0 or step < config.max_steps:
            # -- step
            images, labels = dataset_factory.next_batch(
                batches, config.dataset, "train", plan.data_dir, plan.model_config)
            tick = time.time()
            outputs = train_step(images, labels)
            step = int(state.global_step.numpy())
            # -- log (stops on a NaN or infinite loss)
            step_log.log(step, float(outputs["total_loss"]), time.time() - tick)
            llr_regularizer.log_gamma(step, outputs, hparams)
            # -- summaries (host-side writes of values every worker already has)
            if summary_schedule.due(step) and chief:
                write_summaries(writer, outputs, step, state.steps_per_epoch, num_images)
            # -- checkpoint (every worker: reading synchronised variables is collective)
            if config.save_model_steps > 0 and step % config.save_model_steps == 0:
                last_checkpoint = save_checkpoint(state, save_dir, step, keep)
                last_saved_step = step
        if last_saved_step != step:
            last_checkpoint, last_saved_step = save_checkpoint(state, save_dir, step, keep), step
    except _CLUSTER_ERRORS as exc:
        if distribution.num_workers(strategy) < 2:
            raise
        raise lost_worker(exc, step, last_saved_step) from None
    finally:
        writer.close()
    if not chief:
        last_checkpoint = checkpoints.latest_checkpoint(config.output_dir)
    logging.info("Training finished at global step %d; checkpoint %s", step, last_checkpoint)
    return TrainResult(step, last_checkpoint,
                       {k: float(v) for k, v in outputs.items() if getattr(v, "shape", None) == ()})
