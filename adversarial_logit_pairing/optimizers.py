"""TF1 optimizers (RMSProp, Momentum, Adam) with TF1's update rules and checkpoint names.

Why not Keras: Keras' RMSprop starts the mean-square accumulator at zeros (and older Keras
versions added epsilon outside the square root); TF1's starts at ONES and adds epsilon inside.
With the original's ``rmsprop_epsilon=1.0`` the first steps differ a lot (the ones damp them),
so the port applies the very training kernels TF1 used (``ResourceApplyRMSProp``,
``ResourceApplyMomentum``, ``ResourceApplyAdam``) and names the slots as a TF1 checkpoint does
(``<var>/RMSProp``, ``<var>/RMSProp_1``, ``<var>/Momentum``, ``<var>/Adam``, ``<var>/Adam_1``,
``beta1_power``, ``beta2_power``).

Why not ``tf.compat.v1.train.RMSPropOptimizer`` (and ``Momentum``/``Adam``) itself: on one device it
gives the same numbers at the same speed (``bench/tf_parts.py``, resnet_v2_50: difference 0,
1.07-1.11x our step time in two runs), but under ``MirroredStrategy`` its ``apply_gradients`` SUMS
the replicas' gradients (its ``compute_gradients`` divides the loss instead), so RMSProp moved
elsewhere (2 CPU replicas, 3 steps: -0.0641 where the mean gradient gives 0.2839); dividing the
gradients first matches only for a power-of-two replica count (3 replicas: 64 of 1000 values differ
in the last bit), and in a cross-replica context it raises ``RuntimeError: Use
_distributed_apply()`` (TF 2.21, measured).

``apply_gradients`` follows TF1 step semantics: the learning rate is computed from
``global_step`` BEFORE the step increments it, every variable is updated, then ``global_step``
grows by one.

Distribution: called in a replica context (inside ``strategy.run``), the optimizer enters the
cross-replica context with ``merge_call`` (as Keras does), MEAN-reduces each gradient over the
replicas and applies the same update to every mirrored copy with ``strategy.extended.update``.
MEAN because each replica's loss is a mean over its own batch, and because TF1's
``SyncReplicasOptimizer`` averaged the aggregated gradients too (the original made up for it by
multiplying the learning rate by ``replicas_to_aggregate``). Gradients that the caller already
all-reduced are identical on every replica, so their mean is themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import tensorflow as tf

from adversarial_logit_pairing.checkpoints import variable_name
from adversarial_logit_pairing.errors import ConfigError

LearningRate = Union[float, Callable[[Any], Any]]


def _key(variable: tf.Variable) -> Any:
    # By identity, not by name: TF2 allows two variables with one name (build() rejects that
    # case separately, since their slots could not both be checkpointed).
    return variable.ref()


class TF1Optimizer(tf.Module):
    """Base class: slots created once by :meth:`build`, then TF1 updates.

    Subclasses list their slots in ``SLOTS`` as ``(slot name, initial value)``; the i-th slot
    of variable ``v`` is checkpointed as ``<v>/<name>`` (i = 0) or ``<v>/<name>_<i>``, the
    names TF1's slot creator made.
    """

    SLOTS: tuple[tuple[str, float], ...] = ()

    def __init__(self, learning_rate: LearningRate, name: str) -> None:
        super().__init__(name=name)
        self.learning_rate = learning_rate
        self._slots: dict[Any, tuple[tf.Variable, ...]] = {}
        self._by_name: dict[str, tf.Variable] = {}

    # ---- State --------------------------------------------------------------------------

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        """Creates the slots of ``var_list`` (skipping variables already built).

        Call it eagerly, outside ``tf.function`` and under the strategy's scope if there is
        one, so that the slots are mirrored like the variables they follow.

        Raises:
          ValueError: two variables share a TF1 name (their slots would collide in a
            checkpoint), or distributed variables are built outside their strategy's scope.
        """
        strategy = tf.distribute.get_strategy()
        with tf.init_scope():
            for var in var_list:
                key = _key(var)
                if key in self._slots:
                    continue
                if (isinstance(var, tf.distribute.DistributedValues)
                        and not tf.distribute.has_strategy()):
                    raise ValueError(
                        f"{type(self).__name__}.build: '{variable_name(var)}' is a distributed "
                        "variable; call build() under strategy.scope()"
                    )
                slots = []
                with strategy.extended.colocate_vars_with(var):
                    for index, (_, initial) in enumerate(self.SLOTS):
                        name = f"{variable_name(var)}/{self.name}" + (f"_{index}" if index else "")
                        if name in self._by_name:
                            raise ValueError(f"two variables are named '{variable_name(var)}'; "
                                             "their optimizer slots would share a name")
                        slot = tf.Variable(
                            tf.fill(var.shape, tf.constant(initial, var.dtype.base_dtype)),
                            trainable=False, name=name,
                        )
                        slots.append(slot)
                        self._by_name[name] = slot
                self._slots[key] = tuple(slots)
            self._build_non_slots(var_list)

    def _build_non_slots(self, var_list: Sequence[tf.Variable]) -> None:
        """Creates state shared by all variables (Adam's beta powers)."""

    def get_slot(self, var: tf.Variable, slot_name: str) -> tf.Variable:
        """The slot ``slot_name`` (TF1's names, e.g. 'rms', 'momentum', 'm', 'v') of ``var``."""
        names = [name for name, _ in self.SLOTS]
        if slot_name not in names:
            raise KeyError(f"{type(self).__name__} has no slot '{slot_name}' (has {names})")
        return self._slots[_key(var)][names.index(slot_name)]

    def variables_by_name(self) -> dict[str, tf.Variable]:
        """All optimizer state under its TF1 checkpoint names, in build order."""
        return dict(self._by_name)

    # ---- Updates ------------------------------------------------------------------------

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, tf.Variable]],
                        global_step: tf.Variable) -> None:
        """Applies one TF1 update to every variable with a gradient, then increments the step.

        ``None`` gradients are skipped, as in TF1. Sparse gradients (``IndexedSlices``) are
        made dense, which updates every row (TF1 updated only the rows present); the models
        of this project have no sparse gradients.

        Raises:
          ValueError: no variable has a gradient, or (inside ``tf.function``) a variable was
            not built.
        """
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable")
        pairs = [
            (tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v)
            for g, v in pairs
        ]
        missing = [v for _, v in pairs if _key(v) not in self._slots]
        if missing:
            if tf.inside_function():
                raise ValueError(
                    f"{type(self).__name__}: slots of {[variable_name(v) for v in missing]} do not "
                    "exist; call build(var_list) eagerly before the compiled step"
                )
            self.build(missing)
        if tf.distribute.in_cross_replica_context():
            self._distributed_apply(tf.distribute.get_strategy(), pairs, global_step)
        else:
            tf.distribute.get_replica_context().merge_call(
                self._distributed_apply, args=(pairs, global_step)
            )

    # Plain TensorFlow calls, no Python control flow on tensors: nothing for AutoGraph to do.
    @tf.autograph.experimental.do_not_convert
    def _distributed_apply(self, strategy: tf.distribute.Strategy,
                           pairs: list[tuple[Any, tf.Variable]],
                           global_step: tf.Variable) -> None:
        """Cross-replica part: reduce, update every copy, then increment the step."""
        mean = tf.distribute.ReduceOp.MEAN
        if all(isinstance(g, tf.distribute.DistributedValues) for g, _ in pairs):
            grads = strategy.extended.batch_reduce_to(mean, pairs)
        else:
            # A plain tensor (given in the cross-replica context) is the same for every copy;
            # the batched all-reduce accepts only per-replica values.
            grads = [
                strategy.extended.reduce_to(mean, g, v)
                if isinstance(g, tf.distribute.DistributedValues) else g
                for g, v in pairs
            ]
        learning_rate = self.learning_rate
        if callable(learning_rate):
            # Read before the increment below: TF1 fed the pre-step global_step to the rate.
            learning_rate = learning_rate(global_step)
        learning_rate = tf.convert_to_tensor(learning_rate, tf.float32)
        for grad, (_, var) in zip(grads, pairs):
            strategy.extended.update(
                var, self._apply_dense,
                args=(grad, self._slots[_key(var)], learning_rate), group=False,
            )
        self._finish(strategy)
        global_step.assign_add(tf.constant(1, global_step.dtype))

    def _apply_dense(self, var: tf.Variable, grad: tf.Tensor, slots: tuple[tf.Variable, ...],
                     learning_rate: tf.Tensor) -> Any:
        """Updates one (local copy of a) variable; runs inside ``strategy.extended.update``."""
        raise NotImplementedError

    def _finish(self, strategy: tf.distribute.Strategy) -> None:
        """Updates shared state after all variables (Adam's beta powers)."""


