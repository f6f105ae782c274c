"""Properties of the PGD attacks of the original ALP code."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack as aa

BOUNDS = (-1.0, 1.0)


class TwoLayerNet(tf.Module):
    """A small non-linear classifier on 8x8x3 images (enough for loss directions to matter)."""

    def __init__(self, num_classes=5, seed=0):
        rng = np.random.default_rng(seed)
        self.w1 = tf.Variable(rng.normal(0, 0.3, (8 * 8 * 3, 16)).astype(np.float32))
        self.w2 = tf.Variable(rng.normal(0, 0.5, (16, num_classes)).astype(np.float32))
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        h = tf.nn.tanh(tf.reshape(x, [tf.shape(x)[0], -1]) @ self.w1)
        return h @ self.w2


def _xent(model, x, labels):
    logits = model(x)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits).numpy()


def _images(n=6, seed=1):
    # Values near the bounds exercise the clipping to [lo, hi] as well as the eps box.
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
    x[:, 0, 0, :] = 1.0
    x[:, 0, 1, :] = -1.0
    return tf.constant(x)


def test_parse_attack_description_reads_original_strings():
    spec = aa.parse_attack_description("pgdll_16_2_10")
    assert (spec.method, spec.eps, spec.step, spec.num_iter) == ("pgdll", 16, 2, 10)
    assert aa.parse_attack_description("clean").is_clean


@pytest.mark.parametrize(
    "bad", ["pgd_16_2", "fgsm_1_1_1", "pgd_a_2_3", "pgd_16_2_0", "", "PGD_1_1_1"]
)
def test_malformed_attack_description_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="invalid attack description"):
        aa.generate_adversarial_examples(_images(), BOUNDS, TwoLayerNet(), bad)


def test_clean_returns_the_input_unchanged():
    x = _images()
    assert aa.generate_adversarial_examples(x, BOUNDS, TwoLayerNet(), "clean") is x


@pytest.mark.parametrize("method", ["pgd", "pgdll", "pgdrnd"])
def test_pgd_stays_in_epsilon_box_and_bounds(method):
    x = _images()
    adv = aa.generate_adversarial_examples(
        x, BOUNDS, TwoLayerNet(), f"{method}_16_4_5", seed=(3, 4)
    )
    eps = 16 * 2.0 / 255
    delta = np.abs(adv.numpy() - x.numpy())
    assert delta.max() <= eps + 1e-6
    assert adv.numpy().min() >= -1.0 and adv.numpy().max() <= 1.0
    # The attack actually moves most pixels to the box edge (sign steps of 4 with 5 iterations).
    assert np.mean(delta > 0.5 * eps) > 0.5


def test_untargeted_pgd_raises_the_loss_of_the_predicted_label():
    model, x = TwoLayerNet(), _images()
    predicted = tf.argmax(model(x), axis=-1)
    adv = aa.generate_adversarial_examples(x, BOUNDS, model, "pgd_16_2_10", seed=(0, 1))
    before, after = _xent(model, x, predicted), _xent(model, adv, predicted)
    assert np.all(after > before)


def test_least_likely_pgd_lowers_the_loss_of_its_target():
    model, x = TwoLayerNet(), _images()
    target = tf.argmin(model(x), axis=-1)
    adv = aa.generate_adversarial_examples(x, BOUNDS, model, "pgdll_16_2_10", seed=(0, 1))
    before, after = _xent(model, x, target), _xent(model, adv, target)
    assert np.all(after < before)


def test_pgd_with_explicit_labels_targets_them():
    model, x = TwoLayerNet(), _images()
    target = tf.constant([0, 1, 2, 3, 4, 0])
    adv = aa.pgd(x, BOUNDS, model, eps=0.2, step_size=0.05, num_iter=10, labels=target,
                 targeted=True, seed=(5, 5))
    assert np.all(_xent(model, adv, target) < _xent(model, x, target))


@pytest.mark.parametrize("method", ["pgd", "pgdll", "pgdrnd"])
def test_same_seed_gives_same_output_and_other_seed_differs(method):
    model, x = TwoLayerNet(), _images()
    desc = f"{method}_16_2_3"
    a = aa.generate_adversarial_examples(x, BOUNDS, model, desc, seed=(7, 8)).numpy()
    b = aa.generate_adversarial_examples(x, BOUNDS, model, desc, seed=(7, 8)).numpy()
    c = aa.generate_adversarial_examples(x, BOUNDS, model, desc, seed=(7, 9)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_eager_and_tf_function_agree():
    model, x = TwoLayerNet(), _images()

    @tf.function
    def attack(x):
        return aa.generate_adversarial_examples(x, BOUNDS, model, "pgdll_16_2_4", seed=(1, 2))

    eager = aa.generate_adversarial_examples(x, BOUNDS, model, "pgdll_16_2_4", seed=(1, 2))
    np.testing.assert_allclose(attack(x).numpy(), eager.numpy(), atol=1e-6)


def test_pgd_iterations_run_in_graph_not_in_python():
    model, x = TwoLayerNet(), _images()

    @tf.function
    def attack(x):
        return aa.generate_adversarial_examples(x, BOUNDS, model, "pgd_16_1_50")

    graph = attack.get_concrete_function(x).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "While" in op_types or "StatelessWhile" in op_types
    # One call for the prediction and the traces of the loop bodies (a few steps per
    # iteration, and a one-step remainder loop): not one per iteration.
    assert model.calls <= 1 + aa.STEPS_PER_ITERATION + 1 < 50


@pytest.mark.parametrize("num_iter", [1, 4, 5, 7, 10, 12])
def test_pgd_runs_exactly_num_iter_steps_of_the_reference_update(num_iter):
    # The loop runs several steps per iteration plus a remainder: every NITER must still give
    # exactly NITER steps of the update written out one at a time.
    model, x = TwoLayerNet(), _images()
    labels = tf.argmax(model(x), axis=-1)
    eps, step = 0.3, 0.02
    kwargs = dict(eps=eps, step_size=step, labels=labels, seed=(3, 4))
    expected = aa.pgd(x, BOUNDS, model, num_iter=0, **kwargs)  # the random start alone
    box_lo, box_hi = tf.maximum(x - eps, -1.0), tf.minimum(x + eps, 1.0)
    for _ in range(num_iter):
        with tf.GradientTape() as tape:
            tape.watch(expected)
            loss = tf.reduce_sum(_xent_tensor(model, expected, labels))
        expected = tf.clip_by_value(
            expected + step * tf.sign(tape.gradient(loss, expected)), box_lo, box_hi)
    adv = aa.pgd(x, BOUNDS, model, num_iter=num_iter, **kwargs)
    np.testing.assert_allclose(adv.numpy(), expected.numpy(), atol=1e-5)


def _xent_tensor(model, x, labels):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=model(x))


def test_no_gradient_flows_back_through_the_attack():
    model, x = TwoLayerNet(), _images()
    with tf.GradientTape() as tape:
        adv = aa.generate_adversarial_examples(x, BOUNDS, model, "pgd_16_2_2", seed=(1, 1))
        total = tf.reduce_sum(adv)
    assert list(tape.gradient(total, model.trainable_variables)) == [None, None]


def test_pgdrnd_targets_are_spread_over_classes():
    model = TwoLayerNet(num_classes=5)
    x = tf.tile(_images(1), [200, 1, 1, 1])
    # With eps large enough, a targeted attack reaches its target: the reached classes show
    # that the random targets cover every class.
    adv = aa.generate_adversarial_examples(x, BOUNDS, model, "pgdrnd_255_32_20", seed=(2, 3))
    reached = set(np.argmax(model(adv).numpy(), axis=-1).tolist())
    assert len(reached) >= 4
