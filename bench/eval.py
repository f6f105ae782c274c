"""Speed of ``eval.py``'s clean and adversarial evaluation against the compute bound.

  python bench/eval.py [--model=resnet_v2_50] [--image_size=64] [--clean_examples=1000]
                       [--adv_examples=200] [--eval_batch_size=50] [--repetitions=4]

Writes a synthetic Tiny ImageNet validation split (64x64 JPEGs) and a checkpoint of a fresh
model, then times ``evaluation.Evaluator.evaluate`` (restore, input pipeline, compiled eval
step; what ``eval.py --checkpoint_path`` runs) for ``clean`` and ``pgd_16_2_10``. Bounds, on
the same number of images in batches of the same size: clean = one forward pass; adversarial
= 10 input-gradient passes + one forward pass (the scoring). The evaluator also runs the
attack's label pass, decodes JPEGs and restores the checkpoint, which the bound leaves out;
the column 'fixed s' times the restore and the first batch of the input pipeline, the cost
per checkpoint that a real evaluation (10,000 Tiny ImageNet images) spreads over 200 batches.
float32 only until ``eval.py`` takes a compute-precision flag.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from adversarial_logit_pairing import checkpoints, evaluation  # noqa: E402
from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402
from bench import _steps, _timing  # noqa: E402
from bench._synthetic import write_tiny_imagenet  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("clean_examples", 1000, "Validation images per clean evaluation")
flags.DEFINE_integer("adv_examples", 200, "Validation images per adversarial evaluation")
flags.DEFINE_integer("eval_batch_size", 50, "The eval_batch_size hparam (original default)")
flags.DEFINE_integer("repetitions", 4, "Timed rounds after one warm-up round")
flags.DEFINE_list("attacks", ["clean", "pgd_16_2_10"], "--adv_method values to time")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    work_dir = tempfile.mkdtemp(prefix="alp_bench_eval_")
    batch = FLAGS.eval_batch_size
    examples = {a: FLAGS.clean_examples if a == "clean" else FLAGS.adv_examples
                for a in FLAGS.attacks}
    try:
        data_dir = os.path.join(work_dir, "data")
        os.makedirs(data_dir)
        write_tiny_imagenet(data_dir, max(examples.values()), np.random.default_rng(0),
                            filename=TINY_IMAGENET.file_patterns["validation"])
        model = _steps.build_model(FLAGS.model, TINY_IMAGENET.stored_classes)
        checkpoint = checkpoints.save(model.variables_by_name, os.path.join(work_dir, "ckpt"), 0)
        images, labels = _steps.images_and_labels(batch, FLAGS.image_size,
                                                  TINY_IMAGENET.stored_classes)
        gradient = _steps.input_gradient_fn(model)
        forward = _steps.forward_fn(model)
        contenders, fixed = {}, {}
        for attack in FLAGS.attacks:
            evaluator = evaluation.Evaluator(evaluation.EvalConfig(
                checkpoint_path=checkpoint, model_name=FLAGS.model, adv_method=attack,
                dataset="tiny_imagenet", tiny_imagenet_data_dir=data_dir,
                dataset_image_size=FLAGS.image_size, moving_average_decay=-1,
                num_examples=examples[attack], hparams=f"eval_batch_size={batch}"))
            contenders[attack] = lambda e=evaluator: e.evaluate(checkpoint).accuracy
            contenders[f"bound:{attack}"] = _bound(gradient, forward, images, labels,
                                                   examples[attack] // batch,
                                                   _steps_of(attack))
            fixed[attack] = lambda e=evaluator: _restore_and_first_batch(e, checkpoint)
        times = _timing.interleaved_seconds(contenders, FLAGS.repetitions)
        fixed_seconds = {a: _timing.median_seconds(f, repetitions=3, warmup=1)
                         for a, f in fixed.items()}
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    rows = []
    for attack in FLAGS.attacks:
        seconds = float(np.median(times[attack]))
        evaluated = examples[attack] // batch * batch
        rows.append([attack, evaluated, evaluated / seconds, seconds, fixed_seconds[attack],
                     _timing.median_ratio(times[attack], times[f"bound:{attack}"])])
    print()
    print(_timing.machine_header(
        f"Evaluation (Evaluator.evaluate, float32): {FLAGS.model}, {FLAGS.image_size}x"
        f"{FLAGS.image_size}, batches of {batch}, {FLAGS.repetitions} rounds"))
    print()
    print(_timing.table(["adv_method", "images", "images/s", "s/run", "fixed s",
                         "eval / bound"], rows))
    print("\nbound: clean = one forward pass per batch; pgd = 10 input-gradient passes + one "
          "forward pass per batch (target <= 1.05); fixed s = checkpoint restore + first "
          "input batch, paid once per checkpoint")


def _bound(gradient, forward, images, labels, num_batches: int, num_iter: int):
    """The compute an evaluation of ``num_batches`` cannot do without, on a fixed batch."""
    def run():
        for _ in range(num_batches):
            for _ in range(num_iter):
                gradient(images, labels)
            out = forward(images)
        return out
    return run


def _restore_and_first_batch(evaluator: evaluation.Evaluator, checkpoint: str):
    checkpoints.restore(evaluator.assignments, checkpoint, what="bench")
    return next(iter(evaluator.dataset))[0]


def _steps_of(attack: str) -> int:
    from adversarial_logit_pairing.adversarial_attack import parse_attack_description

    return parse_attack_description(attack).num_iter


if __name__ == "__main__":
    app.run(main)
