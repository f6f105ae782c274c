"""Learning-rate schedules of the original: staircase exponential decay, steps, constant;
optionally after a linear warm-up (tensorflow/tpu EfficientNet's ``build_learning_rate``).

A schedule is a callable ``schedule(global_step) -> float32 scalar tensor`` that works eagerly,
inside ``tf.function`` and under XLA, for a Python int or an int64 tensor/variable step. The
decaying ones call TensorFlow's own ``tf.compat.v1.train.exponential_decay`` and
``piecewise_constant``, the functions the original called, so the values are TF1's by
construction; these classes add what the original did around them (the multiplication by
``replicas_to_aggregate``, a single-value 'step' list) and the checks that give a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import validate

Step = Union[int, tf.Tensor, tf.Variable]


def _evaluated(rate: Any) -> tf.Tensor:
    # Eagerly the compat.v1 decay functions return a no-argument callable; in a graph (inside
    # tf.function) they return the tensor itself.
    return rate() if callable(rate) else rate


class LearningRateSchedule:
    """Base class: ``schedule(step)`` is the rate before scaling, times ``scale``.

    ``scale`` is the original's multiplication by ``replicas_to_aggregate``: its
    SyncReplicasOptimizer averaged that many gradients into one update, and the larger rate
    made up for the fewer updates.
    """

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, step: Step) -> tf.Tensor:
        rate = self.unscaled(step)
        if self.scale != 1:
            rate = rate * tf.constant(self.scale, tf.float32)
        return rate

    def unscaled(self, step: Step) -> tf.Tensor:
        raise NotImplementedError


class StaircaseExponentialDecay(LearningRateSchedule):
    """``learning_rate * decay_factor ** floor(step / decay_steps)``.

    Raises ConfigError (a ValueError) for ``decay_steps`` < 1: it comes from the hparams.
    """

    def __init__(self, learning_rate: float, decay_steps: int, decay_factor: float,
                 scale: float = 1.0) -> None:
        super().__init__(scale)
        if decay_steps < 1:
            raise ConfigError(f"decay_steps must be >= 1, got {decay_steps}")
        self.learning_rate = learning_rate
        self.decay_steps = decay_steps
        self.decay_factor = decay_factor

    def unscaled(self, step: Step) -> tf.Tensor:
        return _evaluated(tf.compat.v1.train.exponential_decay(
            self.learning_rate, step, self.decay_steps, self.decay_factor, staircase=True))

    def __repr__(self) -> str:
        return (f"StaircaseExponentialDecay(learning_rate={self.learning_rate}, "
                f"decay_steps={self.decay_steps}, decay_factor={self.decay_factor}, "
                f"scale={self.scale})")


class PiecewiseConstant(LearningRateSchedule):
    """``values[i]`` for ``boundaries[i-1] < step <= boundaries[i]`` (TF1 piecewise_constant).

    ``values[0]`` applies up to and including ``boundaries[0]``, ``values[-1]`` after the last
    boundary; ``boundaries`` must not decrease. Other lists raise ConfigError (a ValueError):
    they come from the hparams ``lr_list`` and ``lr_decay_epochs``.
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[float],
                 scale: float = 1.0) -> None:
        super().__init__(scale)
        if len(values) != len(boundaries) + 1:
            raise ConfigError(f"need len(values) == len(boundaries) + 1, got {len(values)} "
                             f"values and {len(boundaries)} boundaries")
        if any(b < a for a, b in zip(boundaries, boundaries[1:])):
            raise ConfigError(f"boundaries must not decrease, got {list(boundaries)}")
        self.boundaries = [int(b) for b in boundaries]
        self.values = [float(v) for v in values]

    def unscaled(self, step: Step) -> tf.Tensor:
        if not self.boundaries:
            # TF1's piecewise_constant fails without a boundary (IndexError); one value
            # means that rate at every step.
            return tf.constant(self.values[0], tf.float32)
        # int64 step and boundaries: TF1 promotes only int32 boundaries to an int64 step.
        return _evaluated(tf.compat.v1.train.piecewise_constant(
            tf.cast(step, tf.int64), [tf.constant(b, tf.int64) for b in self.boundaries],
            [tf.constant(v, tf.float32) for v in self.values]))

    def __repr__(self) -> str:
        return (f"PiecewiseConstant(boundaries={self.boundaries}, values={self.values}, "
                f"scale={self.scale})")


