"""Tests for the learning-rate schedules against TF1's exponential_decay / piecewise_constant."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import HParams, default_hparams
from adversarial_logit_pairing.lr_schedules import get_lr_schedule


def _tf1_value(schedule_or_tensor):
    # In eager mode the compat.v1 decay functions return a callable.
    value = schedule_or_tensor() if callable(schedule_or_tensor) else schedule_or_tensor
    return np.float32(value.numpy())


def test_exp_decay_matches_tf1_staircase_exponential_decay():
    hp = default_hparams()
    # 1000 / 32 = 31.25 steps per epoch; int(31.25 * 2.0) = 62 steps per decay.
    schedule, steps_per_epoch = get_lr_schedule(hp, examples_per_epoch=1000)
    assert steps_per_epoch == 31.25
    for step in [0, 1, 61, 62, 63, 123, 124, 1000, 123456]:
        expected = tf.compat.v1.train.exponential_decay(
            0.045, tf.constant(step, tf.int64), 62, 0.94, staircase=True)
        got = schedule(step)
        assert got.dtype == tf.float32
        assert np.float32(got.numpy()) == _tf1_value(expected), step
    assert schedule(61).numpy() == np.float32(0.045)
    np.testing.assert_allclose(schedule(62).numpy(), 0.045 * 0.94, rtol=1e-6)
    np.testing.assert_allclose(schedule(124).numpy(), 0.045 * 0.94**2, rtol=1e-6)


def test_replicas_divide_steps_per_epoch_and_multiply_the_rate():
    hp = default_hparams()
    schedule, steps_per_epoch = get_lr_schedule(hp, 1000, replicas_to_aggregate=2)
    assert steps_per_epoch == 15.625
    # int(15.625 * 2.0) = 31 steps per decay, rate doubled.
    for step in [0, 30, 31, 62, 100]:
        expected = tf.compat.v1.train.exponential_decay(
            0.045, tf.constant(step, tf.int64), 31, 0.94, staircase=True)
        assert schedule(step).numpy() == _tf1_value(expected) * np.float32(2), step
    np.testing.assert_allclose(schedule(31).numpy(), 2 * 0.045 * 0.94, rtol=1e-6)


def test_non_positive_replicas_leave_rate_and_steps_alone():
    hp = default_hparams()
    schedule, steps_per_epoch = get_lr_schedule(hp, 1000, replicas_to_aggregate=0)
    assert steps_per_epoch == 31.25
    assert schedule(0).numpy() == np.float32(0.045)


def test_step_schedule_matches_tf1_piecewise_constant_without_learning_rate():
    # learning_rate must not scale the 'step' values: the original used lr_list as given.
    hp = default_hparams().parse("lr_schedule=step,learning_rate=7.0")
    schedule, steps_per_epoch = get_lr_schedule(hp, examples_per_epoch=320)  # 10 steps/epoch
    assert steps_per_epoch == 10.0
    boundaries = [10, 20, 30, 40, 50, 300, 600, 800, 900]
    for step in [0, 9, 10, 11, 20, 21, 50, 51, 299, 300, 301, 900, 901, 10**6]:
        expected = tf.compat.v1.train.piecewise_constant(
            tf.constant(step, tf.int64), boundaries, hp.lr_list)
        assert schedule(tf.constant(step, tf.int64)).numpy() == _tf1_value(expected), step
    # Hand-checked: lr_list[0] up to and including the first boundary, then lr_list[1].
    assert schedule(10).numpy() == np.float32(1 / 6)
    assert schedule(11).numpy() == np.float32(2 / 6)
    assert schedule(901).numpy() == np.float32(0.0001)


def test_step_schedule_truncates_fractional_boundaries():
    hp = default_hparams().parse("lr_schedule=step,lr_list=[0.3,0.2,0.1],lr_decay_epochs=[1,3]")
    schedule, steps_per_epoch = get_lr_schedule(hp, examples_per_epoch=100)  # 3.125 steps/epoch
    assert steps_per_epoch == 3.125
    # Boundaries int(3.125) = 3 and int(9.375) = 9.
    values = [float(schedule(s).numpy()) for s in [3, 4, 9, 10]]
    np.testing.assert_array_equal(values, np.float32([0.3, 0.2, 0.2, 0.1]))


def test_step_schedule_with_a_single_value_is_constant():
    hp = default_hparams().parse("lr_schedule=step,lr_list=[0.25],lr_decay_epochs=[]")
    schedule, _ = get_lr_schedule(hp, 1000, replicas_to_aggregate=3)
    assert schedule(0).numpy() == schedule(10**5).numpy() == np.float32(0.25) * 3


def test_fixed_schedule_is_the_learning_rate_times_replicas():
    hp = default_hparams().parse("lr_schedule=fixed,learning_rate=0.01")
    schedule, _ = get_lr_schedule(hp, 1000, replicas_to_aggregate=4)
    assert schedule(0).numpy() == schedule(10**6).numpy() == np.float32(0.01 * 4)


def test_schedule_reads_an_int64_variable_in_tf_function_and_xla():
    schedule, _ = get_lr_schedule(default_hparams(), 1000)
    step = tf.Variable(0, dtype=tf.int64)
    plain = tf.function(lambda: schedule(step))
    compiled = tf.function(lambda: schedule(step), jit_compile=True)
    for value in [0, 62, 200]:
        step.assign(value)
        expected = schedule(value).numpy()
        assert plain().numpy() == expected
        np.testing.assert_allclose(compiled().numpy(), expected, rtol=1e-6)

    step_hp = default_hparams().parse("lr_schedule=step")
    step_schedule, _ = get_lr_schedule(step_hp, 320)
    compiled_step = tf.function(lambda: step_schedule(step), jit_compile=True)
    for value in [10, 11, 901]:
        step.assign(value)
        assert compiled_step().numpy() == step_schedule(value).numpy()


def test_exp_decay_rejects_less_than_one_step_between_decays():
    hp = default_hparams()  # 10 / 32 * 2.0 = 0.625 -> 0 steps per decay
    with pytest.raises(ConfigError, match="lr_num_epochs_per_decay.*less than one step"):
        get_lr_schedule(hp, examples_per_epoch=10)


def test_unknown_schedule_is_a_config_error():
    # HParams(...) itself does not validate, so a bad value can reach get_lr_schedule.
    hp = HParams(**dict(default_hparams().values(), lr_schedule="cosine"))
    with pytest.raises(ConfigError, match="lr_schedule.*'cosine'"):
        get_lr_schedule(hp, 1000)


def test_step_schedule_with_mismatched_lists_is_a_config_error():
    hp = HParams(**dict(default_hparams().values(), lr_schedule="step", lr_list=[0.1]))
    with pytest.raises(ConfigError, match="lr_list needs one more value"):
        get_lr_schedule(hp, 1000)
