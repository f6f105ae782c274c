"""Throughput of the training input pipelines, next to the ALP training step they feed.

Writes a synthetic-photo copy of each data set with realistic image and file sizes
(Tiny ImageNet: 64x64 JPEGs of ~3 KB; ImageNet: 300..500 px JPEGs of ~75 KB in TF-Slim
shards; real ImageNet files average ~110 KB), then times the training pipelines of
``dataset_factory.get_dataset`` and prints a table::

  python bench/data_pipeline.py [--work_dir=/tmp/alp_bench] [--num_batches=40]

The column 'ALP step images/s' is the speed of the paper's ALP step on resnet_v2_50
(``pgdll_16_2_10``, lp 0.5) at the pipeline's image size and batch, measured by
``bench/_steps.alp_step_images_per_second``. A ratio 'pipeline / step' above 1 means the
input pipeline keeps up with training on this machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing.datasets import dataset_factory  # noqa: E402
from bench._synthetic import write_imagenet, write_tiny_imagenet  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Where to write the synthetic data (default: a "
                    "temporary directory, deleted afterwards)")
flags.DEFINE_integer("tiny_records", 4000, "Synthetic Tiny ImageNet training records")
flags.DEFINE_integer("imagenet_records", 512, "Synthetic ImageNet training records")
flags.DEFINE_integer("imagenet_shards", 8, "ImageNet shards to spread them over")
flags.DEFINE_integer("batch_size", 32, "Batch size of the timed pipelines")
flags.DEFINE_integer("num_batches", 40, "Batches timed per pipeline (after 5 warm-up ones)")
flags.DEFINE_string("model", "resnet_v2_50", "Model of the ALP step (the paper's resnet_v2_50)")
flags.DEFINE_integer("imagenet_image_size", 64,
                     "Model input size for ImageNet: 64 as the released 'ImageNet 64x64' ALP "
                     "models and train.py's default; 224 for a full-resolution model")
def pipeline_images_per_second(dataset_name: str, data_dir: str, image_size: int,
                               batch_size: int, num_batches: int) -> float:
    """Images/s delivered by the training pipeline after a warm-up."""
    dataset, *_ = dataset_factory.get_dataset(dataset_name, "train", batch_size, image_size,
                                              is_training=True, data_dir=data_dir)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches * batch_size / (time.perf_counter() - start)


def alp_step_rate(dataset_name: str, image_size: int, batch_size: int) -> float:
    """Images/s of the ALP training step that this pipeline would feed."""
    from bench._steps import alp_step_images_per_second

    return float(alp_step_images_per_second(dataset_name, image_size, batch_size,
                                            model_name=FLAGS.model))


def main(argv: list[str]) -> None:
    del argv
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="alp_bench_")
    rng = np.random.default_rng(0)
    rows = []
    try:
        # Tiny ImageNet's models take its 64x64 images as they are.
        for dataset_name, image_size in (("tiny_imagenet", 64),
                                         ("imagenet", FLAGS.imagenet_image_size)):
            data_dir = os.path.join(work_dir, dataset_name)
            os.makedirs(data_dir, exist_ok=True)
            if dataset_name == "tiny_imagenet":
                mean_bytes = write_tiny_imagenet(data_dir, FLAGS.tiny_records, rng)
            else:
                mean_bytes = write_imagenet(data_dir, FLAGS.imagenet_records,
                                            FLAGS.imagenet_shards, rng)
            rate = pipeline_images_per_second(dataset_name, data_dir, image_size,
                                              FLAGS.batch_size, FLAGS.num_batches)
            step = alp_step_rate(dataset_name, image_size, FLAGS.batch_size)
            rows.append((dataset_name, image_size, mean_bytes / 1024, rate, step))
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    from bench._timing import machine_header

    print()
    print(machine_header(f"Training input pipelines, batch {FLAGS.batch_size}, next to the "
                         f"{FLAGS.model} ALP step (pgdll_16_2_10, lp 0.5) they feed"))
    print()
    header = (f"{'dataset':<14} {'size':>5} {'JPEG KiB':>9} {'pipeline images/s':>19} "
              f"{'ALP step images/s':>18} {'pipeline / step':>16}")
    print(header)
    print("-" * len(header))
    for name, size, kib, rate, step in rows:
        step_text = "n/a" if step is None else f"{step:.1f}"
        ratio = "n/a" if step is None else f"{rate / step:.2f}"
        print(f"{name:<14} {size:>5} {kib:>9.1f} {rate:>19.1f} {step_text:>18} {ratio:>16}")


if __name__ == "__main__":
    app.run(main)