def _cast(value: Any, var: tf.Variable) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(value, tf.float32), var.dtype.base_dtype)


class RMSProp(TF1Optimizer):
    """TF1 ``RMSPropOptimizer`` (not centered).

    ``ms = decay*ms + (1-decay)*g^2`` with ``ms`` starting at ONES;
    ``mom = momentum*mom + lr*g/sqrt(ms + epsilon)``; ``var -= mom``.
    """

    SLOTS = (("rms", 1.0), ("momentum", 0.0))

    def __init__(self, learning_rate: LearningRate, decay: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-10, name: str = "RMSProp") -> None:
        super().__init__(learning_rate, name)
        self.decay = decay
        self.momentum = momentum
        self.epsilon = epsilon

    def _apply_dense(self, var, grad, slots, learning_rate):
        ms, mom = slots
        return tf.raw_ops.ResourceApplyRMSProp(
            var=var.handle, ms=ms.handle, mom=mom.handle, lr=_cast(learning_rate, var),
            rho=_cast(self.decay, var), momentum=_cast(self.momentum, var),
            epsilon=_cast(self.epsilon, var), grad=grad, use_locking=False,
        )


class Momentum(TF1Optimizer):
    """TF1 ``MomentumOptimizer``: ``accum = momentum*accum + g``; ``var -= lr*accum``."""

    SLOTS = (("momentum", 0.0),)

    def __init__(self, learning_rate: LearningRate, momentum: float,
                 name: str = "Momentum") -> None:
        super().__init__(learning_rate, name)
        self.momentum = momentum

    def _apply_dense(self, var, grad, slots, learning_rate):
        (accum,) = slots
        return tf.raw_ops.ResourceApplyMomentum(
            var=var.handle, accum=accum.handle, lr=_cast(learning_rate, var), grad=grad,
            momentum=_cast(self.momentum, var), use_locking=False, use_nesterov=False,
        )


