"""The training loop behind ``train.py``: mixed clean + adversarial minibatches and ALP.

``train(config)`` reads top to bottom: data, model, optimizer and averages, restore (resume or
fine-tune), the compiled training step, then the loop with its marked sections (step, log,
summaries, checkpoint). The step follows the original ``train.py``:

* clean: logits of the batch in training mode;
* adversarial: attack the batch with the model in inference mode (no gradient flows back
  through the attack), then run ``[clean; adversarial]`` as ONE batch of 2B in training mode,
  so batch norm sees the statistics of the mixed batch, with the labels duplicated;
* loss = label-smoothed softmax cross-entropy (mean over the batch)
  + ``train_lp_weight * mean((logits_clean - logits_adv)**2)`` when ``train_lp_weight > 0``
  + ``weight_decay * sum(l2_loss(v))`` over the trainable variables;
* the optimizer step increments ``global_step``; then the TF1-style moving average of all model
  variables (weights and batch-norm statistics) is updated with ``num_updates = global_step``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import adversarial_attack, checkpoints, model_lib, summaries
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import ConfigError, DataError, TrainingDivergedError
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


def smoothed_cross_entropy(one_hot: tf.Tensor, logits: tf.Tensor, label_smoothing: float) -> tf.Tensor:
    """``tf.compat.v1.losses.softmax_cross_entropy`` with label smoothing: batch mean."""
    if label_smoothing > 0:
        num_classes = tf.cast(tf.shape(one_hot)[-1], one_hot.dtype)
        one_hot = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits))


def alp_losses(
    logits: tf.Tensor,
    one_hot: tf.Tensor,
    trainable: list,
    hparams: model_lib.HParams,
    paired: bool,
) -> dict:
    """The loss terms of the original ``train.py`` and their sum, ``total_loss``.

    Args:
      logits: [B or 2B, K] logits of the training-mode forward pass; when ``paired``, the first
        half is the clean batch and the second half its adversarial copy.
      one_hot: [same, K] one-hot labels (duplicated for the adversarial half).
      trainable: variables subject to weight decay.
      hparams: reads label_smoothing, train_lp_weight, weight_decay.
      paired: whether logit pairing applies (adversarial training with lp weight > 0).
    """
    logits = tf.cast(logits, tf.float32)
    losses = {"loss_xent": smoothed_cross_entropy(one_hot, logits, hparams.label_smoothing)}
    total = losses["loss_xent"]
    if paired and hparams.train_lp_weight > 0:
        clean, adv = tf.split(logits, 2)
        losses["loss_lp"] = hparams.train_lp_weight * tf.reduce_mean(tf.square(clean - adv))
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


def train(config: TrainConfig) -> TrainResult:
    """Trains ``config.model_name`` on ``config.dataset`` until ``config.max_steps``.

    Resumes from the latest checkpoint of ``config.output_dir`` when there is one; otherwise
    initialises from ``config.finetune_checkpoint_path`` when given.

    Raises:
      ConfigError, DataError, CheckpointError: bad flags, data or checkpoints.
      TrainingDivergedError: the loss became NaN or infinite.
    """
    if not config.output_dir:
        raise ConfigError("--output_dir has to be provided")
    hparams = model_lib.default_hparams().parse(config.hparams)
    attack = adversarial_attack.parse_attack_description(hparams.train_adv_method)
    logging.info("User provided hparams: %s", config.hparams)
    logging.info("All hyper parameters: %s", hparams)
    tf.io.gfile.makedirs(config.output_dir)
    strategy = tf.distribute.get_strategy()

    # ---- Data -------------------------------------------------------------------------------
    data_dir = data_dir_for(config.dataset, config.imagenet_data_dir, config.tiny_imagenet_data_dir)
    dataset, examples_per_epoch, num_classes, bounds = dataset_factory.get_dataset(
        config.dataset, "train", hparams.batch_size, config.dataset_image_size,
        is_training=True, data_dir=data_dir,
    )

    # ---- Model, optimizer, moving averages ---------------------------------------------------
    with strategy.scope():
        model = model_lib.get_model(config.model_name, num_classes, seed=config.seed)
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
            hparams, examples_per_epoch, config.replicas_to_aggregate
        )
        optimizer = model_lib.get_optimizer(hparams, learning_rate)
        optimizer.build(trainable)

    # ---- Restore: resume, or fine-tune from another run's checkpoint -------------------------
    use_ema = bool(config.moving_average_decay) and config.moving_average_decay > 0
    resume_from = checkpoints.latest_checkpoint(config.output_dir)
    if resume_from is None and config.finetune_checkpoint_path:
        source = checkpoints.resolve_checkpoint(
            config.finetune_checkpoint_path, "--finetune_checkpoint_path"
        )
        logging.info("Fine-tuning from %s", source)
        checkpoints.restore(
            finetune_assignments(model, source, config.finetune_exclude_pretrained_scopes,
                                 trainable_names, use_ema),
            source,
            what=f"{config.model_name} ({num_classes} classes) for fine-tuning",
        )
    with strategy.scope():
        # Shadows start from the (possibly fine-tuned) current values.
        ema = (ExponentialMovingAverage(config.moving_average_decay, model.variables_by_name)
               if use_ema else None)
    saved = checkpoint_variables(model, global_step, optimizer, ema)
    if resume_from is not None:
        logging.info("Resuming from %s", resume_from)
        checkpoints.restore(saved, resume_from, what="training state")

    # ---- The compiled training step ----------------------------------------------------------
    num_images = max(0, config.num_summary_images)

    def step_fn(images, labels):
        one_hot = tf.one_hot(labels, num_classes)
        adv_images = None
        if attack.is_clean:
            inputs = images
        else:
            seed = tf.stack([tf.constant(config.seed, tf.int64), global_step])
            adv_images = adversarial_attack.generate_adversarial_examples(
                images, bounds, lambda x: model(x, is_training=False),
                hparams.train_adv_method, seed=seed,
            )
            inputs = tf.concat([images, adv_images], axis=0)
            one_hot = tf.concat([one_hot, one_hot], axis=0)
        with tf.GradientTape() as tape:
            logits = model(inputs, is_training=True)
            losses = alp_losses(logits, one_hot, trainable, hparams,
                                paired=not attack.is_clean)
        grads = tape.gradient(losses["total_loss"], trainable)
        losses["learning_rate"] = tf.cast(learning_rate(global_step), tf.float32)
        optimizer.apply_gradients(list(zip(grads, trainable)), global_step)
        if ema is not None:
            ema.apply(global_step)
        outputs = dict(losses)
        outputs["images"] = images[:num_images]
        if adv_images is not None:
            outputs["adv_images"] = adv_images[:num_images]
        return outputs

    @tf.function
    def train_step(images, labels):
        return strategy.run(step_fn, args=(images, labels))

    # ---- The loop ----------------------------------------------------------------------------
    writer = tf.summary.create_file_writer(config.output_dir)
    step = int(global_step.numpy())
    last_checkpoint = resume_from
    if resume_from is None:
        last_checkpoint = checkpoints.save(saved, config.output_dir, step,
                                           config.max_checkpoints_to_keep)
    iterator = iter(dataset)
    last_summary_time = None
    last_summary_step = None
    start_step, start_time = step, time.time()
    outputs: dict = {}
    while config.max_steps < 0 or step < config.max_steps:
        # -- step
        try:
            images, labels = next(iterator)
        except tf.errors.InvalidArgumentError as exc:
            where = dataset_factory.locate_bad_record(config.dataset, "train", data_dir)
            raise DataError(
                f"bad training record: {where or 'unknown record'} ({exc.message.splitlines()[0]})"
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
        rate = (step - start_step) * hparams.batch_size / max(elapsed, 1e-9)
        eta = ""
        if config.max_steps > 0 and step > start_step:
            remaining = (config.max_steps - step) * elapsed / (step - start_step)
            eta = f", ETA {remaining:.0f}s"
        logging.info(
            "global_step %d: total_loss = %.4f (%.3f s/step, %.1f examples/s%s)",
            step, total_loss, time.time() - tick, rate, eta,
        )

        # -- summaries
        if config.save_summaries_secs:
            due = last_summary_time is None or (
                time.time() - last_summary_time >= config.save_summaries_secs)
        else:
            every = config.save_summaries_steps or 0
            due = every > 0 and (last_summary_step is None or step - last_summary_step >= every)
        if due:
            with writer.as_default():
                for name in ("loss_xent", "loss_lp", "loss_wd", "total_loss", "learning_rate"):
                    if name in outputs:
                        summaries.scalar(name, outputs[name], step)
                summaries.scalar("current_epoch", step / steps_per_epoch, step)
                for name in ("images", "adv_images"):
                    if num_images and name in outputs:
                        shown = (outputs[name] - bounds[0]) / (bounds[1] - bounds[0])
                        summaries.image(name, shown, step, max_outputs=num_images)
            writer.flush()
            last_summary_time, last_summary_step = time.time(), step

        # -- checkpoint
        if config.save_model_steps > 0 and step % config.save_model_steps == 0:
            last_checkpoint = checkpoints.save(saved, config.output_dir, step,
                                               config.max_checkpoints_to_keep)

    if last_checkpoint is None or checkpoints.checkpoint_step(last_checkpoint) != step:
        last_checkpoint = checkpoints.save(saved, config.output_dir, step,
                                           config.max_checkpoints_to_keep)
    writer.close()
    logging.info("Training finished at global step %d; checkpoint %s", step, last_checkpoint)
    return TrainResult(step, last_checkpoint,
                       {k: float(v) for k, v in outputs.items() if getattr(v, "shape", None) == ()})
