"""Our TF1-semantics pieces against TensorFlow's own implementation of the same thing.

  python bench/tf_parts.py [--model=resnet_v2_50] [--image_size=64] [--repetitions=7]

The numbers behind the one-line "why not TensorFlow's" of ``moving_average``, ``optimizers``
and ``checkpoints`` (``lr_schedules`` uses TensorFlow's functions and is not timed here). On
one device, each pair is timed in interleaved rounds (``bench/_timing.interleaved_seconds``)
over the model's state:

* moving average: ``ExponentialMovingAverage.apply`` vs ``tf.train.ExponentialMovingAverage``
  over every model variable, each in a ``tf.function``, with the largest difference of the
  shadows after the timed applies (0 means the same numbers);
* optimizer: one ``optimizers.RMSProp`` step vs ``tf.compat.v1.train.RMSPropOptimizer`` on the
  trainable variables (the original's settings), same gradients, same largest-difference check;
* checkpoint: ``checkpoints.save`` of the training state (model, ``global_step``, RMSProp slots,
  shadows) vs ``tf.compat.v1.train.Saver.save`` of the same dict, and whether the two
  checkpoints list the same names and shapes.
"""

from __future__ import annotations

import os
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing import checkpoints  # noqa: E402
from adversarial_logit_pairing.moving_average import ExponentialMovingAverage  # noqa: E402
from adversarial_logit_pairing.optimizers import RMSProp  # noqa: E402
from bench import _steps, _timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side (builds the variables)")
flags.DEFINE_integer("num_classes", 200, "Logits width (Tiny ImageNet: 200)")
flags.DEFINE_integer("repetitions", 7, "Timed rounds after one warm-up round")


def _largest_difference(pairs) -> float:
    return max(float(tf.reduce_max(tf.abs(a - b))) for a, b in pairs)


def main(argv):
    del argv
    model = _steps.build_model(FLAGS.model, FLAGS.num_classes)
    model(tf.zeros([1, FLAGS.image_size, FLAGS.image_size, 3]), is_training=False)
    variables = dict(model.variables_by_name)
    trainable = list(model.trainable_variables)
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.normal(scale=0.01, size=v.shape.as_list()).astype(np.float32))
             for v in trainable]
    rows = []

    ours_step = tf.Variable(0, dtype=tf.int64)
    theirs_step = tf.Variable(0, dtype=tf.int64)
    ours_ema = ExponentialMovingAverage(0.9999, variables)
    theirs_ema = tf.train.ExponentialMovingAverage(0.9999, num_updates=theirs_step)
    theirs_ema.apply(list(variables.values()))  # creates the shadows (a no-op update)

    @tf.function
    def ours_apply():
        ours_step.assign_add(1)
        ours_ema.apply(ours_step)

    @tf.function
    def theirs_apply():
        theirs_step.assign_add(1)
        theirs_ema.apply(list(variables.values()))

    times = _timing.interleaved_seconds({"ours": ours_apply, "tf": theirs_apply},
                                        FLAGS.repetitions)
    difference = _largest_difference(
        (ours_ema.shadow(name), theirs_ema.average(v)) for name, v in variables.items())
    rows.append(["moving average apply", "tf.train.ExponentialMovingAverage", times, difference])

    ours_opt = RMSProp(0.045, 0.9, 0.9, 1.0)
    # Copies, so that both start from the same values; named like the originals.
    ours_vars = [tf.Variable(v, name=v.name[:-2]) for v in trainable]
    theirs_vars = [tf.Variable(v, name=v.name[:-2]) for v in trainable]
    ours_opt.build(ours_vars)
    theirs_opt = tf.compat.v1.train.RMSPropOptimizer(0.045, 0.9, 0.9, 1.0)

    @tf.function
    def ours_update():
        ours_opt.apply_gradients(list(zip(grads, ours_vars)), ours_step)

    @tf.function
    def theirs_update():
        theirs_opt.apply_gradients(list(zip(grads, theirs_vars)), global_step=theirs_step)

    times = _timing.interleaved_seconds({"ours": ours_update, "tf": theirs_update},
                                        FLAGS.repetitions)
    difference = _largest_difference(zip(ours_vars, theirs_vars))
    rows.append(["RMSProp step", "tf.compat.v1.train.RMSPropOptimizer", times, difference])

    state = dict(variables, global_step=ours_step)
    state.update(ours_opt.variables_by_name())
    state.update(ours_ema.variables_by_name())
    ours_dir, theirs_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
    saver = tf.compat.v1.train.Saver(state, max_to_keep=2)
    counter = iter(range(10**6))
    times = _timing.interleaved_seconds({
        "ours": lambda: checkpoints.save(state, ours_dir, next(counter), max_to_keep=2),
        "tf": lambda: saver.save(
            None, os.path.join(theirs_dir, checkpoints.CHECKPOINT_BASENAME),
            global_step=next(counter)),
    }, FLAGS.repetitions)
    same = (tf.train.list_variables(checkpoints.latest_checkpoint(ours_dir))
            == tf.train.list_variables(tf.train.latest_checkpoint(theirs_dir)))
    rows.append([f"checkpoint save ({len(state)} tensors)", "tf.compat.v1.train.Saver", times,
                 "same names" if same else "OTHER NAMES"])

    print(_timing.machine_header(f"Our pieces vs TensorFlow's, {FLAGS.model} "
                                 f"({sum(v.shape.num_elements() for v in variables.values()):,}"
                                 " model floats)"))
    print()
    table = [[piece, contender, 1e3 * float(np.median(t["ours"])),
              1e3 * float(np.median(t["tf"])), _timing.median_ratio(t["tf"], t["ours"]), check]
             for piece, contender, t, check in rows]
    print(_timing.table(["piece", "TensorFlow's", "ours ms", "tf ms", "tf/ours", "max |diff|"],
                        table))


if __name__ == "__main__":
    app.run(main)
