"""``--replicas_to_aggregate=N``: N gradients averaged into ONE update, as SyncReplicasOptimizer.

With N above the replicas in sync, each replica runs N / replicas successive micro-batches per
update (attack, training pass, batch-norm statistics), then the optimizer applies the mean of
the N gradients once, ``global_step`` advances once and the moving average follows once.

The references compute the same by hand on one device: a twin model (same seed), one
``tf.GradientTape`` per micro-batch, the gradients averaged and applied by TF1's own RMSProp
(``tf.compat.v1.train.RMSPropOptimizer``), the moving average written out once per update, and
(for several replicas) each replica's own copy of the batch-norm statistics.

Batch norm's decay is lowered to 0.5 here so that the ORDER in which the micro-batches move the
moving statistics shows in the numbers (at Slim's 0.997, swapping two batches changes the
statistics by about 1e-5 of their difference, inside any float tolerance).

Mirrored runs need logical CPU devices before TensorFlow starts, so they happen in a
subprocess: ``python -m tests.test_gradient_accumulation mirrored <out>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf

from tests.data_builders import write_tiny_imagenet_tfrecords
from tests.program_runs import (
    run_experiment,
    save_experiment,
    scalar_events,
)

MODEL = "resnet_v2_tiny"
NUM_CLASSES = 10
IMAGE_SIZE = 16
BATCH = 4  # per replica and micro-batch
SEED = 3
ALP = "pgdll_16_2_1"
BOUNDS = (-1.0, 1.0)
BN_DECAY = 0.5
LEARNING_RATE = 0.045  # the default hparam; exp_decay stays at it for the first steps
EMA_DECAY = 0.9999


def _hparams(method: str):
    from adversarial_logit_pairing import model_lib

    # Clean runs without pairing: clean logit pairing pairs halves of each replica's batch,
    # which are other pairs than one device's halves of the global batch.
    lp_weight = 0.0 if method == "clean" else 0.5
    return model_lib.default_hparams().parse(
        f"batch_size={BATCH},train_adv_method={method},train_lp_weight={lp_weight}")


def _fast_batch_norm(model):
    """Makes the batch-norm statistics move fast (see the module docstring); returns ``model``.

    Synchronised batch norm reads the decay of the layer it wraps, so this works after
    ``--sync_batch_norm`` too.
    """
    from adversarial_logit_pairing.models.layers import BatchNorm

    for module in model.submodules:
        if isinstance(module, BatchNorm):
            module.decay = BN_DECAY
    return model


def _model():
    """The tiny ResNet of the references, with fast-moving batch-norm statistics."""
    from adversarial_logit_pairing import model_lib

    return _fast_batch_norm(model_lib.get_model(MODEL, NUM_CLASSES, seed=0))


def _batches(num_batches: int, global_batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (num_batches, global_batch, IMAGE_SIZE, IMAGE_SIZE, 3))
    labels = rng.integers(0, NUM_CLASSES, (num_batches, global_batch))
    return images.astype(np.float32), labels


def _run(strategy, images, labels, method: str, replicas_to_aggregate: int,
         sync_bn: bool = False, **step_options):
    """train.py's step and data grouping on the global batches ``images[i]``, in order.

    Returns the state (checkpoint names -> values, on-read variables averaged over the
    replicas, as a checkpoint reads them) and the outputs of every update.
    """
    from adversarial_logit_pairing import training

    hparams = _hparams(method)
    replicas = strategy.num_replicas_in_sync
    factor = training.learning_rate_replicas(replicas, replicas_to_aggregate)
    state = training.build_train_state(strategy, MODEL, NUM_CLASSES, hparams, 100000,
                                       lr_replicas=factor, moving_average_decay=EMA_DECAY,
                                       sync_batch_norm=sync_bn)
    _fast_batch_norm(state.model)
    step = training.make_train_step(
        strategy, state.model, state.trainable, state.optimizer, state.ema, state.global_step,
        hparams, NUM_CLASSES, BOUNDS, seed=SEED, num_micro_batches=factor // replicas,
        **step_options)
    dataset = training.group_micro_batches(
        tf.data.Dataset.from_tensor_slices((images, labels)), factor // replicas, replicas)
    outputs = [{name: np.asarray(value) for name, value in step(x, y).items()}
               for x, y in strategy.experimental_distribute_dataset(dataset)]
    values = {name: np.asarray(v.read_value())
              for name, v in state.checkpoint_variables().items()}
    return values, outputs


def _reference(images, labels, method: str, replicas: int, micro_batches: int,
               lr_factor: Optional[int] = None, order: Optional[Sequence[int]] = None):
    """The same updates by hand on one device (see the module docstring).

    ``images[u * micro_batches + j]`` is the j-th global batch of update u; replica r's share is
    its r-th slice. ``order`` permutes the micro-batches within an update (the gradients'
    mean does not depend on it; the moving statistics and the later attacks do).
    """
    from adversarial_logit_pairing import adversarial_attack, model_lib, training

    hparams = _hparams(method)
    paired = method != "clean"
    batch = images.shape[1] // replicas
    model = _model()
    trainable = list(model.trainable_variables)
    statistics = {name: v for name, v in model.variables_by_name.items()
                  if name.endswith(("moving_mean", "moving_variance"))}
    copies = [{name: v.numpy() for name, v in statistics.items()} for _ in range(replicas)]
    global_step = tf.Variable(0, dtype=tf.int64)
    rate = LEARNING_RATE * (lr_factor or replicas * micro_batches)
    optimizer = tf.compat.v1.train.RMSPropOptimizer(
        rate, decay=hparams.rmsprop_decay, momentum=hparams.momentum,
        epsilon=hparams.rmsprop_epsilon)
    shadows = {name: v.numpy() for name, v in model.variables_by_name.items()}

    def inference(x):
        return model(x, is_training=False)

    losses = []
    for update in range(images.shape[0] // micro_batches):
        sums = [tf.zeros_like(v) for v in trainable]
        totals = []
        for r in range(replicas):
            for name, v in statistics.items():
                v.assign(copies[r][name])
            for j in order or range(micro_batches):
                index = update * micro_batches + j
                x = tf.constant(images[index, r * batch:(r + 1) * batch])
                one_hot = tf.one_hot(labels[index, r * batch:(r + 1) * batch], NUM_CLASSES)
                if paired:
                    seed = tf.constant([SEED, update], tf.int64)
                    if replicas > 1:
                        seed = tf.random.experimental.stateless_fold_in(seed, r)
                    seed = tf.random.experimental.stateless_fold_in(seed, j)
                    adv = adversarial_attack.generate_adversarial_examples(
                        x, BOUNDS, inference, method, seed=seed)
                    x, one_hot = tf.concat([x, adv], 0), tf.concat([one_hot, one_hot], 0)
                with tf.GradientTape() as tape:
                    loss = training.alp_losses(model(x, is_training=True), one_hot, trainable,
                                               hparams)["total_loss"]
                sums = [s + g for s, g in zip(sums, tape.gradient(loss, trainable))]
                totals.append(float(loss))
            copies[r] = {name: v.numpy() for name, v in statistics.items()}
        for name, v in statistics.items():
            v.assign(np.mean([copy[name] for copy in copies], axis=0))
        count = replicas * micro_batches
        optimizer.apply_gradients([(s / count, v) for s, v in zip(sums, trainable)],
                                  global_step=global_step)
        step = int(global_step.numpy())
        decay = min(EMA_DECAY, (1.0 + step) / (10.0 + step))  # TF1 num_updates=global_step
        for name, v in model.variables_by_name.items():
            shadows[name] = decay * shadows[name] + (1 - decay) * v.numpy()
        losses.append(float(np.mean(totals)))

    state = {name: v.numpy() for name, v in model.variables_by_name.items()}
    state["global_step"] = global_step.numpy()
    for v in trainable:
        name = model_lib.variable_name(v)
        state[name + "/RMSProp"] = optimizer.get_slot(v, "rms").numpy()
        state[name + "/RMSProp_1"] = optimizer.get_slot(v, "momentum").numpy()
    state.update({name + "/ExponentialMovingAverage": value for name, value in shadows.items()})
    return state, losses


def _assert_states_close(actual: dict, expected: dict, rtol: float = 2e-4,
                         atol: float = 2e-6) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol,
                                   err_msg=name)


MOVING_MEAN = f"{MODEL}/postnorm/moving_mean"


# ---- One device -------------------------------------------------------------------------------

def test_two_micro_batches_make_one_update_with_their_mean_gradient():
    """N=2 on one device with batches A, B, C, D: two updates, (A, B) then (C, D)."""
    images, labels = _batches(4, BATCH)
    state, outputs = _run(tf.distribute.get_strategy(), images, labels, ALP,
                          replicas_to_aggregate=2)
    expected, losses = _reference(images, labels, ALP, replicas=1, micro_batches=2)
    # Weights, optimizer slots, moving statistics (A then B), moving averages (once per
    # update, with num_updates = global_step) and the global step (once per update).
    _assert_states_close(state, expected)
    assert int(state["global_step"]) == 2
    np.testing.assert_allclose([o["total_loss"] for o in outputs], losses, rtol=1e-5)
    # The learning rate x2, as SyncReplicasOptimizer's user multiplied it.
    np.testing.assert_allclose([o["learning_rate"] for o in outputs], 2 * LEARNING_RATE)
    # The statistics saw A then B: the other order gives other statistics.
    swapped, _ = _reference(images, labels, ALP, replicas=1, micro_batches=2, order=(1, 0))
    assert not np.allclose(state[MOVING_MEAN], swapped[MOVING_MEAN], rtol=1e-3, atol=1e-5)


def test_the_micro_batch_loop_traces_the_model_as_often_as_one_batch(monkeypatch):
    """An in-graph loop: the step's graph holds one attack and one training pass, whatever N."""
    from adversarial_logit_pairing.models import resnet_v2

    calls = []
    original = resnet_v2.ResNetV2.__call__

    def counted(self, images, is_training):
        calls.append(is_training)  # Python runs only while TensorFlow traces
        return original(self, images, is_training)

    monkeypatch.setattr(resnet_v2.ResNetV2, "__call__", counted)
    counts = {}
    for n in (1, 3):
        calls.clear()
        images, labels = _batches(n, BATCH)
        _run(tf.distribute.get_strategy(), images, labels, ALP, replicas_to_aggregate=n)
        counts[n] = (calls.count(True), calls.count(False))
    assert counts[3] == counts[1]
    assert counts[3][0] == 1


