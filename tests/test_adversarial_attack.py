"""Properties of the PGD attacks of the original ALP code."""

import gc
import weakref

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack as aa
from adversarial_logit_pairing.errors import ConfigError

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


def test_pgd_starts_uniformly_in_the_epsilon_box():
    """One step from a uniform start: the displacement is ``clip(u + step*sign, -eps, eps)``.

    A two-class linear model labelled 0 has the input gradient ``p1 * (w1 - w0)``, whose sign
    is ``sign(w1 - w0)`` whatever the input; with the images far from the bounds, the step
    moves every pixel by ``+step`` along that sign from ``u ~ U(-eps, eps)``. So, along the
    sign, a fraction ``step / (2 eps)`` ends on the box edge ``eps`` and the rest is uniform on
    ``[-eps + step, eps)``; a start at ``x`` would put every pixel at exactly ``step``.
    """
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8 * 8 * 3, 2)).astype(np.float32)
    sign = np.sign(w[:, 1] - w[:, 0]).reshape(8, 8, 3)

    def model(x):
        return tf.reshape(x, [tf.shape(x)[0], -1]) @ w

    x = tf.constant(rng.uniform(-0.4, 0.4, (64, 8, 8, 3)).astype(np.float32))
    labels = tf.zeros([64], tf.int64)
    eps, step = 0.5, 0.1
    kwargs = dict(eps=eps, step_size=step, num_iter=1, labels=labels)
    adv = aa.pgd(x, BOUNDS, model, seed=(5, 6), **kwargs).numpy()
    along = ((adv - x.numpy()) * sign).ravel()
    on_edge = np.isclose(along, eps, atol=1e-6)
    assert abs(on_edge.mean() - step / (2 * eps)) < 0.02
    inside = np.sort(along[~on_edge])
    assert inside.min() >= -eps + step - 1e-6 and inside.max() < eps
    # Kolmogorov-Smirnov distance to U(-eps + step, eps) (12288 values: ~0.012 at p=0.01).
    expected_cdf = (inside - (-eps + step)) / (2 * eps - step)
    empirical = np.arange(1, inside.size + 1) / inside.size
    assert np.abs(empirical - expected_cdf).max() < 0.02
    # The start comes from the seed: the same seed repeats it, another one moves it.
    np.testing.assert_array_equal(aa.pgd(x, BOUNDS, model, seed=(5, 6), **kwargs).numpy(), adv)
    other = aa.pgd(x, BOUNDS, model, seed=(5, 7), **kwargs).numpy()
    assert np.mean(other != adv) > 0.8


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


@pytest.mark.parametrize("bad", ["pgd_300_2_10", "pgd_16_256_10", "pgdll_0_2_10", "pgd_16_0_3"])
def test_eps_and_step_outside_1_to_255_raise_config_error_naming_the_description(bad):
    with pytest.raises(ConfigError, match=f"invalid attack description '{bad}'.*1..255"):
        aa.parse_attack_description(bad)
    assert aa.parse_attack_description("pgdrnd_255_255_1").eps == 255
    assert aa.parse_attack_description("pgd_1_1_1").step == 1


def _attack_eagerly(model_fn_of) -> list:
    """Weak references to a model and its model_fn, after eager attacks of every kind."""
    model, x = TwoLayerNet(), _images()
    model_fn = model_fn_of(model)
    aa.generate_adversarial_examples(x, BOUNDS, model_fn, "pgd_16_2_2")
    aa.generate_adversarial_examples(x, BOUNDS, model_fn, "pgdll_16_2_2", seed=(1, 2))
    aa.pgd(x, BOUNDS, model_fn, 0.1, 0.01, 2, labels=tf.zeros([6], tf.int64))
    return [weakref.ref(model), weakref.ref(model_fn)]


def _fresh_lambda(model):
    # A lambda of its own on its line: AutoGraph cannot read a lambda nested in a lambda, and
    # the warning it logs (which pytest keeps) holds the caller's frames, so the model too.
    return lambda images: model(images)


