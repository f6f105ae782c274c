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

A second table times the strong attacks (``adversarial_logit_pairing.attacks``, float32, on
``--strong_batch_size`` images labelled with the model's own predictions, so every point is
attacked): ``--apgd`` (APGD-CE, 100 iterations) against its bound, that many input-gradient
passes (one pass's ms and images/s are printed under the table), and against IBM ART 1.x's
``AutoProjectedGradientDescent`` (cross-entropy, same model as a compiled ``tf.function`` in a
``TensorFlowV2Classifier`` clipped to the bounds, same eps, iterations, images and labels),
interleaved over ``--strong_repetitions`` rounds. ART runs twice (``--art_apgd``): ``matched``
(1 start, first step 2 eps: the reference's settings and ours) and ``defaults`` (ART's own: 5
random starts, each on the points still robust, and a first step of 0.1 input units whatever
eps is). Every APGD row gives the points still classified as their label after it, by one
check, so the reader sees the peers do comparable work. Then one run of ``--autoattack`` (the
standard sequence), its seconds per image and per stage. A randomly initialised model falls
early (APGD-CE or APGD-T), so the later stages, and ART's later restarts, see few points: that
time is the cost on a NON-robust model; on a robust one every stage runs on most points (at
most 100 + 9 x 100 gradient passes for APGD-CE and APGD-T, FAB-T's 9 x 100 iterations and
Square's 5000 forward passes per point) and ART's defaults up to 5 x 100 iterations.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402
from bench import _steps, _timing  # noqa: E402

# ART's AutoProjectedGradientDescent settings timed in the strong table, by row label. Both run
# max_iter = the description's NITER on cross-entropy. "defaults" leaves the rest to ART 1.x
# (first step eps_step=0.1 in input units whatever eps is, nb_random_init=5 restarts, each on
# the points still robust); "matched" is the reference's and ours (one start, first step 2 eps).
ART_APGD_SETTINGS = ("matched", "defaults")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Images per attack call")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width (Tiny ImageNet)")
flags.DEFINE_integer("repetitions", 5, "Timed rounds after one warm-up round")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")
flags.DEFINE_list("attacks", ["pgd_16_2_10", "pgdll_16_2_10"], "Attack descriptions")
flags.DEFINE_string("apgd", "apgdce_16_100", "Strong table: the APGD description timed "
                    "against its bound ('' skips the strong table)")
flags.DEFINE_string("autoattack", "autoattack_16", "Strong table: the AutoAttack description "
                    "run once ('' skips it)")
flags.DEFINE_integer("strong_batch_size", 16, "Strong table: images attacked")
flags.DEFINE_integer("strong_repetitions", 1, "Strong table: timed APGD rounds after a warm-up")
flags.DEFINE_list("art_apgd", ["matched", "defaults"], "Strong table: IBM ART's APGD settings "
                  "timed as peers of --apgd ('matched': 1 start, first step 2 eps as ours; "
                  "'defaults': ART's 5 starts and first step 0.1; '' skips ART)")
flags.register_validator(
    "art_apgd", lambda values: set(values) <= set(ART_APGD_SETTINGS),
    message=f"--art_apgd takes a comma-separated subset of {','.join(ART_APGD_SETTINGS)}")


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


def art_apgd(forward: Callable, eps: float, n_iter: int, num_classes: int, image_size: int,
             batch_size: int, settings: str) -> Optional[Any]:
    """ART's AutoProjectedGradientDescent (CE) on ``forward``, or None when ART is absent.

    The model goes to ART as a careful user would give it: a compiled ``tf.function`` giving
    logits, in a ``TensorFlowV2Classifier`` clipped to the model's bounds. ``settings`` is one
    of :data:`ART_APGD_SETTINGS`.

    Returns:
      The ART attack (``generate(x, y=one_hot)``), or None when ART cannot be imported.
    """
    try:
        from art.attacks.evasion import AutoProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier
    except ImportError:
        return None
    if settings not in ART_APGD_SETTINGS:
        raise ValueError(f"--art_apgd: unknown setting {settings!r}; "
                         f"expected some of {','.join(ART_APGD_SETTINGS)}")
    classifier = TensorFlowV2Classifier(
        model=lambda x, training=False: forward(x), nb_classes=num_classes,
        input_shape=(image_size, image_size, 3),
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
        clip_values=_steps.BOUNDS)
    matched = dict(nb_random_init=1, eps_step=2 * eps) if settings == "matched" else {}
    return AutoProjectedGradientDescent(
        classifier, norm=np.inf, eps=eps, max_iter=n_iter, batch_size=batch_size,
        loss_type="cross_entropy", verbose=False, **matched)


def strong_table() -> str:
    """APGD against its bound and ART's APGD, and one AutoAttack run (float32)."""
    from adversarial_logit_pairing import attacks

    model = _steps.build_model(FLAGS.model, FLAGS.num_classes, "float32")
    forward = _steps.forward_fn(model)
    gradient = _steps.input_gradient_fn(model)
    images, _ = _steps.images_and_labels(FLAGS.strong_batch_size, FLAGS.image_size,
                                         FLAGS.num_classes)
    labels = tf.argmax(forward(images), axis=-1)  # every point starts correct
    batch = FLAGS.strong_batch_size

    def robust_after(x_adv) -> int:
        """Points still classified as their label: the same check for every row."""
        return int(tf.reduce_sum(tf.cast(
            tf.argmax(forward(tf.convert_to_tensor(x_adv)), axis=-1) == labels, tf.int32)))

    rows = []
    notes = []
    if FLAGS.apgd:
        spec = attacks.parse_strong_attack_description(FLAGS.apgd)
        eps = spec.eps_in(_steps.BOUNDS)
        outputs = {}

        def ours():
            result, _ = attacks.run_strong_attack(
                FLAGS.apgd, model.inference, images, labels, bounds=_steps.BOUNDS,
                batch_size=batch)
            outputs["ours"] = result.x_adv
            return result.x_adv

        contenders = {
            "ours": ours,
            "bound": lambda: [gradient(images, labels) for _ in range(spec.budget)][-1],
        }
        images_np = images.numpy()
        one_hot = tf.one_hot(labels, FLAGS.num_classes).numpy()
        # ART's restarts call the model on the points still robust, a batch of any size: a
        # careful user gives it a function traced once for every batch size.
        art_forward = tf.function(
            lambda x: model(x, is_training=False),
            input_signature=[tf.TensorSpec([None, FLAGS.image_size, FLAGS.image_size, 3],
                                           tf.float32)])
        art_settings = {}
        for settings in FLAGS.art_apgd:
            art = art_apgd(art_forward, eps, spec.budget, FLAGS.num_classes, FLAGS.image_size,
                           batch, settings)
            if art is None:
                break
            art_settings[settings] = art

            def art_run(art=art, name=f"art_{settings}"):
                np.random.seed(0)  # ART's random start draws from numpy's global generator
                outputs[name] = art.generate(images_np, y=one_hot)
                return outputs[name]

            contenders[f"art_{settings}"] = art_run
        times = _timing.interleaved_seconds(contenders, FLAGS.strong_repetitions)

        def row(label: str, name: str) -> list:
            seconds = float(np.median(times[name]))
            return [label, batch, seconds, seconds / batch,
                    _timing.median_ratio(times[name], times["bound"]),
                    _timing.median_ratio(times[name], times["ours"]) if name != "ours" else "",
                    robust_after(outputs[name])]

        rows.append(row(FLAGS.apgd, "ours"))
        for settings in FLAGS.art_apgd:
            label = f"ART_APGD_{settings}"
            if settings in art_settings:
                rows.append(row(label, f"art_{settings}"))
                art = art_settings[settings]
                notes.append(f"{label}: ART {_art_version()} AutoProjectedGradientDescent, "
                             f"cross_entropy, max_iter {art.max_iter}, nb_random_init "
                             f"{art.nb_random_init}, first step eps_step {art.eps_step:.4g} "
                             f"({art.eps_step / eps:.2f} eps), eps {eps:.4g}")
            else:
                rows.append([label, batch, *["n/a"] * 5])
                notes.append(f"{label}: n/a (ART not installed: pip install "
                             "adversarial-robustness-toolbox tqdm)")
        pass_s = float(np.median(times["bound"])) / spec.budget
        notes.append(f"bound unit: one input-gradient pass ({FLAGS.model}, "
                     f"{FLAGS.image_size}x{FLAGS.image_size}, batch {batch}, float32) = "
                     f"{pass_s * 1000:.2f} ms, {batch / pass_s:.1f} images/s; bound = "
                     f"{spec.budget} of them = {spec.budget * pass_s:.3f} s")
    stages = ""
    if FLAGS.autoattack:
        start = time.perf_counter()
        result, report = attacks.run_strong_attack(
            FLAGS.autoattack, model.inference, images, labels, bounds=_steps.BOUNDS,
            batch_size=batch)
        seconds = time.perf_counter() - start
        rows.append([FLAGS.autoattack, batch, seconds, seconds / batch, "", "",
                     robust_after(result.x_adv)])
        stages = "\n".join(f"  {line}" for line in report.lines())
    header = ["strong attack", "images", "s", "s/image", "/ bound", "time / ours",
              "robust after"]
    return (_timing.table(header, rows) + "\n\n" + "\n".join(notes) + "\n\nbound = NITER "
            "input-gradient passes; our APGD runs one per iteration plus a forward pass for "
            "the clean logits and one for the final check (target: ours / bound <= 1.05); ART's "
            "runs, per iteration, a gradient pass and a separate forward pass for the loss, with "
            "the iterate on the host (numpy) in between; time / ours = the row's time / ours "
            "(> 1: ours is faster); robust after = points of the batch (labelled by the model) "
            "still classified as their label on the attack's output, one check for all rows. "
            "ART's defaults restart only on the points still robust, so on a model that falls "
            "in the first run (a randomly initialised one) they cost about one run, and up to 5 "
            "on a robust one. autoattack s includes tracing. Its stages (a randomly initialised "
            "model falls early, so the later stages see few points):\n" + stages)


def _art_version() -> str:
    import art

    return art.__version__


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
    if FLAGS.apgd or FLAGS.autoattack:
        print()
        print(f"Strong attacks: {FLAGS.model}, {FLAGS.image_size}x{FLAGS.image_size}, "
              f"{FLAGS.strong_batch_size} images labelled by the model, float32")
        print()
        print(strong_table())


if __name__ == "__main__":
    app.run(main)