class Adam(TF1Optimizer):
    """TF1 ``AdamOptimizer``, with the bias correction carried by ``beta1_power`` and
    ``beta2_power`` (non-slot variables starting at beta1 and beta2, multiplied by them after
    every step)."""

    SLOTS = (("m", 0.0), ("v", 0.0))

    def __init__(self, learning_rate: LearningRate, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, name: str = "Adam") -> None:
        super().__init__(learning_rate, name)
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self._beta1_power: tf.Variable | None = None
        self._beta2_power: tf.Variable | None = None

    def _build_non_slots(self, var_list):
        if self._beta1_power is not None or not var_list:
            return
        # TF1 placed them with the first variable by name.
        first = min(var_list, key=lambda v: v.name)
        strategy = tf.distribute.get_strategy()
        with strategy.extended.colocate_vars_with(first):
            self._beta1_power = tf.Variable(self.beta1, dtype=tf.float32, trainable=False,
                                            name="beta1_power")
            self._beta2_power = tf.Variable(self.beta2, dtype=tf.float32, trainable=False,
                                            name="beta2_power")
        self._by_name["beta1_power"] = self._beta1_power
        self._by_name["beta2_power"] = self._beta2_power

    def _apply_dense(self, var, grad, slots, learning_rate):
        m, v = slots
        return tf.raw_ops.ResourceApplyAdam(
            var=var.handle, m=m.handle, v=v.handle,
            beta1_power=_cast(self._beta1_power, var), beta2_power=_cast(self._beta2_power, var),
            lr=_cast(learning_rate, var), beta1=_cast(self.beta1, var),
            beta2=_cast(self.beta2, var), epsilon=_cast(self.epsilon, var), grad=grad,
            use_locking=False, use_nesterov=False,
        )

    def _finish(self, strategy):
        for power, beta in ((self._beta1_power, self.beta1), (self._beta2_power, self.beta2)):
            strategy.extended.update(
                power, lambda p, b: p.assign(p * b), args=(tf.constant(beta, tf.float32),),
                group=False,
            )


def get_optimizer(hparams: Any, learning_rate: LearningRate) -> TF1Optimizer:
    """The optimizer named by ``hparams.optimizer``, configured as in the original.

    'rms' -> ``RMSProp(lr, rmsprop_decay, momentum, rmsprop_epsilon)``;
    'momentum' -> ``Momentum(lr, momentum)``; 'adam' -> ``Adam(lr)`` with TF1's defaults.

    Raises:
      ConfigError: any other optimizer name.
    """
    if hparams.optimizer == "rms":
        return RMSProp(learning_rate, hparams.rmsprop_decay, hparams.momentum,
                       hparams.rmsprop_epsilon)
    if hparams.optimizer == "momentum":
        return Momentum(learning_rate, hparams.momentum)
    if hparams.optimizer == "adam":
        return Adam(learning_rate)
    raise ConfigError(
        f"hparam 'optimizer': expected one of rms, momentum, adam, got '{hparams.optimizer}'"
    )
