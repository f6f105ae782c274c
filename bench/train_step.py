"""Speed of the ALP, Step-LL, LLR and AdvProp training steps against their bounds, and of
clean training against Keras fit.

  python bench/train_step.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                             [--repetitions=5] [--dtypes=float32,bfloat16]
                             [--rows=alp,stepll,llr,advprop,clean]

Rows, per compute dtype, timed in interleaved rounds (``bench/_timing.interleaved_seconds``):

* ALP step (``pgdll_16_2_10``, logit pairing 0.5) as ``training.train`` runs it
  (``bench/_steps.make_train_step``: attack, one training pass over ``[clean; adv]``, losses,
  TF1 RMSProp, moving average) against its bound: 10 input-gradient passes on B images plus one
  training forward/backward on 2B (``make_training_pass``). The step also runs the attack's
  label pass and the optimizer/EMA updates, which the bound leaves out.
* Step-LL step (``stepll_16``, ALP's batch of ``[clean; adversarial]``, no pairing) against its
  bound: ONE input-gradient pass on B plus one training forward/backward on 2B (Step-LL takes
  its least-likely class from the gradient pass itself, so it has no separate label pass). For
  a model with an auxiliary head (``inception_v3``) the step also runs that head in the attack
  and the training pass, which the bound leaves out.
* LLR step (local linearity regulariser at the ALP attack's strength: ``llr_eps=16``,
  ``llr_steps=10``, no eps warm-up, clean training) as ``training.train`` runs it, against its
  bound: one training forward/backward on B, 10 input-gradient passes on B (the search), and
  one forward on B with a second-order backward (``make_second_order_pass``). The step also
  runs the regulariser's own clean pass (DeepMind's code has it too), which the bound leaves
  out. ``LLR / ALP`` is the time of the LLR step over the ALP step's.
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
# The regulariser at the ALP attack's strength (eps 16, 10 steps), from the first step.
LLR_HPARAMS = "llr_lambda=4,llr_eps=16,llr_steps=10,llr_eps_warmup_steps=0"
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Clean images per step (the ALP step trains on 2x)")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width (Tiny ImageNet)")
flags.DEFINE_integer("repetitions", 5, "Timed rounds after one warm-up round")
flags.DEFINE_integer("fit_steps", 3, "Steps per timed Keras fit call (and per clean round)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")
flags.DEFINE_list("rows", ["alp", "stepll", "llr", "advprop", "clean"],
                  "Steps to measure: alp, stepll, llr, advprop, clean")


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


def measure(dtype: str, images, labels) -> list[list[object]]:
    """The table rows (ALP, Step-LL, LLR, AdvProp and clean steps: those in --rows) of one
    dtype."""
    b, n = FLAGS.batch_size, FLAGS.fit_steps
    double = (tf.concat([images, images], 0), tf.concat([labels, labels], 0))
    clean, model = _steps.make_train_step(FLAGS.model, "clean", 0.0, FLAGS.num_classes, dtype)
    gradient = _steps.input_gradient_fn(model)
    training_pass = _steps.make_training_pass(model, FLAGS.num_classes)
    second_order_pass = _steps.make_second_order_pass(model, FLAGS.num_classes)
    delta = tf.fill(images.shape, 16 * 2.0 / 255)

    def bound(gradient_passes):
        def run():
            for _ in range(gradient_passes):
                gradient(images, labels)
            return training_pass(*double)
        return run

    def llr_bound():
        training_pass(images, labels)
        for _ in range(10):
            gradient(images, labels)
        return second_order_pass(images, labels, delta)

    def advprop_bound(advprop_pass):
        for _ in range(10):
            gradient(images, labels)
        advprop_pass(images, labels)
        return advprop_pass(images, labels)

    contenders = {
        "clean": lambda: [clean(images, labels) for _ in range(n)][-1],
        "clean_bound": lambda: [training_pass(images, labels) for _ in range(n)][-1],
    }
    adversarial = {"alp": ("pgdll_16_2_10", 0.5, 10), "stepll": ("stepll_16", 0.0, 1)}
    for row, (attack, lp_weight, passes) in adversarial.items():
        if row in FLAGS.rows:
            step, _ = _steps.make_train_step(FLAGS.model, attack, lp_weight, FLAGS.num_classes,
                                             dtype)
            contenders[row] = lambda step=step: step(images, labels)
            contenders[row + "_bound"] = bound(passes)
    if "llr" in FLAGS.rows:
        llr, _ = _steps.make_train_step(FLAGS.model, "clean", 0.0, FLAGS.num_classes, dtype,
                                        extra_hparams=LLR_HPARAMS)
        contenders["llr"] = lambda: llr(images, labels)
        contenders["llr_bound"] = llr_bound
    if "advprop" in FLAGS.rows:
        advprop, advprop_model = _steps.make_train_step(
            FLAGS.model, "pgdll_16_2_10", 0.5, FLAGS.num_classes, dtype, advprop=True)
        advprop_pass = _steps.make_training_pass(advprop_model, FLAGS.num_classes)
        contenders["advprop"] = lambda: advprop(images, labels)
        contenders["advprop_bound"] = lambda: advprop_bound(advprop_pass)
    fit = keras_fit(model, images, labels, n) if "clean" in FLAGS.rows else None
    if fit is not None:
        contenders["fit"] = fit
    times = _timing.interleaved_seconds(contenders, FLAGS.repetitions)
    clean_s = float(np.median(times["clean"])) / n
    names = {"alp": "ALP pgdll_16_2_10 lp 0.5", "stepll": "Step-LL stepll_16",
             "llr": "LLR eps 16, 10 steps", "advprop": "AdvProp pgdll_16_2_10 lp 0.5"}
    rows = []
    for row in ("alp", "stepll", "llr", "advprop"):
        if row in times:
            seconds = float(np.median(times[row]))
            rows.append([names[row], dtype, b / seconds, seconds,
                         _timing.median_ratio(times[row], times[row + "_bound"]), "",
                         seconds / clean_s if "clean" in times else "n/a",
                         _timing.median_ratio(times[row], times["alp"])
                         if row != "alp" and "alp" in times else ""])
    if "clean" in FLAGS.rows:
        rows.append(["clean", dtype, b / clean_s, clean_s,
                     _timing.median_ratio(times["clean"], times["clean_bound"]),
                     _timing.median_ratio(times["fit"], times["clean"]) if "fit" in times
                     else "n/a", 1.0, ""])
    return rows


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
                         "speed vs Keras fit", "time / clean step", "time / ALP step"],
                        rows))
    print("\nALP bound = 10 input-gradient passes on B + one training forward/backward on 2B "
          "(target <= 1.10); Step-LL bound = one input-gradient pass on B + one training "
          "forward/backward on 2B; clean bound = one training forward/backward on B; speed vs "
          "Keras fit = fit's time per step / ours (ours also applies weight decay and a moving "
          "average); LLR bound = one training forward/backward on B + 10 input-gradient passes "
          "on B + one forward on B with a second-order backward; time / clean (ALP) step = "
          "s/step over the clean (ALP) step's; AdvProp bound = 10 input-gradient passes on B "
          "+ two training forward/backward passes on B")


if __name__ == "__main__":
    app.run(main)
