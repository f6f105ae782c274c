"""Speed of the ALP, Step-LL, LLR, AdvProp and ensemble training steps against their bounds,
of clean training against Keras fit, and of the bounds' unit, one input-gradient pass.

  python bench/train_step.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                             [--repetitions=5] [--dtypes=float32,bfloat16]
                             [--rows=alp,stepll,llr,advprop,ensemble,clean]
  python bench/train_step.py --model=inception_v3 --image_size=299 --batch_size=8 \
      --rows=stepll,ensemble,clean --dtypes=float32
  python bench/train_step.py --model=efficientnet_b0_ap --image_size=224 --batch_size=8 \
      --rows=alp,advprop --dtypes=float32,bfloat16

The logits are as wide as the data set the image size stands for (``--num_classes`` unset):
Tiny ImageNet's 200 at 64 px and below, else the model's ImageNet head (1001 with TF-Slim's
background class for ``inception_v3`` and ``resnet_v2_50``, 1000 for EfficientNet). A model
with an auxiliary head trains it, so the image size must suit that head as ``train.py`` builds
it (``inception_v3``: 299 to 346 px, the sides of its 5x5 ``AuxLogits`` kernel); another size
stops the script at once with the model's message.

Rows, per compute dtype, timed in interleaved rounds (``bench/_timing.interleaved_seconds``):

* input-gradient pass (its own table): ONE forward + backward to the input in inference mode
  on B images (``bench/_steps.input_gradient_fn``), the unit of every bound below; printed in
  ms per pass and images/s.
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
* ensemble step (``--ensemble_sources`` with ONE static source, Tramer et al.'s ensemble
  adversarial training, ``bench/_steps.make_ensemble_train_step``): the Step-LL step above as
  ``training.train`` runs it with a static source, i.e. a second model of the same registered
  name with its own variables, read from a TF1 checkpoint of a fresh model (other weights
  than the trained one) by ``ensemble.build_static_sources``: frozen, inference mode; each
  step draws the attack's source (the trained model or the static one) inside the compiled
  step. Its bound is the Step-LL bound (one input-gradient pass on B + one training
  forward/backward on 2B): each step's attack runs on exactly one source, and the static
  source's gradient pass is the trained model's inference-mode pass with other weights. It is
  also reported against the same step without static sources (``time / Step-LL step``, timed
  in the same rounds even when ``stepll`` is not among ``--rows``). Below the table: how many
  of the row's steps drew the static source (the step's ``adv_source``), and whether the
  static source's variables still equal its checkpoint after all of them (read back with
  ``tf.train.load_checkpoint``).
* clean step (``train_adv_method=clean``) against its bound (one training pass on B), and
  against ``tf_keras.Model.fit`` of the same network (wrapped in a Keras model, RMSprop, no
  moving average, the same in-memory batch repeated), time per step.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing import ensemble  # noqa: E402
from adversarial_logit_pairing.errors import ConfigError  # noqa: E402
from bench import _steps, _timing  # noqa: E402

FLAGS = flags.FLAGS
# The regulariser at the ALP attack's strength (eps 16, 10 steps), from the first step.
LLR_HPARAMS = "llr_lambda=4,llr_eps=16,llr_steps=10,llr_eps_warmup_steps=0"
ROWS = ("alp", "stepll", "llr", "advprop", "ensemble", "clean")
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Clean images per step (the ALP step trains on 2x)")
flags.DEFINE_integer("num_classes", None, "Logits width; default: Tiny ImageNet's 200 at "
                     "--image_size<=64, else the model's ImageNet classes (1001 for TF-Slim "
                     "models, 1000 for EfficientNet)")
flags.DEFINE_integer("repetitions", 5, "Timed rounds after one warm-up round")
flags.DEFINE_integer("fit_steps", 3, "Steps per timed Keras fit call (and per clean round)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")
flags.DEFINE_list("rows", list(ROWS), "Steps to measure: " + ", ".join(ROWS))
flags.register_validator("rows", lambda rows: set(rows) <= set(ROWS),
                         "--rows: each one of " + ", ".join(ROWS))


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


def equals_checkpoint(model, prefix: str) -> bool:
    """Whether every variable of ``model`` holds exactly its value in checkpoint ``prefix``
    (read by TensorFlow's own checkpoint reader)."""
    reader = tf.train.load_checkpoint(prefix)
    return all(np.array_equal(variable.numpy(), reader.get_tensor(name))
               for name, variable in model.variables_by_name.items())


def measure(dtype: str, images, labels, num_classes: int,
            source: Optional[ensemble.StaticSource]) -> tuple[list[list[object]],
                                                               list[object], list[str]]:
    """One dtype's measurements: the table rows (ALP, Step-LL, LLR, AdvProp, ensemble and
    clean steps: those in --rows), the input-gradient pass row, and notes on the ensemble
    row's static source (``source``, given when the ensemble row is measured)."""
    b, n = FLAGS.batch_size, FLAGS.fit_steps
    double = (tf.concat([images, images], 0), tf.concat([labels, labels], 0))
    clean, model = _steps.make_train_step(FLAGS.model, "clean", 0.0, num_classes, dtype)
    gradient = _steps.input_gradient_fn(model)
    training_pass = _steps.make_training_pass(model, num_classes)
    second_order_pass = _steps.make_second_order_pass(model, num_classes)
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
        "gradient": lambda: gradient(images, labels),
        "clean": lambda: [clean(images, labels) for _ in range(n)][-1],
        "clean_bound": lambda: [training_pass(images, labels) for _ in range(n)][-1],
    }
    adversarial = {"alp": ("pgdll_16_2_10", 0.5, 10), "stepll": ("stepll_16", 0.0, 1)}
    for row, (attack, lp_weight, passes) in adversarial.items():
        # The ensemble row is also compared with its step without static sources: Step-LL's.
        if row in FLAGS.rows or (row == "stepll" and "ensemble" in FLAGS.rows):
            step, _ = _steps.make_train_step(FLAGS.model, attack, lp_weight, num_classes,
                                             dtype)
            contenders[row] = lambda step=step: step(images, labels)
            contenders[row + "_bound"] = bound(passes)
    if "llr" in FLAGS.rows:
        llr, _ = _steps.make_train_step(FLAGS.model, "clean", 0.0, num_classes, dtype,
                                        extra_hparams=LLR_HPARAMS)
        contenders["llr"] = lambda: llr(images, labels)
        contenders["llr_bound"] = llr_bound
    if "advprop" in FLAGS.rows:
        advprop, advprop_model = _steps.make_train_step(
            FLAGS.model, "pgdll_16_2_10", 0.5, num_classes, dtype, advprop=True)
        advprop_pass = _steps.make_training_pass(advprop_model, num_classes)
        contenders["advprop"] = lambda: advprop(images, labels)
        contenders["advprop_bound"] = lambda: advprop_bound(advprop_pass)
    drawn: list[tf.Tensor] = []  # each ensemble step's adv_source
    if "ensemble" in FLAGS.rows:
        ensemble_step, _, (static,) = _steps.make_ensemble_train_step(
            FLAGS.model, [source], *adversarial["stepll"][:2], num_classes, dtype)

        def run_ensemble():
            outputs = ensemble_step(images, labels)
            drawn.append(outputs[ensemble.SOURCE_OUTPUT])
            return outputs

        contenders["ensemble"] = run_ensemble
        contenders["ensemble_bound"] = contenders["stepll_bound"]
    fit = keras_fit(model, images, labels, n) if "clean" in FLAGS.rows else None
    if fit is not None:
        contenders["fit"] = fit
    times = _timing.interleaved_seconds(contenders, FLAGS.repetitions)
    clean_s = float(np.median(times["clean"])) / n
    names = {"alp": "ALP pgdll_16_2_10 lp 0.5", "stepll": "Step-LL stepll_16",
             "llr": "LLR eps 16, 10 steps", "advprop": "AdvProp pgdll_16_2_10 lp 0.5",
             "ensemble": "ensemble stepll_16, 1 static source"}
    rows = []
    for row in ("alp", "stepll", "llr", "advprop", "ensemble"):
        if row in FLAGS.rows:
            seconds = float(np.median(times[row]))
            rows.append([names[row], dtype, b / seconds, seconds,
                         _timing.median_ratio(times[row], times[row + "_bound"]), "",
                         seconds / clean_s if "clean" in FLAGS.rows else "n/a",
                         _timing.median_ratio(times[row], times["alp"])
                         if row != "alp" and "alp" in times else "",
                         _timing.median_ratio(times[row], times["stepll"])
                         if row == "ensemble" else ""])
    if "clean" in FLAGS.rows:
        rows.append(["clean", dtype, b / clean_s, clean_s,
                     _timing.median_ratio(times["clean"], times["clean_bound"]),
                     _timing.median_ratio(times["fit"], times["clean"]) if "fit" in times
                     else "n/a", 1.0, "", ""])
    gradient_s = float(np.median(times["gradient"]))
    gradient_row = [dtype, 1000 * gradient_s, b / gradient_s]
    notes = []
    if drawn:
        from_static = int(sum(int(value.numpy()) == 1 for value in drawn))
        notes.append(f"ensemble, {dtype}: the static source made the adversarial examples of "
                     f"{from_static} of the row's {len(drawn)} steps (warm-up included); its "
                     f"variables equal its checkpoint after them: "
                     f"{'yes' if equals_checkpoint(static, source.checkpoint) else 'NO'}")
    return rows, gradient_row, notes


