"""The attack and the training step trace once per input shape, not once per call.

A model's Python ``__call__`` runs only while TensorFlow traces a graph (a compiled function
replays the graph without Python), so counting its Python calls counts traces.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack, training
from adversarial_logit_pairing.models import resnet_v2
from tests.data_builders import write_tiny_imagenet_tfrecords

BOUNDS = (-1.0, 1.0)


class CountingNet(tf.Module):
    """A small classifier that counts how often Python runs its body (= traces)."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(0, 0.3, (3, 5)).astype(np.float32))
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return tf.reduce_mean(x, axis=[1, 2]) @ self.w


def _images(n, size=8, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)),
                       tf.float32)


@pytest.mark.parametrize("seed", [None, (1, 2)])
def test_eager_attack_traces_once_per_input_shape(seed):
    model = CountingNet()
    adversarial_attack.generate_adversarial_examples(_images(4), BOUNDS, model, "pgd_8_2_3",
                                                     seed=seed)
    per_trace = model.calls
    assert per_trace > 0
    for i in range(3):  # same shapes, new values: no new trace
        adversarial_attack.generate_adversarial_examples(_images(4, seed=i + 1), BOUNDS, model,
                                                         "pgd_8_2_3", seed=seed)
    assert model.calls == per_trace
    # A new batch size traces once more (into a shape-relaxed graph), then never again.
    for n in (6, 6, 7, 9):
        adversarial_attack.generate_adversarial_examples(_images(n), BOUNDS, model,
                                                         "pgd_8_2_3", seed=seed)
    assert model.calls == 2 * per_trace


def test_attack_inside_a_user_function_is_traced_with_it_once():
    model = CountingNet()

    @tf.function
    def robust_accuracy(images, step):
        seed = tf.stack([tf.constant(0, tf.int64), step])
        adv = adversarial_attack.generate_adversarial_examples(
            images, BOUNDS, model, "pgdll_8_2_3", seed=seed)
        return tf.reduce_mean(tf.cast(tf.argmax(model(adv), -1) == tf.argmax(model(images), -1),
                                      tf.float32))

    for step in range(4):
        robust_accuracy(_images(4, seed=step), tf.constant(step, tf.int64))
    assert robust_accuracy.experimental_get_tracing_count() == 1
    # One trace: the label pass, the PGD loop body and the two scoring calls.
    assert model.calls == 4


def test_training_step_traces_once(tmp_path, monkeypatch):
    """train() for 1 step and for 3 steps trace the model the same number of times."""
    data_dir = str(tmp_path / "data")
    write_tiny_imagenet_tfrecords(data_dir, num_train=32, num_val=8, image_size=16, seed=0)
    calls = []
    original = resnet_v2.ResNetV2.__call__

    def counted(self, images, is_training):
        calls.append(is_training)
        return original(self, images, is_training)

    monkeypatch.setattr(resnet_v2.ResNetV2, "__call__", counted)
    counts = []
    for max_steps in (1, 3):
        calls.clear()
        training.train(training.TrainConfig(
            output_dir=str(tmp_path / f"run{max_steps}"), max_steps=max_steps,
            model_name="resnet_v2_tiny", dataset="tiny_imagenet", dataset_image_size=16,
            tiny_imagenet_data_dir=data_dir, save_summaries_steps=1, save_model_steps=100,
            hparams="batch_size=4,train_adv_method=pgdll_8_2_2,train_lp_weight=0.5"))
        counts.append(len(calls))
    # Label pass + PGD body (inference) and the training pass, each traced once.
    assert counts[0] == counts[1]
    assert calls.count(True) >= 1 and calls.count(False) >= 2
