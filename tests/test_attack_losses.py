"""The strong attacks' losses against hand values, and AutoAttack's choice of targets."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import attacks
from adversarial_logit_pairing.attacks.losses import loss_function
from adversarial_logit_pairing.errors import ConfigError
from tests.attack_models import LinearModel, images

# Sorted decreasingly, row 0 is 3 > 2 > 1 > 0 (classes 0, 2, 1, 3).
LOGITS = tf.constant([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])


def test_dlr_matches_hand_values():
    # Label 0 (correct): -(3 - 2) / (3 - 1); label 2 (wrong): -(2 - 3) / (3 - 1).
    got = attacks.dlr_loss(LOGITS, tf.constant([0, 2])).numpy()
    np.testing.assert_allclose(got, [-0.5, 0.5], rtol=1e-6)


def test_targeted_dlr_matches_hand_values():
    # Denominator z_pi1 - (z_pi3 + z_pi4) / 2 = 3 - (1 + 0) / 2 = 2.5.
    got = attacks.targeted_dlr_loss(LOGITS, tf.constant([0, 1]), tf.constant([3, 0])).numpy()
    np.testing.assert_allclose(got, [-(3 - 0) / 2.5, -(1 - 3) / 2.5], rtol=1e-6)


def test_margin_and_cross_entropy_match_hand_values():
    np.testing.assert_allclose(attacks.margin_loss(LOGITS, tf.constant([0, 1])).numpy(),
                               [2 - 3, 3 - 1])
    np.testing.assert_allclose(
        attacks.targeted_margin_loss(LOGITS, tf.constant([0, 1]), tf.constant([2, 3])).numpy(),
        [2 - 3, 0 - 1])
    expected = np.log(np.exp([3, 1, 2, 0]).sum()) - 3
    np.testing.assert_allclose(attacks.cross_entropy(LOGITS[:1], tf.constant([0])).numpy(),
                               [expected], rtol=1e-6)


def test_dlr_is_invariant_to_scaling_and_shifting_the_logits():
    logits = tf.constant(np.random.default_rng(0).normal(size=(6, 10)), tf.float32)
    labels = tf.constant([0, 1, 2, 3, 4, 5])
    targets = tf.constant([9, 8, 7, 6, 5, 4])
    for loss, args in ((attacks.dlr_loss, ()), (attacks.targeted_dlr_loss, (targets,))):
        np.testing.assert_allclose(loss(1000.0 * logits + 7.0, labels, *args).numpy(),
                                   loss(logits, labels, *args).numpy(), rtol=1e-4)


def test_the_nine_targets_are_the_nine_highest_non_true_logits():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 12)).astype(np.float32)
    labels = np.array([0, 4, 11, 7, 2])
    got = attacks.top_targets(tf.constant(logits), tf.constant(labels), 9).numpy()
    for row, label, targets in zip(logits, labels, got):
        ranked = [c for c in np.argsort(-row) if c != label]
        assert list(targets) == ranked[:9]
        assert label not in targets


@pytest.mark.parametrize("name, classes", [("dlr", 2), ("dlr-targeted", 3)])
def test_dlr_with_too_few_classes_is_a_config_error(name, classes):
    with pytest.raises(ConfigError, match=f"{name}' needs at least"):
        loss_function(name, classes)
    loss_function(name, classes + 1)


def test_apgd_refuses_dlr_on_a_two_class_model_but_runs_the_margin():
    model = LinearModel(shape=(2, 2, 1), num_classes=2)
    x = images(4, shape=(2, 2, 1))
    labels = model(x).numpy().argmax(1)
    with pytest.raises(ConfigError, match="needs at least 3 classes"):
        attacks.run_apgd(model, x, labels, eps=0.1, loss="dlr", n_iter=2)
    attacks.run_apgd(model, x, labels, eps=0.1, loss="margin", n_iter=2)