def check_image_size(num_classes: int) -> None:
    """One eager inference pass on one image, with the auxiliary head if the model has one
    (the training steps run it): a size the network cannot take fails here, naming the flag,
    rather than in the middle of a traced step."""
    model = _steps.build_model(FLAGS.model, num_classes)
    image = tf.zeros([1, FLAGS.image_size, FLAGS.image_size, 3])
    try:
        if model.config.aux_loss_weight is not None:
            model.logits_and_aux(image, is_training=False)
        else:
            model(image, is_training=False)
    except ConfigError as exc:
        raise SystemExit(f"--image_size={FLAGS.image_size} for --model={FLAGS.model}: "
                             f"{exc}") from None


def main(argv: list[str]) -> None:
    del argv
    b = FLAGS.batch_size
    num_classes = FLAGS.num_classes or _steps.default_num_classes(FLAGS.model, FLAGS.image_size)
    check_image_size(num_classes)
    images, labels = _steps.images_and_labels(b, FLAGS.image_size, num_classes)
    rows, gradient_rows, notes = [], [], []
    with tempfile.TemporaryDirectory() as directory:
        source = (_steps.write_static_source(FLAGS.model, num_classes, directory)
                  if "ensemble" in FLAGS.rows else None)
        for dtype in FLAGS.dtypes:
            dtype_rows, gradient_row, dtype_notes = measure(dtype, images, labels, num_classes,
                                                            source)
            rows.extend(dtype_rows)
            gradient_rows.append(gradient_row)
            notes.extend(dtype_notes)

    print()
    print(_timing.machine_header(
        f"Training step: {FLAGS.model}, {FLAGS.image_size}x{FLAGS.image_size}, batch "
        f"{b} (ALP trains on 2x{b}), {num_classes} classes, {FLAGS.repetitions} rounds"))
    print()
    print(_timing.table(["input-gradient pass", "ms/pass", "images/s"], gradient_rows))
    print(f"\n(one forward + backward to the input, inference mode, on B={b} images: the "
          "unit of the bounds below)")
    print()
    print(_timing.table(["step", "dtype", "images/s", "s/step", "step / bound",
                         "speed vs Keras fit", "time / clean step", "time / ALP step",
                         "time / Step-LL step"], rows))
    print("\nALP bound = 10 input-gradient passes on B + one training forward/backward on 2B "
          "(target <= 1.10); Step-LL bound = one input-gradient pass on B + one training "
          "forward/backward on 2B; clean bound = one training forward/backward on B; speed vs "
          "Keras fit = fit's time per step / ours (ours also applies weight decay and a moving "
          "average); LLR bound = one training forward/backward on B + 10 input-gradient passes "
          "on B + one forward on B with a second-order backward; time / clean (ALP) step = "
          "s/step over the clean (ALP) step's; AdvProp bound = 10 input-gradient passes on B "
          "+ two training forward/backward passes on B; ensemble bound = the Step-LL bound "
          "(each step attacks through one source, the static one costing what the trained "
          "model's inference pass costs); time / Step-LL step = the ensemble step over the "
          "same step without static sources")
    for note in notes:
        print(note)


if __name__ == "__main__":
    app.run(main)
