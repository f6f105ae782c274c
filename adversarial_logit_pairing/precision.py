"""Reduced-precision compute: the dtype a model computes in, and loss scaling for float16.

The policy is the usual mixed-precision one, kept deliberately small:

* variables, batch-norm statistics, moving averages, optimizer slots and the loss stay float32
  (checkpoints are unchanged, the TF1 optimizers' kernels see float32);
* a model built with ``compute_dtype='bfloat16'`` or ``'float16'`` casts its input and each
  weight at use, so convolutions and activations run in the low dtype; the fused batch-norm op
  takes float32 scale/offset/statistics as it requires, and the logits come back float32;
* the attack's iterate, box and step arithmetic stay float32 (a bfloat16 image has 8 bits of
  mantissa: a step of 2/255 near 1.0 would round away).

``bfloat16`` has float32's exponent range, so it needs no loss scaling (CPUs with AVX512-BF16
or AMX, TPUs). ``float16`` (GPUs) overflows above 65504 and flushes small gradients to zero, so
its training step multiplies the loss by a dynamic ``LossScale`` before differentiating,
divides the gradients by it, and skips the update when they are not finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

DTypeLike = Union[str, tf.DType, None]


def resolve_compute_dtype(compute_dtype: DTypeLike, what: str = "compute_dtype") -> tf.DType:
    """``'float32'`` (or None), ``'bfloat16'``, ``'float16'`` or the tf.DType -> tf.DType.

    Args:
      compute_dtype: the requested compute precision.
      what: the flag or argument name to put in the error message.

    Raises:
      ConfigError: (a ValueError) naming ``what`` for any other value.
    """
    if compute_dtype is None:
        return tf.float32
    name = compute_dtype.name if isinstance(compute_dtype, tf.DType) else str(compute_dtype)
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"{what}={compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    return tf.as_dtype(name)


def needs_loss_scaling(compute_dtype: DTypeLike) -> bool:
    """Whether a training step in this dtype must scale its loss (only float16 does)."""
    return resolve_compute_dtype(compute_dtype) == tf.float16


def all_finite(tensors: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """A scalar bool: every element of every (non-None) tensor is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


class LossScale(tf.Module):
    """Dynamic loss scaling (Micikevicius et al. 2018), as Keras' LossScaleOptimizer does it.

    The scale starts high (2**15); a step whose gradients overflow halves it and must be
    skipped; ``growth_interval`` finite steps in a row double it. Its state is two float32/int64
    variables, so it lives in checkpoints and inside ``tf.function`` like any other state.

    Use in a training step::

        with tf.GradientTape() as tape:
            loss = ...                                  # float32
            scaled = loss_scale.scale(loss)
        grads = loss_scale.unscale(tape.gradient(scaled, variables))
        finite = loss_scale.update(grads)
        tf.cond(finite, lambda: apply(grads), lambda: tf.no_op())   # or skip when not finite
    """

    def __init__(self, initial_scale: float = 2.0**15, growth_interval: int = 2000,
                 factor: float = 2.0, min_scale: float = 1.0, name: str = "loss_scale"):
        super().__init__(name=name)
        if initial_scale < min_scale or factor <= 1.0 or growth_interval < 1:
            raise ConfigError(
                f"LossScale: need initial_scale >= min_scale, factor > 1 and growth_interval "
                f">= 1, got {initial_scale}, {factor}, {growth_interval}"
            )
        self.growth_interval = int(growth_interval)
        self.factor = float(factor)
        self.min_scale = float(min_scale)
        self.current = tf.Variable(float(initial_scale), dtype=tf.float32, trainable=False,
                                   name="current_loss_scale")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

    def scale(self, loss: tf.Tensor) -> tf.Tensor:
        """``loss * scale`` (float32)."""
        return tf.cast(loss, tf.float32) * self.current

    def unscale(self, grads: Sequence[Optional[tf.Tensor]]) -> list[Optional[tf.Tensor]]:
        """Each gradient divided by the scale, in float32 (None stays None)."""
        inverse = 1.0 / self.current
        return [None if g is None else tf.cast(g, tf.float32) * inverse for g in grads]

    def update(self, grads: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
        """Adjusts the scale after a step; returns whether ``grads`` were finite (apply them).

        Not finite: the scale is divided by ``factor`` (not below ``min_scale``) and the count
        of good steps restarts. Finite: the count grows, and at ``growth_interval`` the scale
        is multiplied by ``factor``.
        """
        finite = all_finite(grads)
        grown = self.good_steps + 1 >= self.growth_interval
        new_scale = tf.where(
            finite,
            tf.where(grown, self.current * self.factor, self.current),
            tf.maximum(self.current / self.factor, self.min_scale),
        )
        new_good = tf.where(finite & tf.logical_not(grown), self.good_steps + 1,
                            tf.zeros_like(self.good_steps))
        self.current.assign(new_scale)
        self.good_steps.assign(new_good)
        return finite
