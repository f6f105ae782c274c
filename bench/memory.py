"""Peak resident memory of the ALP training step.

  python bench/memory.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                         [--dtypes=float32,bfloat16]

Each configuration runs in a fresh child process (peak RSS never goes down, so one process
cannot measure several): it builds the model, optimizer and moving averages, runs the ALP step
(``pgdll_16_2_10``, lp 0.5, ``bench/_steps.make_train_step``) a few times, and reports
``ru_maxrss``, next to its resident memory before the first step (TensorFlow, model and state).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Clean images per step")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width")
flags.DEFINE_integer("steps", 3, "Steps to run")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure")
flags.DEFINE_string("child", None, "Internal: measure this dtype and print JSON")

GIB = 1024.0**3


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(dtype: str) -> dict:
    from bench import _steps

    step, _ = _steps.make_train_step(FLAGS.model, "pgdll_16_2_10", 0.5, FLAGS.num_classes,
                                     dtype)
    images, labels = _steps.images_and_labels(FLAGS.batch_size, FLAGS.image_size,
                                              FLAGS.num_classes)
    before = current_rss_bytes()
    for _ in range(FLAGS.steps):
        float(step(images, labels))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"dtype": dtype, "before": before, "peak": peak}


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child:
        print(json.dumps(measure(FLAGS.child)))
        return
    from bench import _timing

    rows = []
    for dtype in FLAGS.dtypes:
        args = [sys.executable, os.path.abspath(__file__), f"--child={dtype}",
                f"--model={FLAGS.model}", f"--image_size={FLAGS.image_size}",
                f"--batch_size={FLAGS.batch_size}", f"--num_classes={FLAGS.num_classes}",
                f"--steps={FLAGS.steps}"]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append([dtype, result["before"] / GIB, result["peak"] / GIB,
                     (result["peak"] - result["before"]) / GIB,
                     "yes" if result["peak"] < 4 * GIB else "NO"])
    print()
    print(_timing.machine_header(
        f"Peak memory of the ALP step (pgdll_16_2_10, lp 0.5): {FLAGS.model}, "
        f"{FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch_size} (+{FLAGS.batch_size} "
        f"adversarial), {FLAGS.steps} steps, one fresh process per row"))
    print()
    print(_timing.table(["dtype", "RSS before step GiB", "peak RSS GiB", "step adds GiB",
                         "under 4 GiB"], rows))


if __name__ == "__main__":
    app.run(main)
