"""TF1-style exponential moving average of model variables (``--moving_average_decay``).

Matches ``tf.compat.v1.train.ExponentialMovingAverage(decay, num_updates=global_step)``:
shadows start at the variables' current values, are named ``<name>/ExponentialMovingAverage``
(the names the original's checkpoints hold and eval.py reads), and every :meth:`apply` does
``shadow -= (shadow - value) * (1 - d)`` with ``d = min(decay, (1 + n) / (10 + n))`` in float32.

The training step calls ``apply(global_step)`` right after the optimizer incremented the step,
as the original's chief did after each synchronous update, so the first update uses n = 1.

Distribution: shadows are created under the strategy's scope (mirrored). ``apply`` in a replica
context enters the cross-replica context with ``merge_call``; there every mirrored shadow copy
gets the same update. Variables synchronised on read (BN moving statistics, aggregated by MEAN)
are read in the cross-replica context, which gives their mean over the replicas, as TF1's
``assign_moving_average`` MEAN-reduced the value.

Why not ``tf.train.ExponentialMovingAverage`` itself: on one device it gives the same numbers at the
same speed (``bench/tf_parts.py``, resnet_v2_50: difference 0, 0.95-1.15x our time in two runs), but
under ``MirroredStrategy`` a cross-replica ``apply`` updates each copy of the shadow of a
sync-on-read variable (batch-norm statistics) with its own replica's value, so the copies diverge
(measured on 2 CPU replicas, TF 2.21: [2.60, 7.80] and [5.20, 15.61] where the mean gives [3.90,
11.71]); it also fixes ``num_updates`` when constructed and, eagerly, numbers its shadow names per
process (a second average of ``net/w`` makes ``net/w/ExponentialMovingAverage_1``), where
checkpoints need the TF1 names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import tensorflow as tf


def enabled(decay: Optional[float]) -> bool:
    """Whether ``--moving_average_decay`` turns the moving average on: a decay above 0.

    The one reading of the flag for training (keep shadows), evaluation and export (read
    them); 0, a negative value (the released checkpoints' ``-1``) or None mean plain variables.
    """
    return bool(decay) and decay > 0


def _on_read(variable: tf.Variable) -> bool:
    return variable.synchronization == tf.VariableSynchronization.ON_READ


def _first_local(strategy: tf.distribute.Strategy, value: Any) -> Any:
    """One replica's copy of a per-replica value (they are equal for a step counter)."""
    if isinstance(value, tf.distribute.DistributedValues) and not isinstance(value, tf.Variable):
        return strategy.experimental_local_results(value)[0]
    return value


def _update_shadow(shadow: tf.Variable, value: Any, one_minus_decay: tf.Tensor) -> Any:
    # Same operation order as TF1's assign_moving_average, so the results are bit-identical.
    value = tf.convert_to_tensor(value, shadow.dtype.base_dtype)
    return shadow.assign_sub((shadow - value) * one_minus_decay)


class ExponentialMovingAverage(tf.Module):
    """Shadow copies of ``variables`` updated by :meth:`apply` (TF1 semantics)."""

    def __init__(self, decay: float, variables: Mapping[str, tf.Variable],
                 name: str = "ExponentialMovingAverage") -> None:
        """Creates the shadows, initialised to the variables' current values.

        Args:
          decay: the largest decay; the effective one is ``min(decay, (1+n)/(10+n))``.
          variables: TF1 name -> variable (floating point); the shadow of ``name`` is called
            ``<name>/<name of this average>``.
          name: the suffix of the shadow names; TF1's default.

        Raises:
          TypeError: a variable is not floating point (TF1 refused those too).
        """
        super().__init__(name=name)
        self.decay = float(decay)
        self._variables = dict(variables)
        self._shadows: dict[str, tf.Variable] = {}
        strategy = tf.distribute.get_strategy()
        # Created outside any tf.function, like TF1's shadows, so they exist once.
        with tf.init_scope():
            for var_name, var in self._variables.items():
                if not var.dtype.is_floating:
                    raise TypeError(f"moving average of '{var_name}': the variable must be "
                                    f"floating point, got {var.dtype.name}")
                with strategy.extended.colocate_vars_with(var):
                    self._shadows[var_name] = tf.Variable(
                        var.read_value(), trainable=False, name=self.average_name(var_name)
                    )

    def average_name(self, name: str) -> str:
        """The checkpoint name of the shadow of the variable called ``name``."""
        return f"{name}/{self.name}"

    def shadow(self, name: str) -> tf.Variable:
        """The shadow variable of the variable called ``name``."""
        try:
            return self._shadows[name]
        except KeyError:
            raise KeyError(f"no moving average for '{name}'") from None

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """Shadow checkpoint name -> shadow variable."""
        return {self.average_name(name): shadow for name, shadow in self._shadows.items()}

    def apply(self, num_updates: Optional[Any] = None) -> None:
        """Moves every shadow towards its variable's current value.

        Args:
          num_updates: the global step (int, tensor or variable); ``None`` means the plain
            ``decay`` at every step.
        """
        if tf.distribute.in_cross_replica_context():
            self._apply_cross_replica(tf.distribute.get_strategy(), num_updates)
        else:
            tf.distribute.get_replica_context().merge_call(
                self._apply_cross_replica, args=(num_updates,)
            )

    @tf.autograph.experimental.do_not_convert
    def _apply_cross_replica(self, strategy: tf.distribute.Strategy, num_updates: Any) -> None:
        decay = tf.constant(self.decay, tf.float32)
        if num_updates is not None:
            n = tf.cast(_first_local(strategy, num_updates), tf.float32)
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        one_minus_decay = 1.0 - decay
        for name, var in self._variables.items():
            shadow = self._shadows[name]
            # A mirrored variable is passed whole: inside the update each device reads its own
            # (identical) copy. An on-read variable is read here, which averages the replicas.
            value = var.read_value() if _on_read(var) else var
            strategy.extended.update(
                shadow, _update_shadow,
                args=(value, tf.cast(one_minus_decay, shadow.dtype.base_dtype)), group=False,
            )

