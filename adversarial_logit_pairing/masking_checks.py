"""Tell-tales of gradient masking, printed beside a strong-attack report; they only warn.

A model can look robust because its gradients are useless (a non-differentiable input
transform, a saturated softmax, shattered or stochastic gradients), not because no adversarial
example exists nearby (Athalye, Carlini, Wagner 2018; Croce & Hein 2020). The standard checks:

* ``square_after_gradients``: the gradient-free Square attack breaks points that every
  gradient attack before it (APGD-CE, APGD-T, FAB-T) failed on.
* ``useless_gradients``: many correctly classified points have an input gradient of the
  cross-entropy that is exactly zero, or not finite.
* ``eps_not_monotone``: robust accuracy does not fall when eps grows (run at a second eps).
* ``training_attack_gap``: the (usually weaker) training attack leaves far more accuracy than
  the strong one, as ALP's PGD did (27.9% against about 0.1-0.6%, SPEC section 5).

Each check returns a one-line warning or None. None of them changes a number of the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn, compiled_for

# Square breaking more than this share of the points the gradient attacks left (and at least
# one point) is suspicious: on an honest model the gradient attacks leave it almost nothing.
SQUARE_SHARE = 0.05
# A share of correctly classified points with a zero or non-finite input gradient above this.
USELESS_GRADIENT_SHARE = 0.10
# Robust accuracy at the larger eps must fall by at least this much (absolute) below the
# smaller eps's, unless the smaller is already (nearly) zero.
EPS_MIN_DROP = 0.0
# The training attack's accuracy above the strong attack's by more than this (absolute). ALP's
# gaps were 27 and 28 points (SPEC section 5); a 20-step PGD on the cross-entropy of an
# honest, plainly trained 5-class linear model was measured 17.5 points above the analytic
# robust accuracy (65% against 47.5%: maximising the cross-entropy is not minimising the
# margin), so smaller gaps are not taken as a sign of masking.
TRAINING_GAP = 0.20

GRADIENT_STAGES = ("apgd-ce", "apgd-t", "fab-t", "apgdce", "apgddlr", "apgdmargin", "apgdt",
                   "fabt", "pgdtrue")


class GradientStats(NamedTuple):
    """Counts over the correctly classified points of the input gradients of the true-label
    cross-entropy: how many are all zero, how many hold a NaN or an infinity."""

    examples: int
    zero: int
    nonfinite: int

    def __add__(self, other: GradientStats) -> GradientStats:  # type: ignore[override]
        return GradientStats(*(a + b for a, b in zip(self, other)))

    @property
    def useless_share(self) -> float:
        return (self.zero + self.nonfinite) / self.examples if self.examples else 0.0


def _gradient_flags(model_fn: ModelFn, x: tf.Tensor, labels: tf.Tensor):
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model_fn(x)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=tf.cast(logits, tf.float32)))
    # A path that is cut (tf.round, tf.stop_gradient) counts as a zero gradient.
    grad = tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grad = tf.reshape(grad, [tf.shape(x)[0], -1])
    nonfinite = tf.reduce_any(tf.logical_not(tf.math.is_finite(grad)), axis=1)
    zero = tf.logical_and(tf.reduce_all(tf.equal(grad, 0.0), axis=1), tf.logical_not(nonfinite))
    correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)
    return correct, zero, nonfinite


def gradient_stats(model_fn: ModelFn, x: np.ndarray, labels: np.ndarray) -> GradientStats:
    """:class:`GradientStats` of ``model_fn`` (images -> logits) at the clean images ``x``."""
    flags = compiled_for(model_fn, ("masking_checks.gradients",), _gradient_flags)
    correct, zero, nonfinite = (t.numpy() for t in flags(
        tf.constant(x, tf.float32), tf.constant(np.asarray(labels), tf.int32)))
    return GradientStats(int(correct.sum()), int((zero & correct).sum()),
                         int((nonfinite & correct).sum()))


def square_after_gradients(stages: Sequence[tuple[str, int, int]]) -> Optional[str]:
    """``stages``: (name, points attacked, points robust after) in order."""
    names = [name for name, _, _ in stages]
    if "square" not in names:
        return None
    index = names.index("square")
    if not any(name in GRADIENT_STAGES for name in names[:index]):
        return None
    _, attacked, robust = stages[index]
    broken = attacked - robust
    if broken >= 1 and broken > SQUARE_SHARE * attacked:
        return (f"gradient masking? the gradient-free Square attack broke {broken} of the "
                f"{attacked} points every gradient attack before it failed on "
                f"(> {SQUARE_SHARE:.0%})")
    return None


def useless_gradients(stats: GradientStats) -> Optional[str]:
    if stats.examples and stats.useless_share > USELESS_GRADIENT_SHARE:
        return (f"gradient masking? {stats.zero} zero and {stats.nonfinite} non-finite input "
                f"gradients among {stats.examples} correctly classified points "
                f"({stats.useless_share:.0%} > {USELESS_GRADIENT_SHARE:.0%})")
    return None


def eps_not_monotone(eps: int, accuracy: float, larger_eps: int,
                     larger_accuracy: float) -> Optional[str]:
    """Accuracies at ``eps`` and at ``larger_eps`` (either order accepted)."""
    if larger_eps < eps:
        eps, accuracy, larger_eps, larger_accuracy = larger_eps, larger_accuracy, eps, accuracy
    if larger_eps == eps or accuracy <= 0.0:
        return None
    if larger_accuracy >= accuracy - EPS_MIN_DROP:
        return (f"gradient masking? robust accuracy did not fall as eps grew: "
                f"{accuracy:.2%} at eps {eps}/255, {larger_accuracy:.2%} at eps {larger_eps}/255")
    return None


def training_attack_gap(training_method: str, training_accuracy: float,
                        strong_method: str, strong_accuracy: float) -> Optional[str]:
    if training_accuracy - strong_accuracy > TRAINING_GAP:
        return (f"gradient masking? {training_method} leaves {training_accuracy:.2%} accuracy, "
                f"{strong_method} {strong_accuracy:.2%} (more than {TRAINING_GAP:.0%} "
                "apart): the training attack overestimates robustness")
    return None
