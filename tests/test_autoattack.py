"""The AutoAttack sequence (only still-robust points go on) and the description grammar."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import attacks
from adversarial_logit_pairing.errors import ConfigError
from tests.attack_models import LinearModel, images, predictions

SHAPE = (4, 4, 3)
SPACING = 0.1  # pixel (0, 0, 0) of image i is -1 + SPACING * i: the model can tell who it sees


class CountingModel(tf.Module):
    """A linear model that counts, per image, how many times it was evaluated on it."""

    def __init__(self, n):
        self.linear = LinearModel(shape=SHAPE)
        # The index pixel has no weight, so no gradient moves it (FAB's iterates are not
        # confined to the eps-box): only random starts and Square do, by less than eps.
        self.linear.w[0] = 0.0
        self.views = tf.Variable(tf.zeros([n], tf.int32))

    def __call__(self, x):
        index = tf.cast(tf.round((x[:, 0, 0, 0] + 1.0) / SPACING), tf.int32)
        index = tf.clip_by_value(index, 0, self.views.shape[0] - 1)
        self.views.scatter_nd_add(index[:, None], tf.ones_like(index))
        return self.linear(x)


def _counted_case(n=12):
    model = CountingModel(n)
    x = images(n, shape=SHAPE, low=-0.3, high=0.3)
    x[:, 0, 0, 0] = -1.0 + SPACING * np.arange(n)
    labels = predictions(model, x)
    labels[:2] = (labels[:2] + 1) % 5  # two points misclassified without attack
    distance = model.linear.minimal_distance(x)
    # eps well below SPACING / 2, so the perturbed pixel still names its image; the median
    # distance over the correctly classified points splits them into breakable and not.
    eps = float(np.median(distance[2:]))
    assert eps < SPACING / 4
    return model, x, labels, distance, eps


BUDGETS = dict(apgd_iters=5, fab_iters=5, square_queries=30, n_target_classes=3)


def test_each_attack_runs_only_on_the_points_all_earlier_ones_failed_on():
    model, x, labels, distance, eps = _counted_case()
    model.views.assign(tf.zeros_like(model.views))
    _, first_only = attacks.run_autoattack(model, x, labels, eps=eps, attacks=("apgd-ce",),
                                           **BUDGETS)
    views_first_only = model.views.numpy().copy()
    model.views.assign(tf.zeros_like(model.views))
    x_adv, report = attacks.run_autoattack(model, x, labels, eps=eps, **BUDGETS)
    views = model.views.numpy()

    broken_first = first_only.clean & ~first_only.robust
    assert broken_first.sum() >= 3 and report.robust.sum() >= 3
    # Misclassified points are seen once (the clean pass) and never attacked.
    assert list(views[:2]) == [1, 1] and not report.clean[:2].any()
    # Points APGD-CE broke are never shown to the later attacks.
    np.testing.assert_array_equal(views[broken_first], views_first_only[broken_first])
    assert (views[report.robust] > views_first_only[report.robust]).all()
    # Each stage attacked exactly the points robust after the previous one.
    previous = report.clean
    for stage in report.stages:
        assert stage.attacked == previous.sum()
        assert not (stage.robust & ~previous).any()
        previous = stage.robust
    # On a linear model the analytic distance decides who survives.
    np.testing.assert_array_equal(report.robust, report.clean & (distance > eps))


def test_autoattack_output_is_in_the_box_consistent_with_its_report_and_seeded():
    model, x, labels, _, eps = _counted_case()
    x_adv, report = attacks.run_autoattack(model, x, labels, eps=eps, seed=(5, 6), **BUDGETS)
    x_adv = x_adv.numpy()
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0
    np.testing.assert_array_equal(report.robust, predictions(model, x_adv) == labels)
    np.testing.assert_array_equal(x_adv[report.robust], x[report.robust])
    assert [stage.name for stage in report.stages] == list(attacks.STANDARD_ATTACKS)
    assert report.robust_accuracy == report.stages[-1].robust_count / len(x)
    assert len(report.lines()) == 5
    again, report_again = attacks.run_autoattack(model, x, labels, eps=eps, seed=(5, 6),
                                                 **BUDGETS)
    np.testing.assert_array_equal(again.numpy(), x_adv)
    for stage, stage_again in zip(report.stages, report_again.stages):
        np.testing.assert_array_equal(stage.robust, stage_again.robust)


def test_autoattack_on_two_classes_uses_the_targeted_margin():
    model = LinearModel(shape=(2, 2, 1), num_classes=2)
    x = images(6, shape=(2, 2, 1), low=-0.3, high=0.3)
    labels = predictions(model, x)
    eps = float(np.median(model.minimal_distance(x)))
    _, report = attacks.run_autoattack(model, x, labels, eps=eps, **BUDGETS)
    assert "margin-targeted, 1 targets" in report.stages[1].detail
    np.testing.assert_array_equal(report.robust, model.minimal_distance(x) > eps)


@pytest.mark.parametrize("description, expected", [
    ("autoattack_8", attacks.StrongAttackSpec("autoattack", 8)),
    ("apgdce_16", attacks.StrongAttackSpec("apgdce", 16, 100)),
    ("apgdt_4_20", attacks.StrongAttackSpec("apgdt", 4, 20)),
    ("fabt_255", attacks.StrongAttackSpec("fabt", 255, 100)),
    ("square_8", attacks.StrongAttackSpec("square", 8, 5000)),
    ("apgddlr_8_50", attacks.StrongAttackSpec("apgddlr", 8, 50)),
    ("pgdtrue_16_1_1000_10", attacks.StrongAttackSpec("pgdtrue", 16, 1000, 1, 10)),
])
def test_strong_attack_descriptions_parse(description, expected):
    assert attacks.parse_strong_attack_description(description) == expected


@pytest.mark.parametrize("bad", [
    "autoattack_0", "autoattack_256", "autoattack_8_100", "apgdce", "apgdce_8_1_2",
    "pgdtrue_8_2_10", "pgdtrue_8_0_10_1", "square_8_0", "fgsm_8", "AUTOATTACK_8", "",
])
def test_malformed_strong_attack_descriptions_are_one_line_config_errors(bad):
    with pytest.raises(ConfigError) as error:
        attacks.parse_strong_attack_description(bad)
    assert repr(bad) in str(error.value) and "\n" not in str(error.value)


def test_descriptions_scale_eps_from_the_pixel_scale_and_run():
    spec = attacks.parse_strong_attack_description("pgdtrue_16_4_3_2")
    assert spec.eps_in((-1.0, 1.0)) == pytest.approx(32 / 255)
    assert spec.step_in((0.0, 1.0)) == pytest.approx(4 / 255)
    model = LinearModel(shape=SHAPE)
    x = images(4, shape=SHAPE, low=-0.3, high=0.3)
    labels = predictions(model, x)
    for description in ("pgdtrue_16_4_3_2", "apgdt_16_3"):
        result, report = attacks.run_strong_attack(description, model, x, labels)
        assert report is None
        assert np.abs(result.x_adv.numpy() - x).max() <= 32 / 255 + 1e-6
        np.testing.assert_array_equal(result.robust.numpy(),
                                      predictions(model, result.x_adv.numpy()) == labels)


def test_apgd_and_fab_run_on_a_resnet_one_image_at_a_time():
    # A Keras ResNet in inference mode; chunks of one image once caught FAB's loop losing the
    # static batch size through the model.
    from adversarial_logit_pairing.models import create_model

    model = create_model("resnet_v2_tiny", 10, seed=0)

    def model_fn(images):
        return model(images, is_training=False)

    x = images(2, shape=(8, 8, 3))
    labels = predictions(model_fn, x)
    eps = 4 / 255
    x_adv, report = attacks.run_autoattack(
        model_fn, x, labels, eps=eps, batch_size=1, attacks=("apgd-ce", "fab-t"), apgd_iters=2,
        fab_iters=2, n_target_classes=2)
    assert np.abs(x_adv.numpy() - x).max() <= eps + 1e-6
    np.testing.assert_array_equal(report.robust, predictions(model_fn, x_adv.numpy()) == labels)
