"""Tests for the TF1-style moving average against tf.compat.v1.train.ExponentialMovingAverage."""

import textwrap

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.moving_average import ExponentialMovingAverage
from tests.program_runs import run_child

INITIAL = {
    "resnet_v2_50/conv1/weights": np.array([[1.0, -2.0], [0.5, 4.0]], np.float32),
    "resnet_v2_50/postnorm/moving_mean": np.array([0.0, 3.0, -1.0], np.float32),
}
# New variable values after each training step.
VALUES = [
    {name: value + np.float32(k + 1) * np.sin(np.arange(value.size) + k).reshape(value.shape)
     .astype(np.float32) for name, value in INITIAL.items()}
    for k in range(6)
]


def _tf1_reference(decay, start_step=0):
    """TF1 graph: set the variables, increment global_step, then apply the average."""
    graph = tf.Graph()
    with graph.as_default():
        variables = {}
        for name, value in INITIAL.items():
            scope, leaf = name.rsplit("/", 1)
            with tf.compat.v1.variable_scope(scope):
                variables[name] = tf.compat.v1.get_variable(
                    leaf, initializer=tf.constant(value), use_resource=True)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        ema = tf.compat.v1.train.ExponentialMovingAverage(decay, num_updates=global_step)
        apply_op = ema.apply(list(variables.values()))
        feeds = {n: tf.compat.v1.placeholder(tf.float32, v.shape) for n, v in INITIAL.items()}
        assign = tf.group(*[variables[n].assign(feeds[n]) for n in INITIAL],
                          global_step.assign_add(1))
        names = {n: ema.average_name(v) for n, v in variables.items()}
        shadows = {n: ema.average(v) for n, v in variables.items()}
        history = []
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(global_step.assign(start_step))
            for values in VALUES:
                sess.run(assign, {feeds[n]: v for n, v in values.items()})
                sess.run(apply_op)
                history.append(sess.run(shadows))
    return history, names


def _ours(decay, mode="eager", start_step=0):
    variables = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    global_step = tf.Variable(start_step, dtype=tf.int64, name="global_step")
    ema = ExponentialMovingAverage(decay, variables)

    def step(values):
        for name, value in values.items():
            variables[name].assign(value)
        global_step.assign_add(1)
        ema.apply(global_step)

    if mode == "function":
        step = tf.function(step)
    elif mode == "xla":
        step = tf.function(step, jit_compile=True)
    history = []
    for values in VALUES:
        step({n: tf.constant(v) for n, v in values.items()})
        history.append({n: ema.shadow(n).numpy() for n in INITIAL})
    return history, ema


@pytest.mark.parametrize("decay, start_step", [(0.9999, 0), (0.5, 0), (0.99, 1000)])
def test_shadows_equal_tf1_moving_average_with_num_updates(decay, start_step):
    expected, _ = _tf1_reference(decay, start_step)
    got, _ = _ours(decay, start_step=start_step)
    for step, (want, have) in enumerate(zip(expected, got)):
        for name in INITIAL:
            np.testing.assert_array_equal(have[name], want[name],
                                          err_msg=f"step {step} {name}")


def test_shadow_names_equal_tf1_average_names():
    _, tf1_names = _tf1_reference(0.9, 0)
    _, ema = _ours(0.9)
    assert {ema.average_name(n) for n in INITIAL} == set(tf1_names.values())
    assert set(ema.variables_by_name()) == set(tf1_names.values())
    assert ema.average_name("a/b") == "a/b/ExponentialMovingAverage"
    for name in INITIAL:
        assert ema.variables_by_name()[ema.average_name(name)] is ema.shadow(name)


def test_first_update_after_step_one_uses_decay_two_elevenths():
    var = tf.Variable([10.0, -4.0])
    ema = ExponentialMovingAverage(0.9999, {"w": var})
    np.testing.assert_array_equal(ema.shadow("w").numpy(), [10.0, -4.0])  # starts at the value
    var.assign([0.0, 7.0])
    ema.apply(tf.constant(1, tf.int64))
    d = 2.0 / 11.0
    np.testing.assert_allclose(ema.shadow("w").numpy(),
                               [10.0 * d, -4.0 * d + 7.0 * (1 - d)], rtol=1e-6)


