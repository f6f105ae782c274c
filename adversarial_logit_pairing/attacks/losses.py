"""Per-example attack losses on logits, written so that HIGHER is better for the attacker.

* ``ce``: softmax cross-entropy of the true label.
* ``margin``: ``max_{i != y} z_i - z_y``; positive exactly when the point is misclassified.
  The only margin-type loss defined for two classes.
* ``dlr``: Difference of Logits Ratio (Croce & Hein 2020),
  ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z_pi1 >= z_pi2 >= ...`` the
  sorted logits. Dividing by a difference of logits makes it invariant to a positive rescaling
  and a shift of the logits: a model whose softmax saturates (logits multiplied by 1000, as
  defensive distillation does) has vanishing cross-entropy gradients but the same DLR gradient
  direction, so it cannot hide behind the saturation. Needs >= 3 classes.
* ``dlr-targeted``: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``; needs >= 4 classes.
* ``margin-targeted``: ``z_t - z_y``, the targeted loss used where targeted DLR is undefined.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

# The smallest number of classes each loss is defined for.
MIN_CLASSES = {"ce": 2, "margin": 2, "dlr": 3, "dlr-targeted": 4, "margin-targeted": 2}
TARGETED_LOSSES = ("dlr-targeted", "margin-targeted")
# Keeps the DLR ratio finite when the top logits tie (the reference's constant).
_DLR_EPSILON = 1e-12


def _true_logit(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.gather(logits, tf.cast(labels, tf.int32), axis=1, batch_dims=1)


def _without_true(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``logits`` with the true class's entry set to -inf."""
    is_true = tf.equal(tf.range(tf.shape(logits)[1])[None, :], tf.cast(labels, tf.int32)[:, None])
    return tf.where(is_true, tf.constant(-float("inf"), logits.dtype), logits)


def _best_other_logit(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_max(_without_true(logits, labels), axis=1)


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Per-example softmax cross-entropy of ``labels`` [N] under ``logits`` [N, K]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )


def margin_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """``max_{i != y} z_i - z_y`` per example: > 0 exactly when the point is misclassified."""
    return _best_other_logit(logits, labels) - _true_logit(logits, labels)


def dlr_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Untargeted DLR ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` per example."""
    top3 = tf.math.top_k(logits, k=3).values
    return margin_loss(logits, labels) / (top3[:, 0] - top3[:, 2] + _DLR_EPSILON)


def targeted_dlr_loss(logits: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` per example."""
    top4 = tf.math.top_k(logits, k=4).values
    scale = top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3]) + _DLR_EPSILON
    return targeted_margin_loss(logits, labels, targets) / scale


def targeted_margin_loss(logits: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """``z_t - z_y`` per example."""
    return _true_logit(logits, targets) - _true_logit(logits, labels)


LossFn = Callable[[tf.Tensor, tf.Tensor, Optional[tf.Tensor]], tf.Tensor]


def loss_function(name: str, num_classes: Optional[int] = None) -> LossFn:
    """The loss called ``name`` as ``fn(logits, labels, targets)`` (targets ignored if untargeted).

    ``num_classes`` None skips the class-count check (for callers that made it already).

    Raises:
      ConfigError: for an unknown name, or a DLR loss with too few classes to define it (the
        denominator needs the 3rd (targeted: 4th) largest logit).
    """
    if name not in MIN_CLASSES:
        raise ConfigError(
            f"unknown attack loss {name!r}: expected one of {', '.join(MIN_CLASSES)}"
        )
    if num_classes is not None and num_classes < MIN_CLASSES[name]:
        alternative = "'margin-targeted'" if name in TARGETED_LOSSES else "'ce' or 'margin'"
        raise ConfigError(
            f"attack loss {name!r} needs at least {MIN_CLASSES[name]} classes, the model has "
            f"{num_classes}: use {alternative}"
        )
    if name == "ce":
        return lambda logits, labels, targets: cross_entropy(logits, labels)
    if name == "margin":
        return lambda logits, labels, targets: margin_loss(logits, labels)
    if name == "dlr":
        return lambda logits, labels, targets: dlr_loss(logits, labels)
    if name == "dlr-targeted":
        return targeted_dlr_loss
    return targeted_margin_loss


def top_targets(logits: tf.Tensor, labels: tf.Tensor, count: int) -> tf.Tensor:
    """The ``count`` classes with the highest logits other than the true one, highest first.

    These are AutoAttack's target classes: for a correctly classified point they are the 2nd to
    (count+1)-th largest logits, as the reference takes them.

    Returns:
      int32 [N, count].
    """
    return tf.math.top_k(_without_true(logits, labels), k=count).indices
