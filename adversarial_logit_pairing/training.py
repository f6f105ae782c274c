"""The training loop behind ``train.py``: mixed clean + adversarial minibatches and ALP.

``train(config)`` reads top to bottom: data, model, optimizer and averages, restore (resume or
fine-tune), the compiled training step, then the loop with its marked sections (step, log,
summaries, checkpoint). The step follows the original ``train.py``:

* clean: logits of the batch in training mode;
* adversarial: attack the batch with the model in inference mode (no gradient flows back
  through the attack), then run ``[clean; adversarial]`` as ONE batch of 2B in training mode,
  so batch norm sees the statistics of the mixed batch, with the labels duplicated;
* loss = label-smoothed softmax cross-entropy (mean over the batch)
  + ``train_lp_weight * mean((first_half - second_half)**2)`` of the logits when
  ``train_lp_weight > 0``: ``[clean; adversarial]`` halves with an attack (ALP), the two
  halves of the clean batch without one (clean logit pairing), as the original;
  + ``weight_decay * sum(l2_loss(v))`` over the trainable variables;
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
from typing import Callable, Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import (
    adversarial_attack,
    checkpoints,
    distribution,
    model_lib,
    precision,
    summaries,
    tf_error_text,
)
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import ConfigError, DataError, TrainingDivergedError
from adversarial_logit_pairing.models import get_model_config
from adversarial_logit_pairing.moving_average import ExponentialMovingAverage


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


@dataclasses.dataclass
class TrainResult:
    """What a finished ``train`` call leaves behind."""

    global_step: int
    checkpoint_path: Optional[str]
    last_losses: dict


def data_dir_for(dataset: str, imagenet_data_dir: Optional[str],
                 tiny_imagenet_data_dir: Optional[str]) -> Optional[str]:
    """The data directory flag that belongs to ``dataset``."""
    return tiny_imagenet_data_dir if dataset == "tiny_imagenet" else imagenet_data_dir


def smoothed_cross_entropy(one_hot: tf.Tensor, logits: tf.Tensor,
                           label_smoothing: float) -> tf.Tensor:
    """``tf.compat.v1.losses.softmax_cross_entropy`` with label smoothing: batch mean."""
    if label_smoothing > 0:
        num_classes = tf.cast(tf.shape(one_hot)[-1], one_hot.dtype)
        one_hot = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits))


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
) -> dict:
    """The loss terms of the original ``train.py`` and their sum, ``total_loss``.

    Args:
      logits: [N, K] logits of the training-mode forward pass: ``[clean; adversarial]`` in
        adversarial training, the clean batch in clean training.
      one_hot: [N, K] one-hot labels (duplicated for the adversarial half).
      trainable: variables subject to weight decay.
      hparams: reads label_smoothing, train_lp_weight, weight_decay.

    Whenever ``train_lp_weight > 0`` the first half of ``logits`` is paired with the second,
    as the original did whatever the attack: with an attack that is adversarial logit
    pairing, with ``train_adv_method=clean`` it is the paper's clean logit pairing (the two
    halves of the clean batch; N must be even, see ``check_logit_pairing``).
    """
    logits = tf.cast(logits, tf.float32)
    losses = {"loss_xent": smoothed_cross_entropy(one_hot, logits, hparams.label_smoothing)}
    total = losses["loss_xent"]
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


def checkpoint_variables(model, global_step, optimizer, ema) -> dict:
    """Every variable a training checkpoint holds, by TF1 name."""
    variables = dict(model.variables_by_name)
    variables["global_step"] = global_step
    variables.update(optimizer.variables_by_name())
    if ema is not None:
        variables.update(ema.variables_by_name())
    return variables


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


SCALAR_OUTPUTS = ("loss_xent", "loss_lp", "loss_wd", "total_loss", "learning_rate")

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

    Returns:
      A ``tf.function``; its outputs hold the loss terms and ``learning_rate`` averaged over
      the replicas (float32 scalars) and, when ``num_summary_images > 0``, the first
      ``images``/``adv_images`` of this process's first replica (its first micro-batch).

    With a ``loss_scale`` (float16 compute), the loss is scaled before differentiation and
    the gradients unscaled after; a step whose gradients overflow is skipped (the global step
    still counts it) and the scale shrinks.
    """
    attack = adversarial_attack.parse_attack_description(hparams.train_adv_method)
    learning_rate = optimizer.learning_rate
    names: list[str] = []  # the scalars step_fn stacks, known once it is traced

    def forward_backward(images, labels, micro_batch=None):
        one_hot = tf.one_hot(labels, num_classes)
        adv_images = None
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
            adv_images = adversarial_attack.generate_adversarial_examples(
                images, bounds, model.inference, hparams.train_adv_method, seed=step_seed,
            )
            inputs = tf.concat([images, adv_images], axis=0)
            one_hot = tf.concat([one_hot, one_hot], axis=0)
        with tf.GradientTape() as tape:
            logits = model(inputs, is_training=True)
            losses = alp_losses(logits, one_hot, trainable, hparams)
            objective = losses["total_loss"]
            if loss_scale is not None:
                objective = loss_scale.scale(objective)
        grads = tape.gradient(objective, trainable)
        if loss_scale is not None:
            grads = loss_scale.unscale(grads)
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
        shown_init = tf.zeros_like(images[0, :num_summary_images])

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
    if not config.output_dir:
        raise ConfigError("--output_dir has to be provided")
    hparams = model_lib.default_hparams().parse(config.hparams)
    check_logit_pairing(hparams)
    logging.info("User provided hparams: %s", config.hparams)
    logging.info("All hyper parameters: %s", hparams)
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if (config.jit_compile and config.sync_batch_norm and replicas > 1
            and not isinstance(strategy, tf.distribute.TPUStrategy)):
        raise ConfigError("--jit_compile with --sync_batch_norm needs --strategy=tpu: on other "
                          "devices XLA compiles each replica alone, and synchronised batch norm "
                          "talks to the others in the middle of the step")
    lr_replicas = learning_rate_replicas(replicas, config.replicas_to_aggregate)
    num_micro_batches = lr_replicas // replicas
    chief = distribution.is_chief(strategy)
    # Non-chief workers write their share of each checkpoint here and delete it.
    save_dir = config.output_dir if chief else distribution.worker_temp_dir(
        config.output_dir, strategy)
    try:
        tf.io.gfile.makedirs(config.output_dir)
    except tf.errors.OpError as exc:
        raise DataError(f"--output_dir={config.output_dir}: cannot create it "
                        f"({tf_error_text.reason(exc)})") from None
    if chief:
        checkpoints.remove_stale_temporaries(config.output_dir)
    elif tf.io.gfile.exists(save_dir):
        tf.io.gfile.rmtree(save_dir)
    if lr_replicas > 1:
        logging.info("%d replicas in sync x %d micro-batches per update: %d examples per "
                     "update, learning rate x%d", replicas, num_micro_batches,
                     hparams.batch_size * lr_replicas, lr_replicas)

    # ---- Data: batch_size clean images per replica --------------------------------------------
    # The model's registered config decides the preprocessing, labels and class count.
    model_config = get_model_config(config.model_name)
    data_dir = data_dir_for(config.dataset, config.imagenet_data_dir, config.tiny_imagenet_data_dir)
    dataset, examples_per_epoch, num_classes, bounds = dataset_factory.get_dataset(
        config.dataset, "train", hparams.batch_size * replicas, config.dataset_image_size,
        is_training=True, data_dir=data_dir, model_config=model_config,
    )
    dataset_factory.log_image_size(model_config, config.dataset_image_size)
    dataset = group_micro_batches(dataset, num_micro_batches, replicas)
    workers = distribution.num_workers(strategy)
    if workers > 1:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = shard_policy(
            config.dataset, data_dir, workers)
        dataset = dataset.with_options(options)
    dataset = strategy.experimental_distribute_dataset(dataset)

    # ---- Model, optimizer, moving averages ---------------------------------------------------
    with strategy.scope():
        model = model_lib.get_model(config.model_name, num_classes, seed=config.seed,
                                    compute_dtype=config.compute_dtype)
        if config.sync_batch_norm:
            distribution.use_cross_replica_batch_norm(model)
        trainable = model_lib.filter_trainable_variables(
            config.finetune_trainable_scopes, model.trainable_variables
        )
        if not trainable:
            raise ConfigError(
                f"--finetune_trainable_scopes={config.finetune_trainable_scopes}: matches no "
                f"variable of {config.model_name} (its variables start with '{model.scope}/')"
            )
        trainable_names = {model_lib.variable_name(v) for v in trainable}
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        learning_rate, steps_per_epoch = model_lib.get_lr_schedule(
            hparams, examples_per_epoch, lr_replicas
        )
        optimizer = model_lib.get_optimizer(hparams, learning_rate)
        optimizer.build(trainable)
        loss_scale = None
        if precision.needs_loss_scaling(config.compute_dtype):
            if strategy.num_replicas_in_sync > 1:
                raise ConfigError(
                    "--compute_dtype=float16 (loss scaling) runs on one device only for now; "
                    "use bfloat16 with several replicas")
            loss_scale = precision.LossScale()

    # ---- Restore: resume, or fine-tune from another run's checkpoint -------------------------
    use_ema = bool(config.moving_average_decay) and config.moving_average_decay > 0
    resume_from = checkpoints.latest_checkpoint(config.output_dir)
    if resume_from is None and config.finetune_checkpoint_path:
        source = checkpoints.resolve_checkpoint(
            config.finetune_checkpoint_path, "--finetune_checkpoint_path"
        )
        logging.info("Fine-tuning from %s", source)
        assignments = finetune_assignments(
            model, source, config.finetune_exclude_pretrained_scopes, trainable_names, use_ema)
        # The released ALP checkpoints were saved without shadows: read their plain values.
        assignments = checkpoints.plain_names_without_shadows(assignments, source)
        checkpoints.restore(assignments, source,
                            what=f"{config.model_name} ({num_classes} classes) for fine-tuning",
                            classifier_scopes=model_config.classifier_scopes)
    with strategy.scope():
        # Shadows start from the (possibly fine-tuned) current values.
        ema = (ExponentialMovingAverage(config.moving_average_decay, model.variables_by_name)
               if use_ema else None)
    saved = checkpoint_variables(model, global_step, optimizer, ema)
    if loss_scale is not None:
        saved["loss_scale/current"] = loss_scale.current
        saved["loss_scale/good_steps"] = loss_scale.good_steps
    if resume_from is not None:
        logging.info("Resuming from %s", resume_from)
        checkpoints.restore(saved, resume_from, what="training state")
    step = int(global_step.numpy())
    distribution.check_same_on_all_workers(strategy, step, "global step to resume from")

    # ---- The compiled training step ----------------------------------------------------------
    num_images = max(0, config.num_summary_images)
    train_step = make_train_step(
        strategy, model, trainable, optimizer, ema, global_step, hparams, num_classes, bounds,
        seed=config.seed, num_summary_images=num_images, jit_compile=config.jit_compile,
        loss_scale=loss_scale, num_micro_batches=num_micro_batches,
    )

    def save_checkpoint() -> str:
        path = checkpoints.save(saved, save_dir, step, config.max_checkpoints_to_keep)
        if not chief:
            tf.io.gfile.rmtree(save_dir)
        return path

    # ---- The loop ----------------------------------------------------------------------------
    writer = (tf.summary.create_file_writer(config.output_dir) if chief
              else tf.summary.create_noop_writer())
    last_checkpoint = resume_from if chief else None
    last_saved_step = step if resume_from is not None else None
    if resume_from is None:
        last_checkpoint, last_saved_step = save_checkpoint(), step
    iterator = iter(dataset)
    last_summary_time = None
    last_summary_step = None
    start_step, start_time = step, time.time()
    outputs: dict = {}
    try:
        while config.max_steps < 0 or step < config.max_steps:
            # -- step
            try:
                images, labels = next(iterator)
            except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as exc:
                # A corrupt image or a truncated file: name it (slow scan, only on failure).
                where = dataset_factory.locate_bad_record(config.dataset, "train", data_dir,
                                                          model_config)
                raise DataError(
                    f"bad training record: {where or 'unknown record'} "
                    f"({tf_error_text.reason(exc)})"
                ) from None
            tick = time.time()
            outputs = train_step(images, labels)
            total_loss = float(outputs["total_loss"])
            step = int(global_step.numpy())

            # -- log
            if not math.isfinite(total_loss):
                raise TrainingDivergedError(
                    f"loss is {total_loss} at global step {step}; lower the learning rate "
                    "(--hparams=learning_rate=...) or check the data"
                )
            elapsed = time.time() - start_time
            # An update consumes batch_size x lr_replicas examples (replicas x micro-batches).
            rate = (step - start_step) * hparams.batch_size * lr_replicas / max(elapsed, 1e-9)
            eta = ""
            if config.max_steps > 0 and step > start_step:
                remaining = (config.max_steps - step) * elapsed / (step - start_step)
                eta = f", ETA {remaining:.0f}s"
            logging.info(
                "global_step %d: total_loss = %.4f (%.3f s/step, %.1f examples/s%s)",
                step, total_loss, time.time() - tick, rate, eta,
            )

            # -- summaries (host-side writes of values every worker already has)
            if config.save_summaries_secs:
                due = last_summary_time is None or (
                    time.time() - last_summary_time >= config.save_summaries_secs)
            else:
                every = config.save_summaries_steps or 0
                due = every > 0 and (last_summary_step is None
                                     or step - last_summary_step >= every)
            if due and chief:
                with writer.as_default():
                    for name in SCALAR_OUTPUTS:
                        if name in outputs:
                            summaries.scalar(name, outputs[name], step)
                    summaries.scalar("current_epoch", step / steps_per_epoch, step)
                    for name in ("images", "adv_images"):
                        if num_images and name in outputs:
                            # As the original: tf.summary.image(name, x[:num_summary_images])
                            # of model-unit images, with TF1's default max_outputs of 3.
                            summaries.image(name, outputs[name][:num_images], step)
                writer.flush()
            if due:
                last_summary_time, last_summary_step = time.time(), step

            # -- checkpoint (every worker: reading synchronised variables is collective)
            if config.save_model_steps > 0 and step % config.save_model_steps == 0:
                last_checkpoint, last_saved_step = save_checkpoint(), step

        if last_saved_step != step:
            last_checkpoint, last_saved_step = save_checkpoint(), step
    except _CLUSTER_ERRORS as exc:
        if distribution.num_workers(strategy) < 2:
            raise
        raise distribution.ClusterError(
            f"lost contact with another worker at global step {step} "
            f"({tf_error_text.reason(exc)}); restart every worker with the same command "
            f"to resume from the last checkpoint (global step {last_saved_step})"
        ) from None
    finally:
        writer.close()
    if not chief:
        last_checkpoint = checkpoints.latest_checkpoint(config.output_dir)
    logging.info("Training finished at global step %d; checkpoint %s", step, last_checkpoint)
    return TrainResult(step, last_checkpoint,
                       {k: float(v) for k, v in outputs.items() if getattr(v, "shape", None) == ()})
