"""Reduced-precision compute: the dtype a model computes in, and loss scaling for float16.

The policy is the usual mixed-precision one, kept deliberately small:

* variables, batch-norm statistics, moving averages, optimizer slots and the loss stay float32
  (checkpoints are unchanged, the TF1 optimizers' kernels see float32);
* a model built with ``compute_dtype='bfloat16'`` or ``'float16'`` casts its input and each
  weight at use, so convolutions and activations run in the low dtype; the fused batch-norm op
  takes float32 scale/offset/statistics as it requires, and the logits come back float32;
* inside ``cast_weights_once()`` (entered by the attacks through ``model.cast_weights()``)
  each weight is cast once for every model call of the block, not once per call: the ten
  input-gradient passes of a PGD attack share one low-precision copy of the weights;
* the attack's iterate, box and step arithmetic stay float32 (a bfloat16 image has 8 bits of
  mantissa: a step of 2/255 near 1.0 would round away).

``bfloat16`` has float32's exponent range, so it needs no loss scaling (CPUs with AVX512-BF16
or AMX, TPUs). ``float16`` (GPUs) overflows above 65504 and flushes small gradients to zero, so
its training step multiplies the loss by a dynamic ``LossScale`` before differentiating,
divides the gradients by it, and skips the update when they are not finite.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

try:  # the graphs of tf.while_loop and tf.cond bodies (TF 2 control flow)
    from tensorflow.python.ops.control_flow_v2_func_graphs import ControlFlowFuncGraph

    _CONTROL_FLOW_GRAPHS: tuple[type, ...] = (ControlFlowFuncGraph,)
except ImportError:  # a TF without it: loop bodies then cast at each use, as before
    _CONTROL_FLOW_GRAPHS = ()

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


class _CastBlock:
    """One ``cast_weights_once`` block: the graph it runs in and the casts made so far."""

    def __init__(self, graph: tf.Graph):
        self.graph = graph
        self.casts: dict[tuple[object, tf.DType], tf.Tensor] = {}


# Open blocks, innermost last. Per thread: MirroredStrategy traces each replica in a thread of
# its own, and each replica must cast its own copy of the weights.
_BLOCKS = threading.local()


def _open_blocks() -> list[_CastBlock]:
    if not hasattr(_BLOCKS, "stack"):
        _BLOCKS.stack = []
    return _BLOCKS.stack


def _block_for_current_graph() -> Optional[_CastBlock]:
    """The innermost open block whose casts ops built now may use, if any.

    Ops may use them in the block's own graph and in the bodies of ``tf.while_loop`` /
    ``tf.cond`` built inside it, which capture the casts as loop invariants (that is the point:
    the PGD loop's steps share one copy). Not eagerly, and not inside a nested ``tf.function``:
    its trace is cached apart from the block's graph and may run where those tensors do not
    exist.
    """
    stack = _open_blocks()
    if not stack or tf.executing_eagerly():
        return None
    block = stack[-1]
    graph = tf.compat.v1.get_default_graph()
    while graph is not block.graph:
        if not isinstance(graph, _CONTROL_FLOW_GRAPHS):
            return None
        graph = graph.outer_graph
    return block


@contextlib.contextmanager
def cast_weights_once() -> Iterator[None]:
    """Within the block, ``cast_variable`` casts each variable once (per dtype) for all uses.

    The first use of a variable casts it in the graph the block was entered in, so a first use
    inside a loop body still casts outside the loop. Enter it inside the traced function (the
    attack and the training step do): the casts then run once per execution of that function,
    after the weights' latest update. Entered eagerly it does nothing, so that a function traced
    within it never bakes in the weights' values of the moment.

    Only for passes that do not differentiate the weights (attacks, evaluation): a gradient
    tape opened inside the block does not see the casts made before it, so it would find no
    path back to the float32 variables.
    """
    if tf.executing_eagerly():
        yield
        return
    stack = _open_blocks()
    # Nested blocks in one graph share the outer one's casts.
    stack.append(_block_for_current_graph() or _CastBlock(tf.compat.v1.get_default_graph()))
    try:
        yield
    finally:
        stack.pop()


def cast_variable(variable: tf.Variable, dtype: tf.DType) -> Union[tf.Variable, tf.Tensor]:
    """The variable's value in ``dtype``, as every layer reads its weights.

    The variable itself when it already has that dtype (float32 graphs gain no op); inside
    ``cast_weights_once`` the block's one cast; else a new cast at this use, which gradients
    follow back to the float32 variable.
    """
    if variable.dtype == dtype:
        return variable
    block = _block_for_current_graph()
    if block is None:
        return tf.cast(variable, dtype)
    key = (variable.ref(), dtype)
    if key not in block.casts:
        with block.graph.as_default():
            block.casts[key] = tf.cast(variable, dtype)
    return block.casts[key]


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
