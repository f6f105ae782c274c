"""FAB-T and Square against linear models, whose minimal L-inf perturbation is analytic."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import attacks
from adversarial_logit_pairing.attacks.fab import fab_single_run, project_linf_onto_hyperplane
from adversarial_logit_pairing.attacks.square import square_fraction, square_side
from tests.attack_models import LinearModel, images, predictions


@pytest.mark.parametrize("point, b, expected", [
    ((0.0, 0.0), 1.5, (0.75, 0.75)),  # the box is not reached: |c| / ||w||_1 on each axis
    ((0.5, 0.0), 2.0, (0.5, 1.0)),  # the first axis stops at the box, the second goes on
    ((0.5, 0.5), 3.5, (0.5, 0.5)),  # the box corner (sum 2) falls short of 3.5: the corner
])
def test_projection_onto_a_hyperplane_in_a_box_matches_hand_values(point, b, expected):
    # Hyperplane x1 + x2 = b, box [-1, 1]^2.
    d = project_linf_onto_hyperplane(tf.constant([point]), tf.constant([[1.0, 1.0]]),
                                     tf.constant([b]), -1.0, 1.0).numpy()[0]
    np.testing.assert_allclose(d, expected, rtol=1e-6)


def test_projection_is_the_analytic_minimal_linf_move_when_the_box_is_far():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.1, 0.1, (5, 20)).astype(np.float32)
    w = rng.normal(size=(5, 20)).astype(np.float32)
    b = rng.normal(0, 0.5, 5).astype(np.float32)
    d = project_linf_onto_hyperplane(tf.constant(points), tf.constant(w), tf.constant(b),
                                     -1.0, 1.0).numpy()
    np.testing.assert_allclose(((points + d) * w).sum(1), b, atol=1e-5)
    analytic = np.abs((points * w).sum(1) - b) / np.abs(w).sum(1)
    np.testing.assert_allclose(np.abs(d).max(1), analytic, rtol=1e-5)


def _linear_case(shape=(4, 4, 3), n=6):
    model = LinearModel(shape=shape)
    x = images(n, shape=shape, low=-0.3, high=0.3)
    return model, x, predictions(model, x), model.minimal_distance(x)


def test_fab_finds_the_analytic_minimal_perturbation_of_a_linear_model():
    model, x, labels, analytic = _linear_case()
    logits = model(tf.constant(x))
    targets = attacks.top_targets(logits, tf.constant(labels), 4).numpy()
    found = np.full(len(x), np.inf)
    for column in targets.T:
        run = fab_single_run(model, tf.constant(x), labels, column, tf.constant(x),
                             bounds=(-1.0, 1.0), n_iter=10)
        found = np.minimum(found, run.distance.numpy())
        fooled = np.isfinite(run.distance.numpy())
        assert (predictions(model, run.x_adv.numpy()[fooled]) != labels[fooled]).all()
    # FAB's overshoot eta = 1.05 and its pull-back towards x keep it within 1% above the answer.
    assert (found >= analytic * (1 - 1e-4)).all()
    np.testing.assert_allclose(found, analytic, rtol=0.01)


def _one_pixel_two_classes(v):
    """Class 1 wins beyond v = 0.5."""
    v = tf.reshape(v, [-1, 1])
    return tf.concat([tf.zeros_like(v), v - 0.5], axis=1)


@pytest.mark.parametrize("n_iter, expected", [(1, 0.5115), (2, 0.50367368)])
def test_fab_steps_match_a_hand_checked_case(n_iter, expected):
    # x0 = 0, start 0.3, boundary 0.5. Step 1: d1 = 0.2, d2 = 0.5, alpha = min(0.2 / 0.7, 0.1)
    # = 0.1: x = 0.9 (0.3 + 1.05 * 0.2) + 0.1 (1.05 * 0.5) = 0.5115, adversarial: recorded,
    # pulled back to 0.9 * 0.5115 = 0.46035. Step 2: d1 = 0.03965, alpha = 0.03965 / 0.53965
    # (below 0.1): x = (1 - alpha)(0.46035 + 1.05 d1) + alpha * 0.525 = 0.50367..., closer.
    run = fab_single_run(_one_pixel_two_classes, tf.zeros([1, 1, 1, 1]), tf.constant([0]),
                         tf.constant([1]), tf.fill([1, 1, 1, 1], 0.3), bounds=(-1.0, 1.0),
                         n_iter=n_iter)
    assert run.distance.numpy()[0] == pytest.approx(expected, rel=1e-5)


def test_fab_targeted_breaks_a_point_only_within_eps():
    model, x, labels, analytic = _linear_case()
    broken = attacks.run_fab_targeted(model, x, labels, eps=1.01 * analytic.max(), n_iter=10)
    assert not broken.robust.numpy().any()
    delta = np.abs(broken.x_adv.numpy() - x).reshape(len(x), -1).max(1)
    assert (delta <= 1.01 * analytic.max() + 1e-6).all()
    assert (predictions(model, broken.x_adv.numpy()) != labels).all()
    unbroken = attacks.run_fab_targeted(model, x, labels, eps=0.99 * analytic.min(), n_iter=10)
    assert unbroken.robust.numpy().all()
    np.testing.assert_array_equal(unbroken.x_adv.numpy(), x)


def test_square_fraction_follows_the_reference_schedule():
    assert [square_fraction(i, 10000) for i in (0, 10, 11, 50, 51, 201, 1001, 8001)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.8 / 32, 0.8 / 512]
    assert square_fraction(6, 5000) == 0.4  # rescaled: query 6 of 5000 is query 12 of 10000
    assert square_fraction(6, 5000, rescale_schedule=False) == 0.8
    assert square_side(0.8, 32, 32) == 29 and square_side(0.8 / 512, 8, 8) == 1


def test_square_breaks_a_linear_model_just_above_the_analytic_distance_and_never_below():
    model, x, labels, analytic = _linear_case(shape=(3, 3, 1), n=8)
    eps = 1.05 * analytic.max()
    result = attacks.run_square(model, x, labels, eps=eps, n_queries=200, seed=(3, 4))
    assert not result.robust.numpy().any()
    assert np.abs(result.x_adv.numpy() - x).max() <= eps + 1e-6
    assert (predictions(model, result.x_adv.numpy()) != labels).all()
    again = attacks.run_square(model, x, labels, eps=eps, n_queries=200, seed=(3, 4))
    np.testing.assert_array_equal(result.x_adv.numpy(), again.x_adv.numpy())
    below = attacks.run_square(model, x, labels, eps=0.98 * analytic.min(), n_queries=200)
    assert below.robust.numpy().all()


def test_gradient_masking_stops_the_gradient_attacks_but_not_square():
    shape = (8, 8, 3)
    # Input quantisation: tf.round passes no gradient, so APGD and FAB see zero gradients.
    model = LinearModel(shape=shape, quantize=64, bias_scale=10.0)
    x = images(200, shape=shape, low=-0.8, high=0.8)
    distance = model.minimal_distance(x)
    # Points between 1.5 and 3 times inside eps: far beyond what a random start reaches in
    # 192 dimensions, easy for a search that sees the outputs.
    scale = np.percentile(distance, 75)
    keep = (distance > 0.5 * scale) & (distance < scale)
    x = x[keep][:6]
    labels = predictions(model, x)
    eps = 1.5 * scale
    for attack in (attacks.run_apgd, attacks.run_apgd_targeted, attacks.run_fab_targeted):
        assert attack(model, x, labels, eps=eps, n_iter=5).robust.numpy().all(), attack
    assert not attacks.run_square(model, x, labels, eps=eps, n_queries=300).robust.numpy().any()


def test_fab_and_square_trace_the_model_a_fixed_number_of_times_whatever_the_budget():
    x = images(4, shape=(3, 3, 1), low=-0.3, high=0.3)
    for attack, budget, settings in ((attacks.run_fab_targeted, "n_iter", {"n_target_classes": 1}),
                                     (attacks.run_square, "n_queries", {})):
        traces = []
        for count in (2, 12):
            model = LinearModel(shape=(3, 3, 1))
            labels = predictions(model, x)
            model.traces = 0
            attack(model, x, labels, eps=1e-3, **{budget: count}, **settings)
            traces.append(model.traces)
        assert traces[0] == traces[1] > 0, attack