class ConstantLearningRate(LearningRateSchedule):
    """The same rate at every step."""

    def __init__(self, learning_rate: float, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.learning_rate = learning_rate

    def __call__(self, step: Step) -> tf.Tensor:
        # The original multiplied Python numbers here (float64), then TF made a float32.
        return tf.constant(self.learning_rate * self.scale, tf.float32)

    def unscaled(self, step: Step) -> tf.Tensor:
        return tf.constant(self.learning_rate, tf.float32)

    def __repr__(self) -> str:
        return f"ConstantLearningRate({self.learning_rate}, scale={self.scale})"


class LinearWarmup(LearningRateSchedule):
    """``learning_rate * step / warmup_steps`` before ``warmup_steps``, then ``schedule(step)``.

    As tensorflow/tpu's EfficientNet: the warm-up rises from 0 towards ``learning_rate`` and
    then hands over to the decaying schedule at its value for that step (already decayed by
    the decays the warm-up spanned: 0.97^2 after 5 epochs of 2.4-epoch decays), without
    restarting it. ``scale`` (``replicas_to_aggregate``) multiplies both parts.
    """

    def __init__(self, schedule: LearningRateSchedule, learning_rate: float,
                 warmup_steps: int) -> None:
        super().__init__(schedule.scale)
        if warmup_steps < 1:
            raise ConfigError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.schedule = schedule
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps

    def __call__(self, step: Step) -> tf.Tensor:
        step = tf.cast(step, tf.int64)
        warm = self._warm(step)
        if self.scale != 1:
            warm = warm * tf.constant(self.scale, tf.float32)
        return tf.where(step < self.warmup_steps, warm, self.schedule(step))

    def unscaled(self, step: Step) -> tf.Tensor:
        step = tf.cast(step, tf.int64)
        return tf.where(step < self.warmup_steps, self._warm(step), self.schedule.unscaled(step))

    def _warm(self, step: tf.Tensor) -> tf.Tensor:
        # The original's float32 arithmetic: lr * float(step) / float(warmup_steps).
        return (tf.constant(self.learning_rate, tf.float32) * tf.cast(step, tf.float32)
                / tf.cast(self.warmup_steps, tf.float32))

    def __repr__(self) -> str:
        return (f"LinearWarmup({self.schedule!r}, learning_rate={self.learning_rate}, "
                f"warmup_steps={self.warmup_steps})")


def _with_warmup(schedule: LearningRateSchedule, hparams: Any,
                 steps_per_epoch: float) -> LearningRateSchedule:
    """Wraps ``schedule`` in the ``lr_warmup_epochs`` warm-up, if any."""
    epochs = getattr(hparams, "lr_warmup_epochs", 0.0)
    if epochs <= 0:
        return schedule
    warmup_steps = int(epochs * steps_per_epoch)
    if warmup_steps < 1:
        raise ConfigError(f"hparam 'lr_warmup_epochs': {epochs} epochs of {steps_per_epoch:g} "
                          "steps is less than one step; use more epochs or a smaller batch")
    return LinearWarmup(schedule, hparams.learning_rate, warmup_steps)


def get_lr_schedule(hparams: Any, examples_per_epoch: int,
                    replicas_to_aggregate: int = 1) -> tuple[LearningRateSchedule, float]:
    """Builds the learning-rate schedule the hparams ask for.

    Args:
      hparams: hyper-parameters (``batch_size``, ``lr_schedule``, ``learning_rate``,
        ``lr_decay_factor``, ``lr_num_epochs_per_decay``, ``lr_list``, ``lr_decay_epochs``,
        ``lr_warmup_epochs``: > 0 puts ``LinearWarmup`` of ``int(epochs * steps_per_epoch)``
        steps towards ``learning_rate`` in front of any schedule).
      examples_per_epoch: number of training examples per epoch.
      replicas_to_aggregate: number of replicas whose gradients make one update; when > 0 it
        divides the steps per epoch and multiplies the rate, as in the original.

    Returns:
      ``(schedule, steps_per_epoch)``: the callable ``schedule(global_step)`` and the float
      number of optimizer steps per epoch.

    Raises:
      ConfigError: unknown ``lr_schedule``; a decay interval or a warm-up shorter than one
        step; for 'step', lists of the wrong lengths or decreasing boundaries.
    """
    steps_per_epoch = float(examples_per_epoch) / float(hparams.batch_size)
    scale = 1
    if replicas_to_aggregate > 0:
        steps_per_epoch /= replicas_to_aggregate
        scale = replicas_to_aggregate

    if hparams.lr_schedule == "exp_decay":
        # The original used Python 2's long(); int() truncates the same way.
        decay_steps = int(steps_per_epoch * hparams.lr_num_epochs_per_decay)
        if decay_steps < 1:
            raise ConfigError(
                f"hparam 'lr_num_epochs_per_decay': {hparams.lr_num_epochs_per_decay} epochs of "
                f"{steps_per_epoch:g} steps ({examples_per_epoch} examples / batch_size "
                f"{hparams.batch_size} / {max(replicas_to_aggregate, 1)} replicas) is less than "
                "one step between decays; use more epochs per decay or a smaller batch"
            )
        schedule = StaircaseExponentialDecay(hparams.learning_rate, decay_steps,
                                             hparams.lr_decay_factor, scale)
        return _with_warmup(schedule, hparams, steps_per_epoch), steps_per_epoch
    if hparams.lr_schedule == "step":
        validate(hparams.values())
        boundaries = [int(epoch * steps_per_epoch) for epoch in hparams.lr_decay_epochs]
        # lr_list holds the rates themselves: the original did not multiply them by
        # learning_rate.
        schedule = PiecewiseConstant(boundaries, hparams.lr_list, scale)
        return _with_warmup(schedule, hparams, steps_per_epoch), steps_per_epoch
    if hparams.lr_schedule == "fixed":
        schedule = ConstantLearningRate(hparams.learning_rate, scale)
        return _with_warmup(schedule, hparams, steps_per_epoch), steps_per_epoch
    raise ConfigError(
        f"hparam 'lr_schedule': expected one of exp_decay, step, fixed, got "
        f"'{hparams.lr_schedule}'"
    )

