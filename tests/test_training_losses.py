"""The ALP loss terms on hand-computable cases, and against TF1's loss functions."""

import math

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.hparams import default_hparams
from adversarial_logit_pairing.training import alp_losses, smoothed_cross_entropy


def test_smoothed_cross_entropy_matches_tf1_losses():
    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(6, 7)).astype(np.float32))
    one_hot = tf.one_hot([0, 1, 2, 3, 4, 5], 7)
    ours = smoothed_cross_entropy(one_hot, logits, 0.1)
    tf1 = tf.compat.v1.losses.softmax_cross_entropy(one_hot, logits, label_smoothing=0.1)
    np.testing.assert_allclose(ours.numpy(), tf1.numpy(), rtol=1e-6)


def test_alp_loss_terms_on_a_hand_computable_case():
    hp = default_hparams().parse("label_smoothing=0.0,train_lp_weight=0.5,weight_decay=0.01")
    # Clean logits [[1, 2]] and adversarial [[0, 0]]; both labelled class 1.
    logits = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    one_hot = tf.constant([[0.0, 1.0], [0.0, 1.0]])
    variables = [tf.Variable([1.0, 2.0]), tf.Variable([[3.0]])]
    losses = alp_losses(logits, one_hot, variables, hp, paired=True)
    xent = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    lp = 0.5 * ((1 - 0) ** 2 + (2 - 0) ** 2) / 2  # mean over the 1 x 2 matrices
    wd = 0.01 * (1 + 4 + 9) / 2  # l2_loss is half the sum of squares
    assert losses["loss_xent"].numpy() == pytest.approx(xent, rel=1e-6)
    assert losses["loss_lp"].numpy() == pytest.approx(lp, rel=1e-6)
    assert losses["loss_wd"].numpy() == pytest.approx(wd, rel=1e-6)
    assert losses["total_loss"].numpy() == pytest.approx(xent + lp + wd, rel=1e-6)


def test_label_smoothing_spreads_mass_over_all_classes():
    hp = default_hparams().parse("label_smoothing=0.1,weight_decay=0.0")
    logits = tf.constant([[0.0, 0.0, 0.0, 0.0]])
    one_hot = tf.constant([[1.0, 0.0, 0.0, 0.0]])
    losses = alp_losses(logits, one_hot, [], hp, paired=False)
    # Uniform logits: cross-entropy is log(4) whatever the (normalised) target.
    assert losses["total_loss"].numpy() == pytest.approx(math.log(4.0), rel=1e-6)
    assert set(losses) == {"loss_xent", "total_loss"}


def test_no_pairing_loss_for_plain_adversarial_training_or_zero_weight():
    logits = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    one_hot = tf.constant([[0.0, 1.0], [0.0, 1.0]])
    hp = default_hparams().parse("train_lp_weight=0.0,weight_decay=0.0")
    assert "loss_lp" not in alp_losses(logits, one_hot, [], hp, paired=True)
