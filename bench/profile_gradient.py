"""Where one input-gradient pass (the unit of every bound) spends its time, by op type.

  python bench/profile_gradient.py [--model=resnet_v2_50] [--image_size=64] [--batch_size=32]
                                   [--compute_dtype=float32] [--repetitions=5]

A PGD step is one forward pass and one backward pass to the input; the attack, cleverhans and
ART all run that same computation NITER times. This script shows what it is made of: the
model's input gradient is built in a TF1 graph (the same kernels and graph optimisations as a
``tf.function``) and run with full tracing; the executor's per-op times are summed by op type
over several runs. When the convolution kernels (oneDNN's ``_MklNativeConv2D...`` or plain
``Conv2D``/``Conv2DBackpropInput``) take nearly all of it, a PGD implementation can only
approach the bound, not beat it: the remaining time is the element-wise work (batch norm,
ReLU and their gradients) that every implementation of the same model runs as well.

Op times overlap when the executor runs independent ops on the two cores, so the shares
describe where work goes, not a partition of the wall time.
"""

from __future__ import annotations

import collections
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from adversarial_logit_pairing.datasets.dataset_facts import TINY_IMAGENET  # noqa: E402
from bench import _timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "resnet_v2_50", "Registered model name")
flags.DEFINE_integer("image_size", 64, "Image side")
flags.DEFINE_integer("batch_size", 32, "Images per pass")
flags.DEFINE_integer("num_classes", TINY_IMAGENET.stored_classes, "Logits width")
flags.DEFINE_string("compute_dtype", "float32", "float32 or bfloat16")
flags.DEFINE_integer("repetitions", 5, "Traced runs after two warm-up runs")
flags.DEFINE_integer("top", 12, "Op types listed")

# Op-type families, so that oneDNN's renamed and fused kernels (``_MklNativePadWithConv2D``)
# group with the ops they replace; the first family whose key the name contains wins.
_FAMILIES = (
    ("conv backward (input)", "Conv2DBackpropInput"),
    ("conv forward", "Conv2D"),
    ("batch norm", "BatchNorm"),
    ("relu", "Relu"),
    ("max pool", "MaxPool"),
)


def family(op_type: str) -> str:
    """The family of an op type (``_MklNativeConv2DBackpropInput`` -> conv backward)."""
    for name, key in _FAMILIES:
        if key in op_type:
            return name
    return "other"


def profile(repetitions: int) -> tuple[dict[str, float], dict[str, float], float]:
    """Per-op-type and per-family microseconds per pass, and the mean wall time (s)."""
    from adversarial_logit_pairing.models import create_model

    graph = tf.Graph()
    with graph.as_default():
        model = create_model(FLAGS.model, FLAGS.num_classes, seed=0,
                             compute_dtype=FLAGS.compute_dtype)
        rng = np.random.default_rng(0)
        images = tf.constant(rng.uniform(-1, 1, (FLAGS.batch_size, FLAGS.image_size,
                                                 FLAGS.image_size, 3)).astype(np.float32))
        labels = tf.constant(rng.integers(0, FLAGS.num_classes, FLAGS.batch_size))
        logits = model(images, is_training=False)
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=logits))
        gradient = tf.gradients(loss, images)[0]
        init = tf.compat.v1.global_variables_initializer()
    by_type: dict[str, float] = collections.defaultdict(float)
    wall = []
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(init)
        for _ in range(2):
            session.run(gradient)
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(repetitions):
            metadata = tf.compat.v1.RunMetadata()
            session.run(gradient, options=options, run_metadata=metadata)
            starts, ends = [], []
            for device in metadata.step_stats.dev_stats:
                for node in device.node_stats:
                    op_type = node.timeline_label.split("(", 1)[0].split("=")[-1].strip()
                    op_type = op_type or node.node_name
                    by_type[op_type] += node.op_end_rel_micros / repetitions
                    starts.append(node.all_start_micros)
                    ends.append(node.all_start_micros + node.all_end_rel_micros)
            wall.append((max(ends) - min(starts)) / 1e6)
    by_family: dict[str, float] = collections.defaultdict(float)
    for op_type, micros in by_type.items():
        by_family[family(op_type)] += micros
    return by_type, by_family, float(np.median(wall))


def main(argv: list[str]) -> None:
    del argv
    by_type, by_family, wall = profile(FLAGS.repetitions)
    total = sum(by_type.values())
    print()
    print(_timing.machine_header(
        f"One input-gradient pass by op type: {FLAGS.model}, {FLAGS.image_size}x"
        f"{FLAGS.image_size}, batch {FLAGS.batch_size}, {FLAGS.compute_dtype}, "
        f"{FLAGS.repetitions} traced runs"))
    print(f"traced wall time per pass {wall * 1e3:.1f} ms; summed op time {total / 1e3:.1f} ms")
    print()
    rows = [[name, micros / 1e3, 100.0 * micros / total]
            for name, micros in sorted(by_family.items(), key=lambda kv: -kv[1])]
    print(_timing.table(["family", "ms / pass", "% of op time"], rows))
    print()
    rows = [[name, micros / 1e3, 100.0 * micros / total]
            for name, micros in sorted(by_type.items(), key=lambda kv: -kv[1])[:FLAGS.top]]
    print(_timing.table(["op type", "ms / pass", "% of op time"], rows))


if __name__ == "__main__":
    app.run(main)
