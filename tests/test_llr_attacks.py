"""The challenge's metric and attacks: coverage, spatial grid, SPSA, corruptions, PGD via hub."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from llr import corruptions, coverage, evaluation, hub_model, spatial, spsa
from tests.llr_builders import load_folder_images, write_photo_folder, write_standin_pair


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    images, labels = load_folder_images(write_photo_folder(str(tmp_path_factory.mktemp("p"))))
    return np.stack([img[:96, :96] for img in images]), labels


# ---- accuracy at coverage --------------------------------------------------------------------

def test_accuracy_at_80_and_100_percent_coverage_hand_computed():
    # Confidence = max logit: 9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5. Wrong: the 8, the 2 and the 0.5.
    logits = np.array([[9, 0], [0, 8], [7, 1], [0, 6], [5, 0], [0, 4], [3, 0], [0, 2], [1, 0],
                       [0, 0.5]], np.float32)
    labels = np.array([0, 0, 0, 1, 0, 1, 0, 0, 0, 0])
    at_100 = coverage.accuracy_at_coverage(logits, labels, 1.0)
    assert (at_100.num_covered, at_100.num_errors, at_100.accuracy) == (10, 3, 0.7)
    # 80%: abstain on the two least confident (1 and 0.5); errors left: the 8 and the 2.
    at_80 = coverage.accuracy_at_coverage(logits, labels, 0.8)
    assert (at_80.num_covered, at_80.num_errors, at_80.accuracy) == (8, 2, 0.75)


def test_coverage_keeps_every_example_tied_with_the_threshold():
    # int(0.8 * 5) = 4 answered, but the 4th and 5th confidences tie at 1: both are answered.
    logits = np.array([[3, 0], [0, 2], [2, 0], [1, 0], [0, 1]], np.float32)
    labels = np.array([0, 1, 0, 1, 1])
    result = coverage.accuracy_at_coverage(logits, labels, 0.8)
    assert (result.num_covered, result.num_errors, result.accuracy) == (5, 1, 0.8)


def test_equal_logits_predict_bicycle():
    np.testing.assert_array_equal(coverage.predictions(np.array([[0.0, 0.0], [1.0, 2.0]])),
                                  [0, 1])


# ---- spatial ---------------------------------------------------------------------------------

def test_spatial_grid_is_the_challenges_5x5x31():
    transforms = spatial.grid()
    assert transforms.shape == (775, 3)
    for column, values in enumerate([np.linspace(-18, 18, 5), np.linspace(-18, 18, 5),
                                     np.arange(-30, 31, 2)]):
        np.testing.assert_allclose(np.unique(transforms[:, column]), values, atol=1e-5)


def test_rotation_by_90_degrees_is_counterclockwise_like_rot90():
    x = np.random.default_rng(0).uniform(size=(2, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(spatial.transform_images(x, [0.0, 0.0, 90.0]).numpy(),
                               np.rot90(x, 1, axes=(1, 2)), atol=1e-5)


def test_translation_moves_right_and_down_with_black_fill():
    x = np.random.default_rng(1).uniform(size=(1, 6, 7, 3)).astype(np.float32)
    want = np.zeros_like(x)
    want[:, 2:, :4] = x[:, :4, 3:]  # dx = -3 (left), dy = +2 (down)
    np.testing.assert_allclose(spatial.transform_images(x, [-3.0, 2.0, 0.0]).numpy(), want,
                               atol=1e-6)


def test_black_border_shrinks_the_image_inside_black_edges():
    out = spatial.add_black_border(tf.ones([1, 40, 60, 3]), 0.15).numpy()
    assert out.shape == (1, 40, 60, 3)
    assert out[0, :6].max() == 0 and out[0, :, :9].max() == 0 and out[0, -6:].max() == 0
    np.testing.assert_allclose(out[0, 6:34, 9:51], 1.0, atol=1e-6)


def test_spatial_grid_attack_finds_the_one_rotation_the_model_fails_on(photos):
    images, _ = photos
    images = tf.image.resize(images[:3], [48, 48]).numpy()
    labels = np.ones(3, np.int64)
    failing = np.array([0.0, 0.0, 14.0], np.float32)
    targets = spatial.transform_images(spatial.add_black_border(images, 0.15), failing)

    def model_fn(x):
        # Bird unless the input is (almost) exactly the image rotated by 14 degrees.
        distance = tf.reduce_mean(tf.abs(x - targets), axis=[1, 2, 3])
        margin = 100.0 * (distance - 1e-4)
        return tf.stack([-margin, margin], axis=1)

    assert np.all(coverage.predictions(model_fn(images).numpy()) == 1)
    result = spatial.grid_attack(model_fn, images, labels)  # the default 5x5x31 grid
    np.testing.assert_allclose(result.transforms, np.tile(failing, (3, 1)))
    np.testing.assert_allclose(result.images.numpy(), targets.numpy(), atol=1e-6)
    assert np.all(coverage.predictions(model_fn(result.images).numpy()) == 0)
    np.testing.assert_allclose(result.losses, 2 * 100.0 * 1e-4, rtol=1e-3)


def test_spatial_grid_attack_traces_the_model_once_for_all_batches(photos):
    images, _ = photos
    images = tf.image.resize(images[:4], [24, 24]).numpy()
    labels = np.array([0, 1], np.int64)
    traces = []

    def model_fn(x):
        traces.append(1)  # runs only while tracing
        score = tf.reduce_mean(x, axis=[1, 2, 3]) - 0.5
        return tf.stack([-score, score], axis=1)

    first = spatial.grid_attack(model_fn, images[:2], labels, granularity=(2, 2, 3))
    second = spatial.grid_attack(model_fn, images[2:], labels, granularity=(2, 2, 3))
    assert len(traces) == 1
    assert first.images.shape == second.images.shape == (2, 24, 24, 3)


# ---- SPSA ------------------------------------------------------------------------------------

def _linear_model(weights):
    weights = tf.constant(weights, tf.float32)

    def model_fn(x):
        bird = tf.reduce_sum((x - 0.5) * weights, axis=[1, 2, 3]) + 1.0
        return tf.stack([tf.zeros_like(bird), bird], axis=1)
    return model_fn


def test_spsa_fools_a_linear_model_within_the_eps_box():
    rng = np.random.default_rng(2)
    weights = rng.choice([-0.5, 0.5], size=(1, 8, 8, 3))
    x = np.full((3, 8, 8, 3), 0.5, np.float32) + rng.uniform(-0.02, 0.02, (3, 8, 8, 3))
    x = x.astype(np.float32)
    model_fn = _linear_model(weights)
    labels = np.ones(3, np.int64)
    assert np.all(coverage.predictions(model_fn(x).numpy()) == 1)
    attack = spsa.compiled_spsa(model_fn, num_steps=40, num_samples=16)
    adv = attack(tf.constant(x), tf.constant(labels), tf.constant([1, 2])).numpy()
    assert np.abs(adv - x).max() <= 16 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    logits = model_fn(adv).numpy()
    assert np.all(coverage.predictions(logits) == 0)
    # The challenge's early stop: an image stops once misclassified by a margin of 1, far from
    # the margin the same attack reaches without stopping.
    margin = logits[:, 0] - logits[:, 1]
    assert np.all(margin > 1.0)
    unstopped = spsa.compiled_spsa(model_fn, num_steps=40, num_samples=16,
                                   early_stop_loss_threshold=None)
    adv_unstopped = unstopped(tf.constant(x), tf.constant(labels), tf.constant([1, 2]))
    unstopped_margin = -np.diff(model_fn(adv_unstopped).numpy(), axis=1)[:, 0]
    assert np.all(margin + 1.0 < unstopped_margin)


def test_spsa_is_reproducible_and_early_stop_freezes_an_image():
    rng = np.random.default_rng(3)
    model_fn = _linear_model(rng.choice([-0.2, 0.2], size=(1, 6, 6, 3)))
    x = tf.constant(rng.uniform(0.2, 0.8, (2, 6, 6, 3)), tf.float32)
    labels = tf.constant([1, 0])
    run = dict(num_steps=5, num_samples=8, seed=[4, 5])
    a = spsa.spsa(model_fn, x, labels, **run)
    np.testing.assert_array_equal(a.numpy(), spsa.spsa(model_fn, x, labels, **run).numpy())
    assert not np.array_equal(a.numpy(),
                              spsa.spsa(model_fn, x, labels, **{**run, "seed": [4, 6]}).numpy())
    # A threshold every loss is below stops every image after its first step.
    frozen = spsa.spsa(model_fn, x, labels, early_stop_loss_threshold=1e9, **run)
    one_step = spsa.spsa(model_fn, x, labels, early_stop_loss_threshold=None,
                         **{**run, "num_steps": 1})
    np.testing.assert_array_equal(frozen.numpy(), one_step.numpy())


def test_spsa_rejects_an_odd_number_of_samples():
    with pytest.raises(ValueError, match="even"):
        spsa.compiled_spsa(lambda x: x, num_samples=7)


# ---- common corruptions ----------------------------------------------------------------------

def test_every_corruption_changes_the_image_within_range_and_reproducibly(photos):
    images, _ = photos
    images = images[:2]
    for name in corruptions.CORRUPTIONS:
        out = corruptions.corrupt(images, name, severity=1, seed=7)
        assert out.shape == images.shape and out.dtype == np.float32, name
        assert 0.0 <= out.min() and out.max() <= 1.0, name
        assert np.abs(out - images).mean() > 1e-3, name
        np.testing.assert_array_equal(out, corruptions.corrupt(images, name, 1, seed=7))


def test_gaussian_blur_matches_scipy_as_imagenet_c_uses_it(photos):
    from scipy import ndimage

    images, _ = photos
    quantised = (images[:1] * 255).astype(np.uint8)
    want = ndimage.gaussian_filter(quantised[0] / 255.0, sigma=(1, 1, 0), mode="nearest",
                                   truncate=4.0)
    np.testing.assert_allclose(corruptions.corrupt(images[:1], "gaussian_blur")[0], want,
                               atol=1e-6)


def test_contrast_and_brightness_follow_imagenet_c_formulas(photos):
    images, _ = photos
    x = (images[:1] * 255).astype(np.uint8)[0] / 255.0
    mean = x.mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(corruptions.corrupt(images[:1], "contrast")[0],
                               (x - mean) * 0.4 + mean, atol=1e-6)
    brighter = corruptions.corrupt(images[:1], "brightness")[0]
    np.testing.assert_allclose(brighter.max(axis=2), np.minimum(x.max(axis=2) + 0.1, 1.0),
                               atol=1e-5)


def test_worst_corruption_keeps_the_largest_wrong_logit_per_image(photos):
    images, _ = photos
    images, labels = images[:4], np.array([0, 1, 0, 1])
    names = ["contrast", "brightness", "gaussian_noise"]

    def model_fn(x):
        mean = np.asarray(x).mean(axis=(1, 2, 3))
        return np.stack([mean, 1.0 - 4 * (mean - 0.45) ** 2], axis=1)

    worst, chosen = corruptions.worst_corruption(model_fn, images, labels, names, seed=3)
    candidates = [corruptions.corrupt(images, name, 1, 3 + i) for i, name in enumerate(names)]
    wrong = np.stack([model_fn(c)[np.arange(4), 1 - labels] for c in candidates])
    for i in range(4):
        best = int(np.argmax(wrong[:, i]))
        assert chosen[i] == names[best]
        np.testing.assert_array_equal(worst[i], candidates[best][i])


def test_unknown_corruption_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown corruption"):
        corruptions.corrupt(np.zeros((1, 4, 4, 3)), "snow")
    with pytest.raises(ConfigError, match="severity"):
        corruptions.corrupt(np.zeros((1, 4, 4, 3)), "contrast", severity=6)


# ---- white-box PGD through the hub modules ---------------------------------------------------

def test_pgd_through_the_hub_modules_raises_the_loss_within_eps(tmp_path, photos):
    images, labels = photos
    model = hub_model.load(*write_standin_pair(str(tmp_path), centre_on=images))
    settings = evaluation.EvalSettings(data_dir=str(tmp_path), pgd_iters=5)
    for name, eps in (("pgd", 16), ("pgd_4_1_5", 4)):
        adv = evaluation.make_attack(name, model, settings)(images, labels, 0)
        assert np.abs(adv - images).max() <= eps / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        clean_loss = spatial.margin_loss(model(images), labels).numpy()
        adv_loss = spatial.margin_loss(model(adv), labels).numpy()
        assert np.all(adv_loss >= clean_loss - 1e-4), name
        assert adv_loss.mean() > clean_loss.mean() + 0.05, name
