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
    losses = alp_losses(logits, one_hot, variables, hp)
    xent = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    lp = 0.5 * ((1 - 0) ** 2 + (2 - 0) ** 2) / 2  # mean over the 1 x 2 matrices
    wd = 0.01 * (1 + 4 + 9) / 2  # l2_loss is half the sum of squares
    assert losses["loss_xent"].numpy() == pytest.approx(xent, rel=1e-6)
    assert losses["loss_lp"].numpy() == pytest.approx(lp, rel=1e-6)
    assert losses["loss_wd"].numpy() == pytest.approx(wd, rel=1e-6)
    assert losses["total_loss"].numpy() == pytest.approx(xent + lp + wd, rel=1e-6)


def test_label_smoothing_spreads_mass_over_all_classes():
    hp = default_hparams().parse("label_smoothing=0.1,weight_decay=0.0")
    logits = tf.constant([[2.0, 0.0, 0.0, 0.0]])
    one_hot = tf.constant([[1.0, 0.0, 0.0, 0.0]])
    losses = alp_losses(logits, one_hot, [], hp)
    # Target (1 - 0.1) + 0.1 / 4 on class 0 and 0.1 / 4 on each of the 3 others (all K
    # classes, the true one included); log-softmax: 2 - log(e^2 + 3) and -log(e^2 + 3).
    log_z = math.log(math.exp(2.0) + 3.0)
    expected = -(0.925 * (2.0 - log_z) + 3 * 0.025 * (-log_z))
    assert losses["total_loss"].numpy() == pytest.approx(expected, rel=1e-6)
    assert set(losses) == {"loss_xent", "total_loss"}


def test_no_pairing_loss_with_zero_weight():
    logits = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    one_hot = tf.constant([[0.0, 1.0], [0.0, 1.0]])
    hp = default_hparams().parse("train_lp_weight=0.0,weight_decay=0.0")
    assert "loss_lp" not in alp_losses(logits, one_hot, [], hp)


def test_clean_logit_pairing_pairs_the_two_halves_of_the_clean_batch():
    """The original adds the pairing term whenever its weight is positive, attack or not."""
    hp = default_hparams().parse("label_smoothing=0.0,train_lp_weight=0.25,weight_decay=0.0")
    logits = tf.constant([[1.0, 2.0], [0.0, 4.0], [3.0, 1.0], [1.0, 1.0]])
    one_hot = tf.one_hot([1, 1, 0, 0], 2)
    losses = alp_losses(logits, one_hot, [], hp)
    # Halves [[1, 2], [0, 4]] and [[3, 1], [1, 1]]: squared differences 4, 1, 1, 9.
    assert losses["loss_lp"].numpy() == pytest.approx(0.25 * (4 + 1 + 1 + 9) / 4, rel=1e-6)
    assert losses["total_loss"].numpy() == pytest.approx(
        losses["loss_xent"].numpy() + losses["loss_lp"].numpy(), rel=1e-6)


def test_clean_training_step_adds_clean_logit_pairing():
    """The compiled step of train.py: loss_lp from the training-mode logits of the batch."""
    from adversarial_logit_pairing import model_lib, training

    hp = default_hparams().parse("batch_size=4,train_adv_method=clean,train_lp_weight=0.5,"
                                 "weight_decay=0.0,lr_schedule=fixed,learning_rate=0.01")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32))
    labels = tf.constant([0, 1, 2, 3], tf.int64)
    strategy = tf.distribute.get_strategy()
    state = training.build_train_state(strategy, "resnet_v2_tiny", 5, hp, 100000,
                                       moving_average_decay=-1, seed=1)
    twin = model_lib.get_model("resnet_v2_tiny", 5, seed=1)
    step = training.make_train_step(strategy, state.model, state.trainable, state.optimizer,
                                    state.ema, state.global_step, hp, 5, (-1.0, 1.0))
    outputs = step(images, labels)
    first, second = np.split(twin(images, is_training=True).numpy(), 2)
    expected = 0.5 * np.mean((first - second) ** 2)
    assert expected > 0
    assert float(outputs["loss_lp"]) == pytest.approx(expected, rel=1e-5)


def test_clean_logit_pairing_with_an_odd_batch_names_the_hparams():
    from adversarial_logit_pairing import training
    from adversarial_logit_pairing.errors import ConfigError

    hp = default_hparams().parse("batch_size=33,train_adv_method=clean,train_lp_weight=0.5")
    with pytest.raises(ConfigError, match="train_lp_weight=0.5 .*even batch_size, got 33"):
        training.check_logit_pairing(hp)
    # Adversarial pairing pairs each image with its copy: any batch size works.
    training.check_logit_pairing(hp.parse("train_adv_method=pgd_2_1_1"))
    training.check_logit_pairing(hp.parse("train_lp_weight=0.0"))
