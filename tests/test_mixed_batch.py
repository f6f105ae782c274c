"""Kurakin et al.'s mixed batch: k of m examples replaced, loss weighted by lambda."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import mixed_batch, training
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import default_hparams
from tests.linear_classifiers import (
    LinearClassifier,
    hand_step_ll,
    one_train_step,
    smoothed_xent,
)

NUM_CLASSES = 5


def _kurakin(clean_losses, adv_losses, lam):
    """(sum_clean + lambda * sum_adv) / ((m - k) + lambda * k)."""
    return ((np.sum(clean_losses) + lam * np.sum(adv_losses))
            / (len(clean_losses) + lam * len(adv_losses)))


def test_kurakin_loss_weighs_the_adversarial_examples_by_lambda():
    """m = 8, k = 4, lambda = 0.3 (the paper's): the batch is [x_4..x_7; adv(x_0..x_3)]."""
    hp = default_hparams().parse("batch_size=8,train_adv_method=stepll_16,"
                                 "train_adv_fraction=0.5,train_adv_loss_weight=0.3")
    mixing = mixed_batch.from_hparams(hp)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (8, 2, 2, 3)).astype(np.float32))
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    to_attack = mixing.to_attack(images)
    np.testing.assert_array_equal(to_attack.numpy(), images.numpy()[:4])
    adv = to_attack + 0.5
    inputs, one_hot, weights = mixing.training_batch(images, adv, tf.one_hot(labels, 5))
    np.testing.assert_array_equal(inputs.numpy(), np.concatenate([images[4:], adv]))
    order = np.concatenate([labels[4:], labels[:4]])
    np.testing.assert_array_equal(one_hot.numpy().argmax(1), order)

    logits = rng.normal(0, 2, (8, NUM_CLASSES)).astype(np.float32)
    loss = training.alp_losses(tf.constant(logits), one_hot, [], hp,
                               example_weights=weights)["loss_xent"]
    per_example = smoothed_xent(logits, order)
    expected = _kurakin(per_example[:4], per_example[4:], 0.3)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - per_example.mean()) > 1e-3  # lambda changes the loss here


def test_defaults_keep_alp_batch_and_plain_mean():
    mixing = mixed_batch.from_hparams(default_hparams().parse("train_adv_method=pgd_2_1_1"))
    assert mixing == mixed_batch.MixedBatch(None, 1.0)
    images = tf.ones([3, 2, 2, 3])
    inputs, one_hot, weights = mixing.training_batch(images, -images, tf.one_hot([0, 1, 2], 3))
    np.testing.assert_array_equal(inputs.numpy(), np.concatenate([images, -images]))
    np.testing.assert_array_equal(one_hot.numpy().argmax(1), [0, 1, 2, 0, 1, 2])
    assert weights is None


@pytest.mark.parametrize("text, message", [
    ("train_adv_fraction=1.5", r"train_adv_fraction=1.5 must be within \[0, 1\]"),
    ("train_adv_loss_weight=-0.1", "train_adv_loss_weight=-0.1 must be >= 0"),
    ("train_adv_fraction=0.01", "replaces no example"),
    ("train_adv_fraction=1.0,train_adv_loss_weight=0", "leaves no loss"),
    ("train_adv_fraction=0.5,train_adv_method=clean", "needs an attack"),
    ("train_adv_fraction=0.5,train_lp_weight=0.5", "logit pairing pairs"),
])
def test_bad_mixed_batch_hparams_are_named(text, message, tmp_path):
    if "train_adv_method" not in text:
        text = "train_adv_method=stepll_16," + text
    with pytest.raises(ConfigError, match=message):
        mixed_batch.from_hparams(default_hparams().parse(text))
    # train.py checks them before building anything.
    with pytest.raises(ConfigError, match=message):
        training.validate(training.TrainConfig(str(tmp_path), model_name="resnet_v2_tiny",
                                               dataset="tiny_imagenet", hparams=text))


def test_training_step_attacks_only_the_replaced_examples_and_weighs_their_loss():
    """train.py's step with train_adv_fraction=0.5, lambda 0.3 on a batch of 4: the
    adversarial examples are Step-LL's of x_0, x_1 and the reported cross-entropy is Kurakin's
    loss of [x_2, x_3; adv(x_0), adv(x_1)], both by hand from the weights before the step."""
    hp = default_hparams().parse(
        "batch_size=4,train_adv_method=stepll_8,train_adv_fraction=0.5,"
        "train_adv_loss_weight=0.3,weight_decay=0.0,lr_schedule=fixed,learning_rate=0.01")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 4, 4, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    model = LinearClassifier((4, 4, 3), NUM_CLASSES)
    adv = hand_step_ll(model, images[:2], 8 * 2.0 / 255)
    logits = model.numpy_heads(np.concatenate([images[2:], adv]))[0]
    per_example = smoothed_xent(logits, np.concatenate([labels[2:], labels[:2]]))
    expected = _kurakin(per_example[:2], per_example[2:], 0.3)

    outputs = one_train_step(model, hp, images, labels, NUM_CLASSES)
    assert outputs["adv_images"].shape[0] == 2
    np.testing.assert_allclose(outputs["adv_images"].numpy(), adv, atol=1e-6)
    assert float(outputs["loss_xent"]) == pytest.approx(expected, rel=1e-5)
    assert float(outputs["total_loss"]) == pytest.approx(expected, rel=1e-5)