def test_loss_scaled_accumulation_equals_the_unscaled_one():
    """The float16 path (loss scaling) unscales each micro-batch's gradients before the mean.

    A float32 model makes the scaling by a power of two exact, so both runs must agree.
    """
    from adversarial_logit_pairing import precision

    images, labels = _batches(2, BATCH, seed=1)
    strategy = tf.distribute.get_strategy()
    plain, _ = _run(strategy, images, labels, ALP, replicas_to_aggregate=2)
    loss_scale = precision.LossScale(initial_scale=2.0**10)
    scaled, outputs = _run(strategy, images, labels, ALP, replicas_to_aggregate=2,
                           loss_scale=loss_scale, num_summary_images=2)
    _assert_states_close(scaled, plain, rtol=1e-6, atol=1e-8)
    assert float(loss_scale.current.numpy()) == 2.0**10  # finite: applied, not skipped
    assert outputs[0]["adv_images"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(outputs[0]["images"], images[0, :2])


def test_xla_compiled_accumulation_equals_the_reference():
    """``--jit_compile`` compiles the whole step, micro-batch loop included.

    Clean training: under XLA the stateless random ops draw other numbers, so the attack's
    random start (and then everything) differs from the uncompiled reference. XLA's CPU kernels
    also round differently (up to about 1e-4 relative after one step),
    so each variable is compared by the norm of its difference.
    """
    images, labels = _batches(2, BATCH, seed=2)
    state, outputs = _run(tf.distribute.get_strategy(), images, labels, "clean",
                          replicas_to_aggregate=2, jit_compile=True)
    expected, losses = _reference(images, labels, "clean", replicas=1, micro_batches=2)
    assert set(state) == set(expected) and int(state["global_step"]) == 1
    for name, value in expected.items():
        error = np.linalg.norm(state[name] - value)
        assert error <= 1e-3 * np.linalg.norm(value) + 1e-6, name
    np.testing.assert_allclose(outputs[0]["total_loss"], losses[0], rtol=1e-5)


def test_group_micro_batches_gives_each_replica_its_share_of_successive_global_batches():
    from adversarial_logit_pairing import training

    # Four global batches of 2 replicas x 2 examples, numbered 0..15 (images carry the number).
    numbers = np.arange(16).reshape(4, 4)
    images = np.broadcast_to(numbers[..., None, None, None], (4, 4, 2, 2, 3)).astype(np.float32)
    dataset = training.group_micro_batches(
        tf.data.Dataset.from_tensor_slices((images, numbers)), 2, 2)
    elements = [(np.asarray(x), np.asarray(y)) for x, y in dataset]
    assert len(elements) == 2
    first_images, first_labels = elements[0]
    assert first_images.shape == (4, 2, 2, 2, 3) and first_labels.shape == (4, 2)
    # Replica 0 (rows 0-1): its half of batch 0, then of batch 1; replica 1 (rows 2-3) likewise.
    np.testing.assert_array_equal(first_labels, [[0, 1], [4, 5], [2, 3], [6, 7]])
    np.testing.assert_array_equal(first_images[:, :, 0, 0, 0], first_labels)
    np.testing.assert_array_equal(elements[1][1], [[8, 9], [12, 13], [10, 11], [14, 15]])
    # k = 1: the dataset itself.
    plain = tf.data.Dataset.from_tensor_slices((images, numbers))
    assert training.group_micro_batches(plain, 1, 2) is plain


def test_replicas_to_aggregate_is_one_or_a_multiple_of_the_replicas_in_sync():
    from adversarial_logit_pairing import training
    from adversarial_logit_pairing.errors import ConfigError

    # The learning-rate factor: max(N, replicas); N / replicas micro-batches per replica.
    assert training.learning_rate_replicas(1, 1) == 1
    assert training.learning_rate_replicas(1, 3) == 3
    assert training.learning_rate_replicas(2, 1) == 2
    assert training.learning_rate_replicas(2, 2) == 2
    assert training.learning_rate_replicas(2, 6) == 6
    for replicas, n in ((2, 3), (4, 2), (4, 6)):
        with pytest.raises(ConfigError, match=f"--replicas_to_aggregate={n}: .* multiple of "
                                              f"the {replicas} replicas"):
            training.learning_rate_replicas(replicas, n)
    with pytest.raises(ConfigError, match="--replicas_to_aggregate=0: must be >= 1"):
        training.learning_rate_replicas(2, 0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_counts_updates_epochs_and_learning_rate_with_replicas_to_aggregate(
        tmp_path, dtype):
    from adversarial_logit_pairing import training

    data_dir = str(tmp_path / "data")
    write_tiny_imagenet_tfrecords(data_dir, num_train=32, num_val=8, image_size=IMAGE_SIZE,
                                  seed=0)

    def config(max_steps):
        return training.TrainConfig(
            output_dir=str(tmp_path / "run"), max_steps=max_steps, model_name=MODEL,
            dataset="tiny_imagenet", dataset_image_size=IMAGE_SIZE,
            tiny_imagenet_data_dir=data_dir, save_summaries_steps=1, save_model_steps=1,
            hparams=f"batch_size={BATCH},train_adv_method={ALP},train_lp_weight=0.5",
            replicas_to_aggregate=2, compute_dtype=dtype)

    assert training.train(config(1)).global_step == 1
    result = training.train(config(2))  # resumes at an update boundary
    assert result.global_step == 2 and np.isfinite(result.last_losses["total_loss"])
    # Tiny ImageNet's 100,000 examples per epoch / (batch 4 x 2 batches per update).
    epochs = scalar_events(tmp_path / "run", "current_epoch")
    assert epochs == pytest.approx({1: 1 / 12500, 2: 2 / 12500}, rel=1e-6)
    rates = scalar_events(tmp_path / "run", "learning_rate")
    assert rates == pytest.approx({1: 2 * LEARNING_RATE, 2: 2 * LEARNING_RATE}, rel=1e-6)


# ---- Two replicas (MirroredStrategy on two logical CPUs, in a subprocess) --------------------

def mirrored_experiment(out_path: str) -> None:
    """N=4 over 2 replicas (2 micro-batches each), two updates; saves states and outputs."""
    from adversarial_logit_pairing import distribution

    distribution.split_cpu(2)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    images, labels = _batches(4, 2 * BATCH, seed=5)
    runs = {
        "alp": _run(mirrored, images, labels, ALP, replicas_to_aggregate=4),
        "reference_alp": _reference(images, labels, ALP, replicas=2, micro_batches=2),
        # Synchronised statistics: one device on the global micro-batches, learning rate x4.
        "sync_clean": _run(mirrored, images, labels, "clean", replicas_to_aggregate=4,
                           sync_bn=True),
        "reference_sync_clean": _reference(images, labels, "clean", replicas=1,
                                           micro_batches=2, lr_factor=4),
    }
    summary = {}
    for run, (_, outputs) in runs.items():
        if run.startswith("reference"):
            summary[run] = {"total_loss": outputs}
        else:
            summary[run] = {name: [float(o[name]) for o in outputs]
                            for name in ("total_loss", "learning_rate")}
    save_experiment(out_path, summary, {run: state for run, (state, _) in runs.items()})


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    # Run alone: beside the in-process tests, the replicas' collectives wait on a busy CPU
    # (measured: the module took 108 s instead of 69 s on two cores).
    return run_experiment("tests.test_gradient_accumulation",
                          str(tmp_path_factory.mktemp("mirrored") / "runs"))


@pytest.mark.slow
def test_mirrored_replicas_each_accumulate_their_micro_batches_into_one_update(mirrored):
    summary, states = mirrored
    _assert_states_close(states["alp"], states["reference_alp"])
    assert int(states["alp"]["global_step"]) == 2
    np.testing.assert_allclose(summary["alp"]["total_loss"],
                               summary["reference_alp"]["total_loss"], rtol=1e-5)
    # N=4 gradients per update: the learning rate x4 (not x2, the replicas alone).
    np.testing.assert_allclose(summary["alp"]["learning_rate"], 4 * LEARNING_RATE)


@pytest.mark.slow
def test_mirrored_sync_batch_norm_accumulation_equals_one_device_on_the_global_batches(
        mirrored):
    summary, states = mirrored
    _assert_states_close(states["sync_clean"], states["reference_sync_clean"])
    assert int(states["sync_clean"]["global_step"]) == 2
    np.testing.assert_allclose(summary["sync_clean"]["total_loss"],
                               summary["reference_sync_clean"]["total_loss"], rtol=1e-5)


if __name__ == "__main__":
    if sys.argv[1:2] == ["mirrored"] and len(sys.argv) == 3:
        mirrored_experiment(sys.argv[2])
    else:
        raise SystemExit("usage: python -m tests.test_gradient_accumulation mirrored OUT "
                         f"(got {sys.argv[1:]})")
