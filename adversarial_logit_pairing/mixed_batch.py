"""Kurakin et al.'s mixed batch: replace k of the m examples by adversarial ones, weigh by lambda.

Adversarial Machine Learning at Scale (Kurakin, Goodfellow and Bengio, ICLR 2017) trains on
minibatches of m examples of which k are replaced by their adversarial examples, made with the
current model, with the loss

    (sum_{clean} L(x_i, y_i) + lambda * sum_{adv} L(x_adv_i, y_i)) / ((m - k) + lambda * k)

(m = 32, k = 16, lambda = 0.3 in the paper). ALP's step (the default here) keeps all m clean
examples AND adds their m adversarial copies, a batch of 2m; the same weighted mean with
``lambda = 1`` is its plain batch mean, and other lambdas weigh its adversarial half the same
way: ``(sum_clean + lambda * sum_adv) / (m + lambda * m)``.

Hparams: ``train_adv_fraction`` (0: ALP's batch; in (0, 1]: k/m, ``k = round(fraction * m)``,
at least 1) and ``train_adv_loss_weight`` (lambda, >= 0). The first k examples of each batch are
the ones replaced (the batches are shuffled), and only they are attacked, so the attack costs
k/m of ALP's. The training batch is ``[clean rest; adversarial]``, labels in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import parse_attack_description
from adversarial_logit_pairing.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """How one replica's batch of m clean examples becomes its training batch.

    Attributes:
      num_replaced: k, the examples replaced by their adversarial examples; None for ALP's
        batch (all m examples plus their m adversarial copies).
      adv_loss_weight: lambda, the weight of each adversarial example's loss.
    """

    num_replaced: Optional[int] = None
    adv_loss_weight: float = 1.0

    @property
    def is_alp(self) -> bool:
        """ALP's batch with the plain mean loss (the original step, unchanged)."""
        return self.num_replaced is None and self.adv_loss_weight == 1.0

    def to_attack(self, images: tf.Tensor) -> tf.Tensor:
        """The examples to make adversarial: all of them (ALP) or the first k."""
        return images if self.num_replaced is None else images[:self.num_replaced]

    def training_batch(self, images: tf.Tensor, adv_images: tf.Tensor,
                       one_hot: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, Optional[tf.Tensor]]:
        """``(inputs, one_hot, example_weights)`` of the training pass.

        ``adv_images`` are the adversarial examples of ``to_attack(images)``. The weights are
        1 for a clean example and lambda for an adversarial one; None for the plain mean.
        """
        k = self.num_replaced
        if k is None:
            inputs = tf.concat([images, adv_images], axis=0)
            one_hot = tf.concat([one_hot, one_hot], axis=0)
            num_clean = tf.shape(images)[0]
        else:
            inputs = tf.concat([images[k:], adv_images], axis=0)
            one_hot = tf.concat([one_hot[k:], one_hot[:k]], axis=0)
            num_clean = tf.shape(images)[0] - k
        if self.is_alp:
            return inputs, one_hot, None
        weights = tf.concat([tf.ones([num_clean]),
                             tf.fill([tf.shape(adv_images)[0]], self.adv_loss_weight)], axis=0)
        return inputs, one_hot, weights


def from_hparams(hparams) -> MixedBatch:
    """The mixed batch ``train_adv_fraction`` and ``train_adv_loss_weight`` describe.

    Raises:
      ConfigError: naming the hparams, for a fraction outside [0, 1] or that replaces no
        example of ``batch_size``, a negative lambda, a weighted loss without adversarial
        examples (lambda of 0 with every example replaced), replacing examples without an
        attack (``train_adv_method=clean``) or with logit pairing (whose halves would not be
        pairs of an example and its adversarial example).
    """
    fraction, weight = hparams.train_adv_fraction, hparams.train_adv_loss_weight
    batch_size = hparams.batch_size
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"--hparams: train_adv_fraction={fraction} must be within [0, 1] "
                          "(0: ALP's batch of every example plus its adversarial copy)")
    if weight < 0:
        raise ConfigError(f"--hparams: train_adv_loss_weight={weight} must be >= 0")
    if fraction == 0:
        return MixedBatch(None, weight)
    k = int(round(fraction * batch_size))
    if k < 1:
        raise ConfigError(f"--hparams: train_adv_fraction={fraction} of batch_size="
                          f"{batch_size} replaces no example; use at least {1 / batch_size:.4g}")
    if k == batch_size and weight == 0:
        raise ConfigError("--hparams: train_adv_loss_weight=0 with every example replaced "
                          f"(train_adv_fraction={fraction}) leaves no loss")
    if parse_attack_description(hparams.train_adv_method).is_clean:
        raise ConfigError(f"--hparams: train_adv_fraction={fraction} replaces examples by "
                          "adversarial ones and needs an attack (train_adv_method)")
    if hparams.train_lp_weight > 0:
        raise ConfigError(f"--hparams: train_adv_fraction={fraction} with train_lp_weight="
                          f"{hparams.train_lp_weight}: logit pairing pairs each example with its "
                          "own adversarial example, which a mixed batch does not hold")
    return MixedBatch(k, weight)


def weighted_mean(per_example: tf.Tensor, weights: Optional[tf.Tensor]) -> tf.Tensor:
    """``sum(w * l) / sum(w)``: Kurakin's loss; the plain mean when ``weights`` is None."""
    if weights is None:
        return tf.reduce_mean(per_example)
    weights = tf.cast(weights, per_example.dtype)
    return tf.reduce_sum(weights * per_example) / tf.reduce_sum(weights)
