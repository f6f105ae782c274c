"""Speed of the ALP and AdvProp training steps against their bounds, and of clean training
against Keras fit.

  python bench/train_step.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                             [--repetitions=5] [--dtypes=float32,bfloat16]

Rows, per compute dtype, timed in interleaved rounds (``bench/_timing.interleaved_seconds``):

* ALP step (``pgdll_16_2_10``, logit pairing 0.5) as ``training.train`` runs it
  (``bench/_steps.make_train_step``: attack, one training pass over ``[clean; adv]``, losses,
  TF1 RMSProp, moving average) against its bound: 10 input-gradient passes on B images plus one
  training forward/backward on 2B (``make_training_pass``). The step also runs the attack's
  label pass and the optimizer/EMA updates, which the bound leaves out.
* AdvProp step (the same attack and pairing, ``advprop=true``): the attack through the
  auxiliary batch norms, then two training passes on B (clean through the main batch norms,
  adversarial through the auxiliary ones), against its bound (10 input-gradient passes on B
  plus two training forward/backward passes on B) and against the ALP step.
* clean step (``train_adv_method=clean``) against its bound (one training pass on B), and
  against ``tf_keras.Model.fit`` of the same network (wrapped in a Keras model, RMSprop, no
  moving average, the same in-memory batch repeated), time per step.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402
from bench import _steps, _timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Clean images per step (the ALP step trains on 2x)")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width (Tiny ImageNet)")
flags.DEFINE_integer("repetitions", 5, "Timed rounds after one warm-up round")
flags.DEFINE_integer("fit_steps", 3, "Steps per timed Keras fit call (and per clean round)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")


def keras_fit(model, images, labels, steps: int):
    """A closure running ``steps`` steps of tf_keras ``fit`` on the same network, or None."""
    try:
        import tf_keras
    except ImportError:
        return None

    class Wrapped(tf_keras.Model):
        def __init__(self, net):
            super().__init__()
            self.net = net  # Keras 2 tracks the tf.Module's variables

        def call(self, x, training=False):
            return self.net(x, is_training=bool(training))

    wrapped = Wrapped(model)
    wrapped.compile(optimizer=tf_keras.optimizers.RMSprop(0.01, rho=0.9, epsilon=1.0),
                    loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def run():
        history = wrapped.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        return history.history["loss"][-1]

    return run


# Compute dtype -> median over rounds of AdvProp step time / ALP step time (``measure``).
ADVPROP_VS_ALP: dict[str, float] = {}


def measure(dtype: str, images, labels) -> list[list[object]]:
    """The three table rows (ALP step, AdvProp step, clean step) of one compute dtype."""
    b, n = FLAGS.batch_size, FLAGS.fit_steps
    double = (tf.concat([images, images], 0), tf.concat([labels, labels], 0))
    alp, model = _steps.make_train_step(FLAGS.model, "pgdll_16_2_10", 0.5, FLAGS.num_classes,
                                        dtype)
    advprop, advprop_model = _steps.make_train_step(FLAGS.model, "pgdll_16_2_10", 0.5,
                                                    FLAGS.num_classes, dtype, advprop=True)
    advprop_pass = _steps.make_training_pass(advprop_model, FLAGS.num_classes)
    clean, _ = _steps.make_train_step(FLAGS.model, "clean", 0.0, FLAGS.num_classes, dtype)
    gradient = _steps.input_gradient_fn(model)
    training_pass = _steps.make_training_pass(model, FLAGS.num_classes)
    fit = keras_fit(model, images, labels, n)

    def alp_bound():
        for _ in range(10):
            gradient(images, labels)
        return training_pass(*double)

    def advprop_bound():
        for _ in range(10):
            gradient(images, labels)
        advprop_pass(images, labels)
        return advprop_pass(images, labels)

    contenders = {
        "alp": lambda: alp(images, labels),
        "alp_bound": alp_bound,
        "advprop": lambda: advprop(images, labels),
        "advprop_bound": advprop_bound,
        "clean": lambda: [clean(images, labels) for _ in range(n)][-1],
        "clean_bound": lambda: [training_pass(images, labels) for _ in range(n)][-1],
    }
    if fit is not None:
        contenders["fit"] = fit
    times = _timing.interleaved_seconds(contenders, FLAGS.repetitions)
    alp_s = float(np.median(times["alp"]))
    advprop_s = float(np.median(times["advprop"]))
    ADVPROP_VS_ALP[dtype] = _timing.median_ratio(times["advprop"], times["alp"])
    clean_s = float(np.median(times["clean"])) / n
    return [
        ["ALP pgdll_16_2_10 lp 0.5", dtype, b / alp_s, alp_s,
         _timing.median_ratio(times["alp"], times["alp_bound"]), ""],
        ["AdvProp pgdll_16_2_10 lp 0.5", dtype, b / advprop_s, advprop_s,
         _timing.median_ratio(times["advprop"], times["advprop_bound"]), ""],
        ["clean", dtype, b / clean_s, clean_s,
         _timing.median_ratio(times["clean"], times["clean_bound"]),
         _timing.median_ratio(times["fit"], times["clean"]) if "fit" in times else "n/a"],
    ]


def main(argv: list[str]) -> None:
    del argv
    b = FLAGS.batch_size
    images, labels = _steps.images_and_labels(b, FLAGS.image_size, FLAGS.num_classes)
    rows = []
    for dtype in FLAGS.dtypes:
        rows.extend(measure(dtype, images, labels))

    print()
    print(_timing.machine_header(
        f"Training step: {FLAGS.model}, {FLAGS.image_size}x{FLAGS.image_size}, batch "
        f"{b} (ALP trains on 2x{b}), {FLAGS.num_classes} classes, {FLAGS.repetitions} rounds"))
    print()
    print(_timing.table(["step", "dtype", "images/s", "s/step", "step / bound",
                         "speed vs Keras fit"], rows))
    print("\nALP bound = 10 input-gradient passes on B + one training forward/backward on 2B "
          "(target <= 1.10); AdvProp bound = 10 input-gradient passes on B + two training "
          "forward/backward passes on B; clean bound = one training forward/backward on B; "
          "speed vs Keras fit = fit's time per step / ours (ours also applies weight decay "
          "and a moving average)")
    for dtype, ratio in ADVPROP_VS_ALP.items():
        print(f"AdvProp step / ALP step ({dtype}): {ratio:.2f}")


if __name__ == "__main__":
    app.run(main)