@pytest.mark.parametrize("model_fn_of", [
    _fresh_lambda,  # the README's fresh lambda
    lambda model: model.__call__,  # a bound method
    lambda model: model,
])
def test_eager_attack_frees_the_model_once_dropped(model_fn_of):
    # The cache used to key weakly on model_fn while its compiled function closed over that
    # same model_fn: nothing was ever freed.
    refs = _attack_eagerly(model_fn_of)
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_fresh_lambda_per_eager_call_reuses_one_trace_and_is_freed():
    model, x = TwoLayerNet(), _images()
    outputs, refs, traces = [], [], []
    for _ in range(4):
        model_fn = lambda images: model(images)  # noqa: E731 (a new object on every pass)
        refs.append(weakref.ref(model_fn))
        outputs.append(aa.generate_adversarial_examples(x, BOUNDS, model_fn, "pgdll_16_2_3",
                                                        seed=(1, 2)).numpy())
        traces.append(model.calls)
        del model_fn
    assert traces[1:] == traces[:1] * 3, "an equivalent fresh lambda retraced the attack"
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])
    gc.collect()
    assert [ref() for ref in refs] == [None] * 4


def test_a_lambda_over_another_model_is_not_served_the_first_models_trace():
    x = _images()
    for seed in (0, 1):
        model = TwoLayerNet(seed=seed)
        adv = aa.generate_adversarial_examples(
            x, BOUNDS, lambda images: model(images), "pgd_16_2_2", seed=(5, 6))  # noqa: B023
        direct = aa.make_attack("pgd_16_2_2", model, BOUNDS)(x, seed=(5, 6))
        np.testing.assert_allclose(adv.numpy(), direct.numpy(), atol=1e-6)


def test_make_attack_traces_once_and_runs_in_graphs():
    model, x = TwoLayerNet(), _images()
    attack = aa.make_attack("pgdll_16_2_3", lambda images: model(images), BOUNDS)
    first = attack(x, seed=(1, 2))
    traced = model.calls
    np.testing.assert_array_equal(attack(x, seed=(1, 2)).numpy(), first.numpy())
    assert model.calls == traced
    np.testing.assert_allclose(
        aa.generate_adversarial_examples(x, BOUNDS, model, "pgdll_16_2_3", seed=(1, 2)).numpy(),
        first.numpy(), atol=1e-6)
    in_graph = tf.function(lambda images: attack(images, seed=(1, 2)))
    np.testing.assert_allclose(in_graph(x).numpy(), first.numpy(), atol=1e-6)
    assert aa.make_attack("clean", model, BOUNDS)(x) is x


def _kept_attack() -> tuple:
    model = TwoLayerNet()
    attack = aa.make_attack("pgd_16_2_2", lambda images: model(images), BOUNDS)
    attack(_images())
    return attack, weakref.ref(model)


def test_make_attack_frees_the_model_with_the_attack():
    attack, model_ref = _kept_attack()
    assert model_ref() is not None
    del attack
    gc.collect()
    assert model_ref() is None


_GLOBAL_MODEL = None


def test_a_lambda_over_a_rebound_global_model_is_not_served_the_old_trace():
    global _GLOBAL_MODEL
    x = _images()
    try:
        for seed in (0, 1):
            _GLOBAL_MODEL = TwoLayerNet(seed=seed)
            adv = aa.generate_adversarial_examples(
                x, BOUNDS, lambda images: _GLOBAL_MODEL(images), "pgd_16_2_2",  # noqa: B023
                seed=(5, 6))
            direct = aa.make_attack("pgd_16_2_2", _GLOBAL_MODEL, BOUNDS)(x, seed=(5, 6))
            np.testing.assert_allclose(adv.numpy(), direct.numpy(), atol=1e-6)
    finally:
        _GLOBAL_MODEL = None
