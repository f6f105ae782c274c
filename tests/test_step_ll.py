"""Step-LL, Kurakin's random-eps Step-LL and R+Step-LL against hand-computed updates.

The model is linear, ``z = flat(x) @ W + b``, so the gradient of the attack loss (label-smoothed
cross-entropy of the least-likely class, summed over the batch) is written out in numpy
(``tests.linear_classifiers.hand_gradient``).
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack as aa
from adversarial_logit_pairing.errors import ConfigError
from tests.linear_classifiers import LinearClassifier, hand_gradient, hand_step_ll

BOUNDS = (-1.0, 1.0)
SCALE = 2.0 / 255  # one level of the 0..255 scale in model units, for BOUNDS
SHAPE = (4, 4, 3)
NUM_CLASSES = 5


def _images(n, seed=1, low=-1.0, high=1.0, shape=SHAPE):
    return np.random.default_rng(seed).uniform(low, high, (n,) + shape).astype(np.float32)


def test_step_ll_descends_the_least_likely_class_loss_by_eps_sign():
    model = LinearClassifier(SHAPE, NUM_CLASSES)
    x = _images(6)
    x[:, 0, 0, :] = 1.0  # at the bounds: the step must be clipped there
    x[:, 0, 1, :] = -1.0
    eps = 16 * SCALE
    adv = aa.generate_adversarial_examples(tf.constant(x), BOUNDS, model.inference,
                                           "stepll_16").numpy()
    np.testing.assert_allclose(adv, hand_step_ll(model, x, eps), atol=1e-6)
    # The clip mattered, and the least-likely class's logit went up.
    assert np.any(np.abs(x - eps * np.sign(hand_gradient(model, x))) > 1.0)
    z, z_adv = model.numpy_heads(x)[0], model.numpy_heads(adv)[0]
    rows = np.arange(len(x))
    assert np.all(z_adv[rows, z.argmin(1)] > z[rows, z.argmin(1)])


def test_r_step_ll_takes_a_random_sign_step_then_a_step_ll_step_from_there():
    """rstepll_12_4: delta = 4 s + 8 g (0..255 units) with s, g in {-1, +1}: each pixel's
    delta in {-12, -4, 4, 12} names its random sign s and its gradient sign g, and g must be
    the Step-LL step at x' = x + 4 s (images kept away from the bounds: no clipping)."""
    model = LinearClassifier(SHAPE, NUM_CLASSES)
    x = _images(16, low=-0.8, high=0.8)
    model_fn = model.inference
    adv = aa.generate_adversarial_examples(tf.constant(x), BOUNDS, model_fn, "rstepll_12_4",
                                           seed=(5, 6)).numpy()
    levels = (adv - x) / SCALE
    np.testing.assert_allclose(np.abs(levels), np.where(np.abs(levels) > 8, 12, 4), atol=1e-3)
    g = np.sign(levels)
    s = np.rint((levels - 8 * g) / 4)
    x_prime = x + 4 * SCALE * s
    np.testing.assert_array_equal(g, -np.sign(hand_gradient(model, x_prime)))
    # The first step is a random sign: about half of each, and another seed draws others.
    assert 0.4 < np.mean(s > 0) < 0.6
    again = aa.generate_adversarial_examples(tf.constant(x), BOUNDS, model_fn, "rstepll_12_4",
                                             seed=(5, 6)).numpy()
    np.testing.assert_array_equal(again, adv)
    other = aa.generate_adversarial_examples(tf.constant(x), BOUNDS, model_fn, "rstepll_12_4",
                                             seed=(7, 8)).numpy()
    assert np.mean(other != adv) > 0.2


def _truncated_normal_mean(sigma, upper):
    """Mean of N(0, sigma) truncated to [0, upper]: sigma (phi(0) - phi(b)) / (Phi(b) - Phi(0))."""
    b = upper / sigma
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return sigma * (phi(0.0) - phi(b)) / (0.5 * math.erf(b / math.sqrt(2)))


def test_step_ll_random_eps_is_truncated_normal_on_zero_to_eps_per_example():
    """stepllrand_16: each example's eps from N(0, 8) truncated to [0, 16] (Kurakin et al.).

    Every pixel of an example moves by its eps (images far from the bounds), so the largest
    change of each example is its eps. 20000 examples: the mean is known to about 0.4%.
    """
    model = LinearClassifier((1, 1, 3), NUM_CLASSES).inference
    x = _images(20000, low=-0.5, high=0.5, shape=(1, 1, 3))
    adv = aa.generate_adversarial_examples(tf.constant(x), BOUNDS, model, "stepllrand_16",
                                           seed=(1, 2)).numpy()
    delta = np.abs(adv - x).reshape(len(x), -1) / SCALE
    eps = delta.max(axis=1)
    np.testing.assert_allclose(delta, np.repeat(eps[:, None], 3, axis=1), atol=1e-3)
    assert eps.min() >= 0 and eps.max() <= 16 + 1e-3
    expected = _truncated_normal_mean(8.0, 16.0)  # 5.78, against 8 for a uniform eps
    standard_error = eps.std() / math.sqrt(len(eps))
    assert abs(eps.mean() - expected) < 4 * standard_error, (eps.mean(), expected)
    # Both halves of the range are drawn, the lower one more often (0.715 below 8).
    assert abs(np.mean(eps < 8) - 0.5 * math.erf(1 / math.sqrt(2)) / (0.5 * math.erf(
        math.sqrt(2)))) < 0.02


def test_step_ll_descriptions_parse_and_bad_ones_name_the_field():
    assert aa.parse_attack_description("stepll_16") == aa.AttackSpec("stepll", 16, 16, 1, 0)
    assert aa.parse_attack_description("stepllrand_16").method == "stepllrand"
    assert aa.parse_attack_description("rstepll_16_8") == aa.AttackSpec("rstepll", 16, 8, 1, 8)
    with pytest.raises(ConfigError, match="'rstepll_16_16'.*ALPHA must be within 1..EPS-1"):
        aa.parse_attack_description("rstepll_16_16")
    with pytest.raises(ConfigError, match="'stepll_0'.*EPS must be within 1..255"):
        aa.parse_attack_description("stepll_0")
    for bad in ("stepll_16_2", "rstepll_16", "stepllrand_16_8_1"):
        with pytest.raises(ConfigError, match="invalid attack description.*stepll_EPS"):
            aa.parse_attack_description(bad)


def test_step_ll_through_make_attack_matches_the_function_and_traces_once():
    model = LinearClassifier(SHAPE, NUM_CLASSES).inference
    x = tf.constant(_images(4))
    attack = aa.make_attack("stepll_8", model, BOUNDS)
    first = attack(x).numpy()
    attack(x + 0.0)
    assert attack._compiled.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(
        first, aa.generate_adversarial_examples(x, BOUNDS, model, "stepll_8").numpy(), atol=0)
