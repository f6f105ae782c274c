"""The EfficientNet recipe's hparams: warm-up, 0.97 every 2.4 epochs, drop-connect, augment.

The decay is TF1's own ``tf.compat.v1.train.exponential_decay``; the warm-up is checked
against tensorflow/tpu's formula ``lr * float32(step) / float32(warmup_steps)`` by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import model_lib, training
from adversarial_logit_pairing.datasets.autoaugment import Augmentation
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import default_hparams
from adversarial_logit_pairing.lr_schedules import get_lr_schedule
from adversarial_logit_pairing.models import create_model

# 320 examples / batch 32 = 10 steps per epoch: warm-up int(5 * 10) = 50 steps, decay every
# int(2.4 * 10) = 24 steps.
RECIPE = ("learning_rate=0.016,lr_warmup_epochs=5,lr_decay_factor=0.97,"
          "lr_num_epochs_per_decay=2.4")


def _tf1_decay(step: int, decay_steps: int) -> np.float32:
    rate = tf.compat.v1.train.exponential_decay(0.016, tf.constant(step, tf.int64),
                                                decay_steps, 0.97, staircase=True)
    return np.float32((rate() if callable(rate) else rate).numpy())


def test_warmup_rises_linearly_then_hands_over_to_tf1_exponential_decay():
    schedule, steps_per_epoch = get_lr_schedule(default_hparams().parse(RECIPE), 320)
    assert steps_per_epoch == 10.0
    for step in [0, 1, 25, 49, 50, 51, 71, 72, 100, 1000]:
        got = schedule(tf.constant(step, tf.int64))
        assert got.dtype == tf.float32
        if step < 50:
            expected = np.float32(0.016) * np.float32(step) / np.float32(50)
        else:
            expected = _tf1_decay(step, 24)
        assert np.float32(got.numpy()) == expected, step
    # Hand values: half-way through the warm-up; at its end the decay has run twice.
    np.testing.assert_allclose(schedule(25).numpy(), 0.008, rtol=1e-6)
    np.testing.assert_allclose(schedule(50).numpy(), 0.016 * 0.97 ** 2, rtol=1e-6)
    np.testing.assert_allclose(schedule(72).numpy(), 0.016 * 0.97 ** 3, rtol=1e-6)


def test_warmup_is_scaled_by_replicas_and_works_in_a_tf_function():
    schedule, steps_per_epoch = get_lr_schedule(default_hparams().parse(RECIPE), 320,
                                                replicas_to_aggregate=2)
    assert steps_per_epoch == 5.0  # warm-up 25 steps, decay every 12
    step = tf.Variable(0, dtype=tf.int64)
    rate = tf.function(lambda: schedule(step))
    for value in [10, 30]:
        step.assign(value)
        expected = (np.float32(0.016) * np.float32(10) / np.float32(25) * 2 if value == 10
                    else _tf1_decay(30, 12) * np.float32(2))
        assert np.float32(rate().numpy()) == expected, value


def test_warmup_goes_in_front_of_every_schedule_and_is_off_by_default():
    fixed, _ = get_lr_schedule(default_hparams().parse(
        "lr_schedule=fixed,learning_rate=0.2,lr_warmup_epochs=1"), 320)
    assert [float(fixed(s)) for s in (0, 5, 10, 99)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    plain, _ = get_lr_schedule(default_hparams().parse(
        "learning_rate=0.016,lr_decay_factor=0.97,lr_num_epochs_per_decay=2.4"), 320)
    assert np.float32(plain(0).numpy()) == np.float32(0.016)  # no warm-up
    with pytest.raises(ConfigError, match="lr_warmup_epochs"):
        get_lr_schedule(default_hparams().parse("lr_warmup_epochs=0.05"), 320)


@pytest.mark.parametrize("text, name", [
    ("lr_warmup_epochs=-1", "lr_warmup_epochs"),
    ("drop_connect_rate=1.0", "drop_connect_rate"),
    ("drop_connect_rate=-0.5", "drop_connect_rate"),
    ("augment=cutmix", "augment"),
    ("randaugment_num_layers=-1", "randaugment_num_layers"),
    ("randaugment_magnitude=-3", "randaugment_magnitude"),
])
def test_bad_recipe_hparams_are_config_errors_naming_the_hparam(text, name):
    with pytest.raises(ConfigError, match=f"'{name}'"):
        default_hparams().parse(text)


def test_augment_hparams_select_the_augmentation():
    hparams = default_hparams().parse(
        "augment=randaugment,randaugment_num_layers=3,randaugment_magnitude=15")
    assert Augmentation.from_hparams(hparams) == Augmentation("randaugment", 3, 15.0)
    assert not Augmentation.from_hparams(default_hparams()).enabled


@pytest.fixture(scope="module")
def b0():
    return create_model("efficientnet_b0", 10, seed=0)


def test_drop_connect_rate_sets_each_blocks_survival_probability(b0):
    blocks = len(b0.blocks)
    assert blocks == 16
    # -1: the model's own, tensorflow/tpu's 0.2.
    model_lib.set_drop_connect_rate(b0, -1.0)
    assert [b.survival_prob for b in b0.blocks] == pytest.approx(
        [1 - 0.2 * i / 16 for i in range(16)])
    model_lib.set_drop_connect_rate(b0, 0.5)
    assert b0.blocks[8].survival_prob == pytest.approx(0.75)  # 1 - 0.5 * 8 / 16
    assert b0.blocks[15].survival_prob == pytest.approx(1 - 0.5 * 15 / 16)
    model_lib.set_drop_connect_rate(b0, 0.0)
    assert all(b.survival_prob == 1.0 for b in b0.blocks)


def test_drop_connect_off_makes_a_residual_block_deterministic_in_training(b0):
    block = b0.blocks[14]  # the last block of the 4-repeat stage: it has the identity skip
    assert block.has_skip
    inputs = tf.random.stateless_normal([8, 4, 4, block.args.input_filters], seed=[1, 2])
    model_lib.set_drop_connect_rate(b0, 0.0)
    first, second = block(inputs, is_training=True), block(inputs, is_training=True)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    model_lib.set_drop_connect_rate(b0, 0.9)  # survival 1 - 0.9 * 14 / 16: about 21%
    draws = [block(inputs, is_training=True).numpy() for _ in range(3)]
    assert any(not np.array_equal(draw, first.numpy()) for draw in draws)
    model_lib.set_drop_connect_rate(b0, -1.0)


def test_a_positive_drop_connect_rate_needs_a_model_with_drop_connect():
    with pytest.raises(ConfigError, match="'drop_connect_rate=0.3'.*resnet_v2_tiny"):
        training.build_train_state(tf.distribute.get_strategy(), "resnet_v2_tiny", 10,
                                   default_hparams().parse("drop_connect_rate=0.3"), 320)
    resnet = create_model("resnet_v2_tiny", 10, seed=0)
    model_lib.set_drop_connect_rate(resnet, 0.0)  # off: nothing to turn off, accepted
