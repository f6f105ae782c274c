"""Gradient masking: models that hide their gradients look robust to the original ``pgd_*``
attack and not to AutoAttack, and the masking checks say so; an honest model stays quiet.

Two ways of masking, both over a linear model whose minimal L-inf perturbation is analytic:

* ``QuantisedInput``: the input is quantised (``tf.round``) on a path with no gradient, plus a
  ``0 * x`` path, so every input gradient is exactly zero (a non-differentiable preprocessing
  defence). Only the gradient-free Square attack gets through.
* ``SaturatedSoftmax``: the logits are multiplied by 10,000 (a softmax temperature, as
  defensive distillation), so the cross-entropy's gradient underflows to exactly zero; the
  scale-invariant DLR loss of APGD-T is not fooled.

The honest model is a linear classifier trained on 8x8 class patterns.
"""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack, masking_checks, strong_evaluation
from tests.attack_models import LinearModel, images

SHAPE = (8, 8, 3)
NUM_CLASSES = 5
N = 40
BOUNDS = (-1.0, 1.0)


class QuantisedInput(tf.Module):
    def __init__(self, linear, levels=255.0):
        self.linear, self.levels = linear, levels

    def __call__(self, x):
        quantised = tf.stop_gradient(tf.round(x * self.levels) / self.levels)
        return self.linear(quantised + 0.0 * x)


class SaturatedSoftmax(tf.Module):
    def __init__(self, linear, temperature=1e4):
        self.linear, self.temperature = linear, temperature

    def __call__(self, x):
        return self.temperature * self.linear(x)


class TrainedLinear(tf.Module):
    """A linear classifier trained (Adam, cross-entropy) on noisy class patterns."""

    def __init__(self, x, labels, steps=150, seed=0):
        rng = np.random.default_rng(seed)
        size = int(np.prod(SHAPE))
        self.w = tf.Variable(rng.normal(0, 0.01, (size, NUM_CLASSES)).astype(np.float32))
        self.b = tf.Variable(tf.zeros([NUM_CLASSES]))
        optimizer = tf.keras.optimizers.Adam(0.01)
        flat = tf.constant(x.reshape(len(x), -1))
        for _ in range(steps):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=labels, logits=flat @ self.w + self.b))
            optimizer.apply_gradients(zip(tape.gradient(loss, [self.w, self.b]),
                                          [self.w, self.b]))

    def __call__(self, x):
        return tf.reshape(x, [tf.shape(x)[0], -1]) @ self.w + self.b

    def minimal_distance(self, x):
        linear = LinearModel(shape=SHAPE, num_classes=NUM_CLASSES)
        linear.w, linear.b = self.w.numpy(), self.b.numpy()
        return linear.minimal_distance(x)


def _class_patterns(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-0.5, 0.5, (NUM_CLASSES,) + SHAPE).astype(np.float32)
    labels = np.arange(2 * N) % NUM_CLASSES
    x = np.clip(means[labels] + rng.normal(0, 0.3, (2 * N,) + SHAPE), -1, 1).astype(np.float32)
    return x[:N], labels[:N].astype(np.int32), x[N:], labels[N:].astype(np.int32)


def _eps_splitting(distance):
    """An integer EPS (0..255 scale, inputs in [-1, 1]) that about half the points survive."""
    eps = int(round(np.median(distance) * 255 / 2))
    assert 2 <= eps <= 64
    return eps


def _pgd_accuracy(model, x, labels, eps):
    adversarial = adversarial_attack.generate_adversarial_examples(
        tf.constant(x), BOUNDS, model, f"pgd_{eps}_{max(1, eps // 4)}_20", seed=(0, 0))
    return float((model(adversarial).numpy().argmax(1) == labels).mean())


def _strong(model, x, labels, eps, **extra):
    return strong_evaluation.evaluate(
        model, lambda: [(x[:20], labels[:20]), (x[20:], labels[20:])],
        f"autoattack_{eps}_20_300", bounds=BOUNDS, num_classes=NUM_CLASSES, batch_size=20,
        **extra)


def _masked_case(wrap):
    # 4x4x3 inputs: Square's 300 queries cover 48 dimensions well enough.
    shape = (4, 4, 3)
    linear = LinearModel(shape=shape, num_classes=NUM_CLASSES, bias_scale=8.0, seed=4)
    x = images(N, shape=shape, low=-0.3, high=0.3, seed=2)
    model = wrap(linear)
    labels = model(tf.constant(x)).numpy().argmax(1).astype(np.int32)
    distance = linear.minimal_distance(x)
    return model, x, labels, distance, _eps_splitting(distance)