def test_decay_is_capped_by_the_given_decay_for_large_steps():
    var = tf.Variable([1.0])
    ema = ExponentialMovingAverage(0.9, {"w": var})
    var.assign([0.0])
    ema.apply(10**6)  # (1+n)/(10+n) ~ 1 > 0.9
    np.testing.assert_allclose(ema.shadow("w").numpy(), [0.9], rtol=1e-6)
    ema.apply(None)  # no num_updates: the plain decay
    np.testing.assert_allclose(ema.shadow("w").numpy(), [0.81], rtol=1e-6)


def test_shadows_are_not_trainable_and_start_at_current_values():
    var = tf.Variable([1.0, 2.0])
    var.assign([5.0, 6.0])
    ema = ExponentialMovingAverage(0.99, {"net/w": var})
    shadow = ema.shadow("net/w")
    assert not shadow.trainable
    assert shadow.name == "net/w/ExponentialMovingAverage:0"
    np.testing.assert_array_equal(shadow.numpy(), [5.0, 6.0])
    with pytest.raises(KeyError, match="no moving average for 'other'"):
        ema.shadow("other")


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_compiled_apply_equals_eager_apply(mode):
    eager, _ = _ours(0.999)
    compiled, _ = _ours(0.999, mode=mode)
    for want, have in zip(eager, compiled):
        for name in INITIAL:
            np.testing.assert_allclose(have[name], want[name], rtol=1e-6, atol=1e-7)


def test_integer_variables_are_rejected():
    with pytest.raises(TypeError, match="'step'.*floating point"):
        ExponentialMovingAverage(0.9, {"step": tf.Variable(1)})


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from adversarial_logit_pairing.moving_average import ExponentialMovingAverage

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {}
    for context in ["replica", "cross_replica"]:
        with strategy.scope():
            weights = tf.Variable([1.0, 2.0], name="net/w")
            # Like BN moving statistics: one copy per replica, read as their mean.
            moving_mean = tf.Variable([0.0, 0.0], name="net/bn/moving_mean", trainable=False,
                                      synchronization=tf.VariableSynchronization.ON_READ,
                                      aggregation=tf.VariableAggregation.MEAN)
            step = tf.Variable(0, dtype=tf.int64, name="global_step")
            ema = ExponentialMovingAverage(0.9, {"net/w": weights,
                                                 "net/bn/moving_mean": moving_mean})

        def replica_fn(k):
            rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group,
                          tf.float32)
            moving_mean.assign(tf.constant([1.0, 3.0]) * (rid + 1.0) * k)  # mean: 1.5 * k
            if context == "replica":
                step.assign_add(1)  # each replica increments its own copy
                ema.apply(step)

        @tf.function
        def train(k):
            weights.assign(tf.constant([1.0, -1.0]) * k)
            strategy.run(replica_fn, args=(k,))
            if context == "cross_replica":
                step.assign_add(1)
                ema.apply(step)

        with strategy.scope():
            for k in range(1, 4):
                train(tf.constant(float(k)))
        results[context] = {
            name: [v.numpy().tolist() for v in strategy.experimental_local_results(shadow)]
            for name, shadow in ema.variables_by_name().items()
        }
        results[context + "/types"] = sorted(
            type(s).__name__ for s in ema.variables_by_name().values())
    print("RESULTS" + json.dumps(results))
    """
)


def test_mirrored_strategy_averages_every_copy_and_on_read_means():
    results = run_child(_MIRRORED_SCRIPT)

    # Independent reference: the TF1 formula in numpy on the values every step leaves behind.
    shadow_w, shadow_mm = np.array([1.0, 2.0]), np.array([0.0, 0.0])
    for k in range(1, 4):
        d = min(0.9, (1.0 + k) / (10.0 + k))
        shadow_w = shadow_w - (shadow_w - np.array([1.0, -1.0]) * k) * (1 - d)
        shadow_mm = shadow_mm - (shadow_mm - np.array([1.0, 3.0]) * 1.5 * k) * (1 - d)
    for context in ["replica", "cross_replica"]:
        got = results[context]
        assert results[context + "/types"] == ["MirroredVariable", "MirroredVariable"]
        for name, expected in [("net/w", shadow_w), ("net/bn/moving_mean", shadow_mm)]:
            copies = got[name + "/ExponentialMovingAverage"]
            assert copies[0] == copies[1], (context, name)
            np.testing.assert_allclose(copies[0], expected, rtol=1e-5,
                                       err_msg=f"{context} {name}")
