"""Speed of the project's PGD against its bound and against cleverhans 4 and IBM ART.

  python bench/attack.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                         [--repetitions=5] [--dtypes=float32,bfloat16]

For each attack (``pgd_16_2_10``: untargeted, against the prediction; ``pgdll_16_2_10``:
targeted at the least-likely class) and compute dtype, one round times, back to back:

* ours: ``generate_adversarial_examples`` called eagerly (its compiled function is cached)
  on ``model.inference``, so a bfloat16 model casts its weights once per attack;
* ours, per-step casts (bfloat16/float16 only): the same attack given the model as a lambda,
  which casts every weight in every step; column ``casts once speed-up`` = its time / ours;
* bound: 10 x one input-gradient pass of the same model (``bench/_steps.input_gradient_fn``);
  ours also runs one forward pass for the labels, so ``ours / bound`` >= ~1.03 by design;
* cleverhans 4 ``cleverhans.tf2.attacks.projected_gradient_descent`` and ART 1.x
  ``ProjectedGradientDescent`` on a ``TensorFlowV2Classifier``, with the same model (given to
  them as a compiled ``tf.function``, as a careful user would), batch, eps 32/255 (16 on the
  0..255 scale with bounds (-1, 1)), step 4/255, 10 iterations, random start, and labels from
  the model's prediction (argmin for pgdll) computed inside the timed call as ours does.

The table gives medians over rounds of per-round ratios. The peers are optional
(``pip install --no-deps cleverhans adversarial-robustness-toolbox tqdm``); a missing one
shows 'n/a'.
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
flags.DEFINE_integer("batch_size", 32, "Images per attack call")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width (Tiny ImageNet)")
flags.DEFINE_integer("repetitions", 5, "Timed rounds after one warm-up round")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")
flags.DEFINE_list("attacks", ["pgd_16_2_10", "pgdll_16_2_10"], "Attack descriptions")


def cleverhans_attack(forward, spec, scale):
    """cleverhans 4's PGD, or None when it is not installed."""
    try:
        from cleverhans.tf2.attacks.projected_gradient_descent import (
            projected_gradient_descent,
        )
    except ImportError:
        return None
    eps, step = spec.eps * scale, spec.step * scale

    def run(images):
        labels = None  # untargeted: cleverhans takes argmax of the prediction itself
        if spec.method == "pgdll":
            labels = tf.argmin(forward(images), axis=-1)
        return projected_gradient_descent(
            forward, images, eps, step, spec.num_iter, np.inf,
            clip_min=_steps.BOUNDS[0], clip_max=_steps.BOUNDS[1], y=labels,
            targeted=spec.method == "pgdll", rand_init=True, rand_minmax=eps,
            sanity_checks=False)

    return run


def art_attack(forward, spec, scale, num_classes, image_size, batch_size):
    """ART's PGD on a TensorFlowV2Classifier, or None when ART is not installed."""
    try:
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier
    except ImportError:
        return None
    classifier = TensorFlowV2Classifier(
        model=lambda x, training=False: forward(x),
        nb_classes=num_classes,
        input_shape=(image_size, image_size, 3),
        # A sum, like ours and cleverhans': the sign of the gradient is what matters anyway.
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction="sum"),
        clip_values=_steps.BOUNDS,
    )
    attack = ProjectedGradientDescent(
        classifier, norm=np.inf, eps=spec.eps * scale, eps_step=spec.step * scale,
        max_iter=spec.num_iter, targeted=spec.method == "pgdll", num_random_init=1,
        batch_size=batch_size, verbose=False)

    def run(images):
        logits = forward(images)
        pick = tf.argmin if spec.method == "pgdll" else tf.argmax
        one_hot = tf.one_hot(pick(logits, axis=-1), num_classes).numpy()
        return attack.generate(images.numpy(), y=one_hot)

    return run


def main(argv: list[str]) -> None:
    del argv
    from adversarial_logit_pairing.adversarial_attack import parse_attack_description

    scale = (_steps.BOUNDS[1] - _steps.BOUNDS[0]) / 255.0
    images, labels = _steps.images_and_labels(FLAGS.batch_size, FLAGS.image_size,
                                              FLAGS.num_classes)
    rows = []
    times_by_dtype = {}
    for dtype in FLAGS.dtypes:
        model = _steps.build_model(FLAGS.model, FLAGS.num_classes, dtype)
        gradient = _steps.input_gradient_fn(model)
        forward = _steps.forward_fn(model)
        for description in FLAGS.attacks:
            spec = parse_attack_description(description)
            ours = _steps.attack_fn(model, description)
            contenders = {
                "ours": lambda ours=ours: ours(images),
                "bound": lambda g=gradient, k=spec.num_iter: [g(images, labels)
                                                              for _ in range(k)][-1],
                "forward": lambda f=forward: f(images),
            }
            if dtype != "float32":
                per_step = _steps.attack_fn(model, description, cast_once=False)
                contenders["per_step_casts"] = lambda per_step=per_step: per_step(images)
            peers = {
                "cleverhans": cleverhans_attack(forward, spec, scale),
                "art": art_attack(forward, spec, scale, FLAGS.num_classes, FLAGS.image_size,
                                  FLAGS.batch_size),
            }
            for name, run in peers.items():
                if run is not None:
                    contenders[name] = lambda run=run: run(images)
            times = _timing.interleaved_seconds(contenders, FLAGS.repetitions)
            times_by_dtype[(dtype, description)] = times

            def speedup(peer, times=times):
                if peer not in times:
                    return "n/a"
                return _timing.median_ratio(times[peer], times["ours"])

            ours_s = float(np.median(times["ours"]))
            with_labels = [b + f for b, f in zip(times["bound"], times["forward"])]
            rows.append([
                description, dtype, FLAGS.batch_size / ours_s, ours_s,
                _timing.median_ratio(times["ours"], times["bound"]),
                _timing.median_ratio(times["ours"], with_labels),
                speedup("cleverhans"), speedup("art"),
                speedup("per_step_casts") if dtype != "float32" else "",
            ])
    # bfloat16 against the float32 peers: the speed a user gains by switching both the
    # precision and the library.
    for description in FLAGS.attacks:
        low = times_by_dtype.get(("bfloat16", description))
        ref = times_by_dtype.get(("float32", description))
        if low and ref:
            rows.append([
                description, "bf16 vs f32 peers", "", "",
                "", "", *(f"{np.median(ref[p]) / np.median(low['ours']):.3f}"
                      if p in ref else "n/a" for p in ("cleverhans", "art")), "",
            ])

    print()
    print(_timing.machine_header(
        f"PGD attack: {FLAGS.model}, {FLAGS.image_size}x{FLAGS.image_size}, batch "
        f"{FLAGS.batch_size}, {FLAGS.num_classes} classes, {FLAGS.repetitions} rounds"))
    print()
    print(_timing.table(
        ["attack", "dtype", "ours images/s", "ours s", "ours / bound", "ours / (bound+fwd)",
         "speed vs cleverhans", "speed vs ART", "casts once speed-up"], rows))
    print("\nbound = 10 x one input-gradient pass (target: ours / bound <= 1.05); bound+fwd adds "
          "the forward pass for the labels that PGD against the prediction needs; speed vs X = "
          "X's time / ours (target >= 1.15 in float32, >= 1.8 with bfloat16 compute against "
          "float32 peers); casts once speed-up = the same attack casting the weights in every "
          "step / ours")


if __name__ == "__main__":
    app.run(main)
