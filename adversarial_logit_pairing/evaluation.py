"""The evaluation loop behind ``eval.py``: clean and adversarial accuracy of checkpoints.

Two modes, as the original:

* ``--checkpoint_path``: evaluate one checkpoint once; ``--output_file`` gets the line
  ``eval_name,accuracy,top5`` (fractions with 3 decimals) appended.
* ``--train_dir``: continuous evaluation; every checkpoint the directory lists is evaluated
  exactly once, oldest first, with ``Eval/Accuracy`` and ``Eval/Top5`` summaries written under
  ``train_dir/eval_name`` at the checkpoint's global step; ``--eval_once`` evaluates the newest
  one and stops. ``--output_file`` gets a line per evaluated checkpoint here too (the original
  used it only in single mode). The original jumped to the newest checkpoint and skipped the
  ones written meanwhile; here a checkpoint is skipped only when training deletes it (beyond
  its ``max_to_keep``) before or while it is evaluated, so evaluation lags training by at
  most that many checkpoints and a deleted checkpoint never stops it.

The original counts ``int(num_examples / eval_batch_size)`` full batches; a split that ends
sooner stops the evaluation cleanly and the log gives the count actually evaluated.
Adversarial evaluation uses a fixed seed per batch, so the same checkpoint gives the same
numbers on every run (with the same number of replicas).

Under a strategy (``--strategy=mirrored`` or ``tpu``), ``eval_batch_size`` stays the global
batch, so the same examples are counted as on one device; each replica gets its share.

Progress is one absl log line every 10 batches (``progress.ProgressLog``), not
``tf.keras.utils.Progbar``: Keras 3.15's Progbar redraws with carriage returns, backspaces and
ANSI colours on stdout even when stdout is a file (measured: 5 updates wrote one 898-byte line
of them), outside the timestamped absl log.
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from adversarial_logit_pairing import (
    adversarial_attack,
    atomic_files,
    checkpoints,
    distribution,
    model_lib,
    moving_average,
    summaries,
    tf_error_text,
)
from adversarial_logit_pairing.checkpoints import EMA_SUFFIX
from adversarial_logit_pairing.datasets import dataset_factory, dataset_facts
from adversarial_logit_pairing.errors import CheckpointError, ConfigError, DataError
from adversarial_logit_pairing.models import ModelConfig, get_model_config
from adversarial_logit_pairing.progress import ProgressLog


@dataclasses.dataclass
class EvalConfig:
    """Plain-data mirror of ``eval.py``'s flags (same names, same defaults)."""

    train_dir: Optional[str] = None
    checkpoint_path: Optional[str] = None
    output_file: Optional[str] = None
    eval_name: str = "default"
    model_name: str = "resnet_v2_50"
    adv_method: str = "clean"
    dataset: str = "imagenet"
    dataset_image_size: int = 64
    hparams: str = ""
    split_name: str = "validation"
    moving_average_decay: float = 0.9999
    eval_interval_secs: int = 120
    num_examples: int = -1
    eval_once: bool = False
    trainable_scopes: Optional[str] = None
    imagenet_data_dir: Optional[str] = None
    tiny_imagenet_data_dir: Optional[str] = None
    timeout_secs: Optional[float] = None
    predictions_file: Optional[str] = None
    compute_dtype: str = "float32"


@dataclasses.dataclass
class EvalResult:
    """Metrics of one checkpoint."""

    checkpoint_path: str
    global_step: Optional[int]
    accuracy: float
    top5: float
    num_examples: int


