"""APGD: the step-size schedule, checkpoints and momentum of the SPEC, and its strength."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import attacks
from adversarial_logit_pairing.attacks.apgd import apgd_single_run, checkpoint_decision
from tests.attack_models import LinearModel, TwoLayerNet, images, predictions

SEED = tf.constant([0, 0], tf.int64)


def test_checkpoints_follow_the_spec_formula():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), by hand:
    expected = [0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99]
    np.testing.assert_allclose(attacks.checkpoint_fractions(), expected)
    assert attacks.checkpoint_iterations(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for n_iter in (200, 300, 1000):
        assert attacks.checkpoint_iterations(n_iter) == [round(p * n_iter) for p in expected]
    # Tiny budgets: every period is at least one iteration.
    assert attacks.checkpoint_iterations(3) == [1, 2, 3]


class FlatModel(tf.Module):
    """Logits that ignore the input: the loss never rises, the gradient is zero."""

    def __call__(self, x):
        return tf.tile(tf.constant([[2.0, 1.0, 0.0]]), [tf.shape(x)[0], 1])


def test_step_halves_at_every_checkpoint_when_the_loss_never_rises():
    eps = 0.1
    run = apgd_single_run(FlatModel(), tf.zeros([2, 2, 2, 1]), tf.constant([0, 1]), None, SEED,
                          eps=eps, bounds=(-1.0, 1.0), loss="ce", n_iter=100)
    checks = [22, 41, 57, 70, 80, 87, 93, 99]
    # The step of iteration i (0-based) has been halved once per checkpoint passed before it.
    expected = [2 * eps / 2 ** sum(c <= i for c in checks) for i in range(100)]
    for column in run.step_sizes.numpy().T:
        np.testing.assert_allclose(column, expected, rtol=1e-6)
    assert run.step_sizes.numpy()[0, 0] == pytest.approx(2 * eps)  # the first step is 2 eps


def test_checkpoint_decision_matches_the_two_conditions():
    halve = checkpoint_decision(
        increases=tf.constant([15, 16, 16, 16, 16]),
        period=20,
        reduced_at_last_check=tf.constant([False, False, False, True, False]),
        best_loss=tf.constant([1.0, 1.0, 1.0, 1.0, 2.0]),
        best_loss_at_last_check=tf.constant([0.0, 0.0, 1.0, 1.0, 1.0]),
    ).numpy()
    # 15 <= 0.75 * 20 rises: oscillating, halve. 16 rises and a better best: keep.
    # Step not halved last time and no better best: halve. Halved last time: keep. Improved: keep.
    assert list(halve) == [True, False, True, False, False]


def _quadratic(v):
    """Two classes; the cross-entropy of class 0 rises as v approaches 0.3."""
    v = tf.reshape(v, [-1, 1])
    return tf.concat([tf.zeros_like(v), -10.0 * (v - 0.3) ** 2], axis=1)


@pytest.mark.parametrize("n_iter, best, steps", [
    (1, 0.5, [1.0]),
    (2, 0.5, [1.0, 1.0]),
    (3, 0.125, [1.0, 1.0, 0.5]),
])
def test_first_step_momentum_and_restart_from_best_on_a_hand_checked_case(n_iter, best, steps):
    # One pixel at 0, eps 0.5, start -0.5; n_iter 3 checks after every iteration.
    # 1: plain step of 2 eps: z = P(-0.5 + 1) = 0.5 (loss rises: 1 of 1 > 0.75, keep step).
    # 2: z = P(0.5 - 1) = -0.5, x = P(0.5 + 0.75 (-0.5 - 0.5) + 0.25 (0.5 + 0.5)) = 0
    #    (loss falls: halve to 0.5, restart from the best 0.5 with its gradient).
    # 3: z = P(0.5 - 0.5) = 0, x = 0.5 + 0.75 (0 - 0.5) + 0.25 (0.5 - 0.5) = 0.125 (new best).
    run = apgd_single_run(_quadratic, tf.zeros([1, 1, 1, 1]), tf.constant([0]), None, SEED,
                          eps=0.5, bounds=(-1.0, 1.0), loss="ce", n_iter=n_iter,
                          x_init=tf.fill([1, 1, 1, 1], -0.5))
    assert run.x_best_loss.numpy().ravel() == pytest.approx([best])
    np.testing.assert_allclose(run.step_sizes.numpy().ravel(), steps)


def test_apgd_is_seeded_stays_in_the_box_and_traces_the_model_a_fixed_number_of_times():
    x = images(12)
    traces = []
    for n_iter in (3, 9):
        model = TwoLayerNet()
        labels = predictions(model, x)
        model.traces = 0
        first = attacks.run_apgd(model, x, labels, eps=0.02, n_iter=n_iter, seed=(1, 2),
                                 batch_size=5)
        traces.append(model.traces)
        again = attacks.run_apgd(model, x, labels, eps=0.02, n_iter=n_iter, seed=(1, 2),
                                 batch_size=5)
        np.testing.assert_array_equal(first.x_adv.numpy(), again.x_adv.numpy())
        np.testing.assert_array_equal(first.robust.numpy(), again.robust.numpy())
        delta = first.x_adv.numpy() - x
        assert np.abs(delta).max() <= 0.02 + 1e-6
        assert first.x_adv.numpy().min() >= -1.0 and first.x_adv.numpy().max() <= 1.0
        # The returned robust mask is the model's verdict on the returned images.
        np.testing.assert_array_equal(
            first.robust.numpy(), predictions(model, first.x_adv.numpy()) == labels)
        survivors = first.robust.numpy()
        assert 0 < survivors.sum() < len(x)
        # Points the attack failed on come back clean, as the reference returns them.
        np.testing.assert_array_equal(first.x_adv.numpy()[survivors], x[survivors])
    assert traces[0] == traces[1]


def test_apgd_beats_or_matches_pgd_at_equal_iterations():
    model = TwoLayerNet(hidden=32, scale=8.0)
    x = images(64)
    labels = predictions(model, x)
    eps, n_iter = 0.04, 20
    apgd_robust = attacks.run_apgd(model, x, labels, eps=eps, n_iter=n_iter).robust.numpy()
    pgd_robust = {
        fraction: attacks.run_pgd_true_labels(model, x, labels, eps=eps, step_size=fraction * eps,
                                              n_iter=n_iter).robust.numpy().sum()
        for fraction in (0.1, 0.25, 1.0)
    }
    assert all(apgd_robust.sum() <= count for count in pgd_robust.values())
    assert apgd_robust.sum() < pgd_robust[0.1]  # a too small PGD step loses to APGD's schedule


def test_apgd_targeted_breaks_points_and_respects_the_robust_mask():
    model = LinearModel(num_classes=12, seed=4)
    x = images(8, shape=(4, 4, 3), low=-0.3, high=0.3)
    labels = predictions(model, x)
    eps = 1.2 * model.minimal_distance(x).max()
    only = np.arange(8) < 4
    result = attacks.run_apgd_targeted(model, x, labels, eps=eps, n_iter=5, robust=only)
    robust = result.robust.numpy()
    assert not robust.any()
    np.testing.assert_array_equal(result.x_adv.numpy()[4:], x[4:])  # not attacked
    assert (predictions(model, result.x_adv.numpy()[:4]) != labels[:4]).all()