@pytest.mark.parametrize("wrap, telltales", [
    (QuantisedInput, ("Square attack broke", "zero and 0 non-finite input gradients",
                      "the training attack overestimates")),
    (SaturatedSoftmax, ("zero and 0 non-finite input gradients",
                        "the training attack overestimates")),
], ids=["quantised_input", "saturated_softmax"])
def test_masked_model_looks_robust_to_pgd_not_to_autoattack_and_checks_fire(wrap, telltales):
    model, x, labels, distance, eps = _masked_case(wrap)
    breakable = distance <= eps * 2 / 255
    pgd_accuracy = _pgd_accuracy(model, x, labels, eps)
    report = _strong(model, x, labels, eps, training_adv_method=f"pgd_{eps}_{max(1, eps // 4)}_20")

    assert report.main.clean_accuracy == 1.0
    assert pgd_accuracy >= 0.9  # the original attack is fooled by the masking
    # AutoAttack finds (nearly) every analytically breakable point.
    assert report.main.robust_accuracy <= 1.0 - breakable.mean() + 0.1
    assert report.main.robust_accuracy <= pgd_accuracy - 0.3
    assert report.training_attack[1] >= 0.9
    for telltale in telltales:
        assert any(telltale in warning for warning in report.warnings), report.warnings
    assert report.gradients.useless_share > 0.9


def test_honest_trained_model_passes_every_check():
    x_train, y_train, x, labels = _class_patterns()
    model = TrainedLinear(x_train, y_train)
    assert (model(tf.constant(x)).numpy().argmax(1) == labels).mean() >= 0.8
    distance = model.minimal_distance(x)
    eps = _eps_splitting(distance)
    report = _strong(model, x, labels, eps, second_eps=2 * eps,
                     training_adv_method=f"pgd_{eps}_{max(1, eps // 4)}_20")
    assert report.warnings == [], report.warnings
    # The numbers the checks looked at are there: Square found nothing the gradient attacks
    # missed, no gradient is zero, accuracy fell at the larger eps.
    square = report.main.rows[-1]
    assert square.name == "square" and square.robust_count == square.attacked
    assert report.gradients.zero == report.gradients.nonfinite == 0
    assert report.second.robust_accuracy < report.main.robust_accuracy
    # A point farther than eps from every boundary is never broken; the cheap budget (20
    # iterations) may leave one point just inside eps.
    correct = model(tf.constant(x)).numpy().argmax(1) == labels
    analytic = correct & (distance > eps * 2 / 255)
    assert (report.main.robust >= analytic).all()
    assert (report.main.robust != analytic).sum() <= 1


@pytest.mark.parametrize("check, args, fires", [
    (masking_checks.square_after_gradients,
     ([("apgd-ce", 10, 8), ("apgd-t", 8, 8), ("fab-t", 8, 8), ("square", 8, 5)],), True),
    (masking_checks.square_after_gradients,
     ([("apgd-ce", 40, 30), ("apgd-t", 30, 30), ("fab-t", 30, 30), ("square", 30, 30)],), False),
    (masking_checks.square_after_gradients, ([("square", 10, 2)],), False),  # nothing before
    (masking_checks.useless_gradients, (masking_checks.GradientStats(10, 1, 1),), True),
    (masking_checks.useless_gradients, (masking_checks.GradientStats(10, 1, 0),), False),
    (masking_checks.eps_not_monotone, (8, 0.30, 16, 0.30), True),
    (masking_checks.eps_not_monotone, (16, 0.10, 8, 0.30), False),
    (masking_checks.eps_not_monotone, (8, 0.0, 16, 0.0), False),
    (masking_checks.training_attack_gap, ("pgd_16_2_10", 0.279, "autoattack_16", 0.006), True),
    (masking_checks.training_attack_gap, ("pgd_16_2_10", 0.45, "autoattack_16", 0.30), False),
])
def test_each_check_fires_on_its_tell_tale_only(check, args, fires):
    warning = check(*args)
    assert (warning is not None) == fires, warning
    if fires:
        assert warning.startswith("gradient masking?") and "\n" not in warning


def test_gradient_stats_count_zero_and_nan_gradients():
    linear = LinearModel(shape=(2, 2, 1), num_classes=3)
    x = images(6, shape=(2, 2, 1), low=-0.3, high=0.3)
    labels = linear(tf.constant(x)).numpy().argmax(1)

    def nan_on_first_two(images):
        # sqrt at 0 has an infinite derivative: inf * 0 = NaN on the first two images only;
        # 1e-30 * root vanishes next to the images in float32.
        rest = tf.cast(tf.range(tf.shape(images)[0]) >= 2, tf.float32)[:, None, None, None]
        return linear(images + 1e-30 * tf.sqrt(images * images * rest))

    assert masking_checks.gradient_stats(linear, x, labels) == (6, 0, 0)
    assert masking_checks.gradient_stats(QuantisedInput(linear), x, labels) == (6, 6, 0)
    assert masking_checks.gradient_stats(nan_on_first_two, x, labels) == (6, 0, 2)
    wrong = (labels + 1) % 3
    assert masking_checks.gradient_stats(linear, x, wrong).examples == 0