def restore_assignments(model, moving_average_decay: float, trainable_scopes=None) -> dict:
    """Checkpoint name -> model variable for evaluation, as the original ``eval.py``.

    With ``moving_average_decay > 0`` EVERY model variable, batch-norm moving statistics
    included, is read from its ``/ExponentialMovingAverage`` shadow (the original gave
    ``variables_to_restore`` the model variables explicitly); otherwise every variable from its
    plain name. ``trainable_scopes`` is accepted for the original's command lines: there it
    only re-filtered the trainable collection, which changed nothing in this restore, and so
    it changes nothing here either.
    """
    del trainable_scopes  # kept for the original's flag; see the docstring
    suffix = EMA_SUFFIX if moving_average.enabled(moving_average_decay) else ""
    return {name + suffix: variable for name, variable in model.variables_by_name.items()}


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What the flags decide, known before any file is opened or model built (``validate``).

    Attributes:
      batch_size: the global evaluation batch (``eval_batch_size``), shared by the replicas.
      num_examples: ``--num_examples``, at most the split's size (-1: the whole split).
      num_batches: ``int(num_examples / batch_size)`` full batches, as the original.
      model_config: the registered config of ``--model_name``.
      num_classes: logits of the model on ``--dataset``.
      data_dir: the directory flag that belongs to ``--dataset``.
    """

    batch_size: int
    num_examples: int
    num_batches: int
    model_config: ModelConfig
    num_classes: int
    data_dir: Optional[str]


def refuse_multi_worker(multi_worker: bool) -> None:
    """Evaluation runs as one process; eval.py checks its flag before a cluster would start."""
    if multi_worker:
        raise ConfigError("--strategy=multi_worker is for training; run eval.py as one process "
                          "(--strategy=default or mirrored) beside the cluster, on the chief's "
                          "--output_dir")


def validate(config: EvalConfig,
             strategy: Optional[tf.distribute.Strategy] = None) -> EvalPlan:
    """Checks every flag and its fit with the strategy; opens no file.

    Raises:
      ConfigError: bad hparams, attack, split, model or data set; a multi-worker strategy;
        ``eval_batch_size`` not a multiple of the replicas; fewer examples than one batch.
    """
    hparams = model_lib.default_hparams().parse(config.hparams)
    adversarial_attack.parse_attack_description(config.adv_method or "clean")
    if config.split_name not in ("train", "validation"):
        raise ConfigError(f"--split_name={config.split_name}: expected 'train' or 'validation'")
    strategy = strategy or tf.distribute.get_strategy()
    refuse_multi_worker(distribution.num_workers(strategy) > 1)
    batch_size, replicas = hparams.eval_batch_size, strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(f"eval_batch_size={batch_size} must be a multiple of the "
                          f"{replicas} replicas (it is the global evaluation batch)")
    model_config = get_model_config(config.model_name)
    num_classes = dataset_factory.num_classes(config.dataset, model_config)
    num_examples = dataset_factory.examples_per_epoch(config.dataset, config.split_name)
    if config.num_examples > 0:
        num_examples = min(num_examples, config.num_examples)
    num_batches = int(num_examples / batch_size)
    if num_batches < 1:
        raise ConfigError(f"--num_examples={num_examples} is smaller than one batch "
                          f"(eval_batch_size={batch_size}); nothing to evaluate")
    return EvalPlan(batch_size, num_examples, num_batches, model_config, num_classes,
                    dataset_facts.data_dir(config.dataset, config))


def make_eval_step(strategy: tf.distribute.Strategy, model, adv_method: str,
                   bounds: tuple[float, float], num_classes: int) -> Callable:
    """The compiled step: ``eval_step(images, labels, batch_index) -> (correct, top5, logits)``.

    Each replica attacks its share of the batch (model in inference mode, seeded by the batch
    index and replica, so a checkpoint gives the same numbers on every run) and counts its
    top-1 and top-5 hits; the counts are summed over the replicas, the logits concatenated in
    replica order (the global batch's order).
    """

    def replica_step(images, labels, batch_index):
        seed = distribution.replica_seed(tf.stack([tf.constant(0, tf.int64), batch_index]))
        # One cast of each weight (reduced precision) for the attack and the scoring pass.
        with model.cast_weights():
            inputs = adversarial_attack.generate_adversarial_examples(
                images, bounds, model.inference, adv_method, seed=seed)
            logits = model(inputs, is_training=False)
        labels = tf.cast(labels, tf.int64)
        correct = tf.equal(tf.argmax(logits, axis=-1), labels)
        in_top5 = tf.math.in_top_k(labels, tf.cast(logits, tf.float32), k=min(5, num_classes))
        counts = tf.stack([tf.reduce_sum(tf.cast(correct, tf.int64)),
                           tf.reduce_sum(tf.cast(in_top5, tf.int64))])
        return counts, logits

    @tf.function
    def eval_step(images, labels, batch_index):
        counts, logits = strategy.run(replica_step, args=(images, labels, batch_index))
        counts = strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None)
        # Replica i holds the i-th slice of the global batch.
        logits = tf.concat(strategy.experimental_local_results(logits), axis=0)
        return counts[0], counts[1], logits

    return eval_step


class Evaluator:
    """Holds the model, data and compiled eval step; evaluates checkpoints one at a time."""

    def __init__(self, config: EvalConfig, strategy: Optional[tf.distribute.Strategy] = None):
        # ---- Checks: every flag, before any model or data
        self.config = config
        self.strategy = strategy = strategy or tf.distribute.get_strategy()
        plan = validate(config, strategy)
        self.batch_size, self.num_examples = plan.batch_size, plan.num_examples
        self.num_batches, self.model_config = plan.num_batches, plan.model_config
        self.data_dir = plan.data_dir
        # ---- Data: the model's registered config decides the preprocessing and labels
        self.dataset, _, _, self.bounds = dataset_factory.get_dataset(
            config.dataset, config.split_name, self.batch_size, config.dataset_image_size,
            is_training=False, data_dir=self.data_dir, model_config=self.model_config)
        dataset_factory.log_image_size(self.model_config, config.dataset_image_size)
        # ---- Model, what a checkpoint restores into it, the compiled step
        with strategy.scope():
            self.model = model_lib.get_model(config.model_name, plan.num_classes,
                                             compute_dtype=config.compute_dtype)
        self.assignments = restore_assignments(self.model, config.moving_average_decay,
                                               config.trainable_scopes)
        self._eval_step = make_eval_step(strategy, self.model, config.adv_method or "clean",
                                         self.bounds, plan.num_classes)

    def evaluate(self, checkpoint_path: str) -> EvalResult:
        """Restores ``checkpoint_path`` into the model and evaluates it."""
        config = self.config
        # ---- Restore
        checkpoints.require_shadows(self.assignments, checkpoint_path)
        checkpoints.restore(self.assignments, checkpoint_path,
                            what=f"{config.model_name} evaluation model",
                            classifier_scopes=self.model_config.classifier_scopes)
        step = checkpoints.checkpoint_step(checkpoint_path)

        # ---- The loop: count hits batch by batch
        correct = top5 = seen = 0
        all_logits, all_labels = [], []
        progress = ProgressLog(f"{config.adv_method or 'clean'} evaluation",
                               self.num_batches * self.batch_size, unit="examples",
                               every_n=10 * self.batch_size)
        batches = iter(self.strategy.experimental_distribute_dataset(
            self.dataset.take(self.num_batches)))
        for batch_index in range(self.num_batches):
            try:
                images, labels = dataset_factory.next_batch(
                    batches, config.dataset, config.split_name, self.data_dir, self.model_config)
            except StopIteration:
                break
            c, t, logits = self._eval_step(images, labels, tf.constant(batch_index, tf.int64))
            correct, top5, seen = correct + int(c), top5 + int(t), seen + self.batch_size
            if config.predictions_file:
                all_logits.append(logits.numpy())
                all_labels.append(np.concatenate(
                    [x.numpy() for x in self.strategy.experimental_local_results(labels)]))
            progress.update(self.batch_size)

        # ---- Result
        self._check_seen(seen)
        accuracy, top5_rate = metric_values(correct, top5, seen)
        if config.predictions_file:
            write_predictions(config.predictions_file, np.concatenate(all_labels),
                              np.concatenate(all_logits))
        logging.info(
            "%s on %d examples of %s/%s at global step %s: Accuracy = %.4f, Top5 = %.4f",
            config.adv_method or "clean", seen, config.dataset, config.split_name, step,
            accuracy, top5_rate)
        return EvalResult(checkpoint_path, step, accuracy, top5_rate, seen)

    def _check_seen(self, seen: int) -> None:
        """Refuses a split without one full batch; warns when it ended before the count."""
        if seen == 0:
            raise DataError(
                f"split '{self.config.split_name}' of {self.config.dataset} yielded no full "
                f"batch of {self.batch_size} examples"
            )
        if seen < self.num_batches * self.batch_size:
            logging.warning(
                "The split ended after %d examples (%d batches), fewer than the %d requested",
                seen, seen // self.batch_size, self.num_batches * self.batch_size,
            )


def metric_values(correct: int, in_top5: int, seen: int) -> tuple[float, float]:
    """Accuracy and Top5 of ``seen`` examples, with the original's metric dtypes.

    The original's ``tf.metrics.accuracy`` divides float32 counts in float32, and ``'%.3f'`` of
    that float32 is what its output file shows: a float64 division rounds differently for 496
    of the 10,001 possible Tiny ImageNet accuracies (25/10000 is 0.002 in float32, 0.003 in
    float64). Its Top5, ``tf.metrics.recall_at_k``, divides in float64.
    """
    accuracy = np.float32(correct) / np.float32(seen)
    return float(accuracy), float(np.float64(in_top5) / np.float64(seen))


def write_predictions(path: str, labels: np.ndarray, logits: np.ndarray) -> None:
    """Saves per-example ``labels``, ``logits`` and ``predictions`` (argmax) as ``.npz``.

    Written under a temporary name and renamed, so a reader never sees a partial file.

    Raises:
      DataError: naming ``--predictions_file`` when it cannot be written.
    """
    buffer = io.BytesIO()  # np.savez needs a seekable file; GFile (for gs:// paths) is not
    np.savez(buffer, labels=labels, logits=logits, predictions=np.argmax(logits, axis=-1))
    try:
        atomic_files.write_file(path, buffer.getvalue())
    except tf.errors.OpError as exc:
        raise DataError(f"--predictions_file={path}: cannot write it "
                        f"({tf_error_text.reason(exc)})") from None


def append_result_line(output_file: str, eval_name: str, result: EvalResult) -> None:
    """Appends the original's ``eval_name,accuracy,top5`` line.

    Raises:
      DataError: naming ``--output_file`` when it cannot be written.
    """
    try:
        with tf.io.gfile.GFile(output_file, "a") as f:
            f.write(f"{eval_name},{result.accuracy:.3f},{result.top5:.3f}\n")
    except tf.errors.OpError as exc:
        raise DataError(f"--output_file={output_file}: cannot append to it "
                        f"({tf_error_text.reason(exc)})") from None


def pending_checkpoints(train_dir: str, after_step: Optional[int]) -> list[tuple[int, str]]:
    """(step, prefix) of the complete checkpoints ``train_dir`` lists, newer than ``after_step``.

    Oldest first. A checkpoint counts once its ``.index`` exists (the writer renames it into
    place last) and the ``checkpoint`` state file lists it.
    """
    if not tf.io.gfile.isdir(train_dir):
        return []
    try:
        state = tf.train.get_checkpoint_state(train_dir)
    except (tf.errors.OpError, ValueError) as exc:
        logging.warning("Cannot read the checkpoint state of %s: %s", train_dir, exc)
        return []
    if state is None:
        return []
    found = {}
    for prefix in [*state.all_model_checkpoint_paths, state.model_checkpoint_path]:
        if not prefix:
            continue
        if not os.path.isabs(prefix):
            prefix = os.path.join(train_dir, prefix)
        if prefix in found.values() or not tf.io.gfile.exists(prefix + ".index"):
            continue
        tail = prefix.rsplit("-", 1)[-1]
        step = int(tail) if tail.isdigit() else checkpoints.checkpoint_step(prefix)
        if step is not None and (after_step is None or step > after_step):
            found[step] = prefix
    return sorted(found.items())


def run(config: EvalConfig,
        strategy: Optional[tf.distribute.Strategy] = None) -> list[EvalResult]:
    """Runs ``eval.py``'s single-checkpoint or continuous mode; returns the results.

    Args:
      config: the flags of eval.py.
      strategy: where to evaluate (default: the current strategy).

    Raises:
      ConfigError: neither or both of ``train_dir`` and ``checkpoint_path``.
    """
    if bool(config.train_dir) == bool(config.checkpoint_path):
        raise ConfigError(
            "exactly one of --train_dir (continuous evaluation) or --checkpoint_path "
            "(one checkpoint) has to be provided"
        )
    validate(config, strategy)
    if config.checkpoint_path:
        prefix = checkpoints.resolve_checkpoint(config.checkpoint_path, "--checkpoint_path")
        result = Evaluator(config, strategy).evaluate(prefix)
        if config.output_file:
            append_result_line(config.output_file, config.eval_name, result)
        return [result]

    evaluator = Evaluator(config, strategy)
    output_dir = os.path.join(config.train_dir, config.eval_name)
    tf.io.gfile.makedirs(output_dir)
    writer = tf.summary.create_file_writer(output_dir)
    results: list[EvalResult] = []
    last_step: Optional[int] = None
    last_new = time.time()
    while True:
        pending = pending_checkpoints(config.train_dir, last_step)
        if config.eval_once:
            pending = pending[-1:]
        for step, prefix in pending:
            last_step, last_new = step, time.time()
            try:
                result = evaluator.evaluate(prefix)
            except (tf.errors.NotFoundError, CheckpointError, ValueError) as exc:
                # Training deletes old checkpoints, possibly while we read them: skip it.
                if tf.io.gfile.exists(prefix + ".index"):
                    raise
                logging.warning("Checkpoint %s disappeared while evaluating: %s", prefix, exc)
                continue
            results.append(result)
            with writer.as_default():
                # The original's metrics lived under tf.name_scope('Eval').
                summaries.scalar("Eval/Accuracy", result.accuracy, step)
                summaries.scalar("Eval/Top5", result.top5, step)
            writer.flush()
            if config.output_file:
                append_result_line(config.output_file, config.eval_name, result)
        if config.eval_once and results:
            break
        if pending:
            continue  # more may have arrived while evaluating
        if config.timeout_secs is not None and time.time() - last_new > config.timeout_secs:
            logging.info("No new checkpoint in %s for %.0fs; stopping", config.train_dir,
                         config.timeout_secs)
            break
        logging.info("Waiting for a new checkpoint in %s", config.train_dir)
        wait = config.eval_interval_secs
        if config.timeout_secs is not None:
            wait = min(wait, max(0.5, config.timeout_secs / 4))
        time.sleep(max(0.5, wait))
    writer.close()
    return results
