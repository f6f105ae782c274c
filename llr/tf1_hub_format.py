"""Writes modules in the TF1 Hub format, as DeepMind's LLR modules are published.

TensorFlow 2 and ``tensorflow_hub`` 0.16 can read TF1 Hub modules but no longer write them
(``hub.create_module_spec`` is gone). Tests and offline users still need faithful modules: a
TF1 SavedModel whose only MetaGraph has the EMPTY tag set, a signature named ``default`` whose
output is also called ``default``, and the ``tfhub_module.pb`` marker next to
``saved_model.pb``. This module writes exactly that from a graph-building function, plus two
tiny stand-ins with the interface of ``deepmind/llr-pretrain-adv/{latents,linear}/1``, and
seeds a ``TFHUB_CACHE_DIR`` the way ``tensorflow_hub`` caches a downloaded URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from typing import Callable

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing import atomic_files

MARKER_FILENAME = "tfhub_module.pb"
SIGNATURE_NAME = "default"
OUTPUT_NAME = "default"
# ``ModuleDef.format`` of the Hub SavedModel format v3 (tensorflow_hub/module_def.proto).
FORMAT_V3 = 3

GraphBuilder = Callable[[Mapping[str, tf.Tensor]], tf.Tensor]


def module_def_bytes(module_format: int = FORMAT_V3) -> bytes:
    """The serialized ``ModuleDef`` proto of the marker file: field 1 (format) as a varint."""
    out = bytearray([0x08])
    value = module_format
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_module_format(marker_bytes: bytes) -> int:
    """Returns ``ModuleDef.format`` from a marker's bytes (0 when unset).

    Raises:
      ValueError: the bytes are not a ``ModuleDef`` proto.
    """
    pos, module_format = 0, 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(marker_bytes) or shift > 63:
                raise ValueError("truncated varint")
            byte = marker_bytes[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(marker_bytes):
        key = varint()
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = varint()
            if field == 1:
                module_format = value
        elif wire_type == 2:
            pos += varint()
            if pos > len(marker_bytes):
                raise ValueError("truncated length-delimited field")
        else:
            raise ValueError(f"unexpected wire type {wire_type}")
    return module_format


def write_tf1_hub_module(
    export_dir: str,
    build_fn: GraphBuilder,
    inputs: Mapping[str, tf.TensorSpec],
    *,
    seed: int = 0,
    module_format: int = FORMAT_V3,
) -> str:
    """Builds ``build_fn`` in a fresh TF1 graph and exports it as a TF1 Hub module.

    Args:
      export_dir: directory to create; must not exist yet. It appears only when complete.
      build_fn: called inside the graph with one placeholder per input name; creates its
        variables with ``tf.compat.v1.get_variable`` and returns the output tensor.
      inputs: input name -> TensorSpec (dtype and shape) of the signature's placeholders.
      seed: graph-level random seed, so that variable initialisers are reproducible.
      module_format: the ``ModuleDef.format`` written into the marker (3 is the TF1 Hub format).

    Returns:
      ``export_dir``.

    Raises:
      FileExistsError: ``export_dir`` already exists.
    """
    if os.path.exists(export_dir):
        raise FileExistsError(f"{export_dir} already exists")
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    v1 = tf.compat.v1
    graph = tf.Graph()
    with atomic_files.staged(export_dir, overwrite=False) as staging, graph.as_default():
        v1.set_random_seed(seed)
        placeholders = {
            name: v1.placeholder(spec.dtype, spec.shape, name=name)
            for name, spec in inputs.items()
        }
        output = tf.identity(build_fn(placeholders), name=OUTPUT_NAME)
        signature = v1.saved_model.signature_def_utils.build_signature_def(
            inputs={k: v1.saved_model.utils.build_tensor_info(t)
                    for k, t in placeholders.items()},
            outputs={OUTPUT_NAME: v1.saved_model.utils.build_tensor_info(output)},
        )
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(staging)
            # The empty tag set is what hub.Module exported for its default graph.
            builder.add_meta_graph_and_variables(
                sess, [], signature_def_map={SIGNATURE_NAME: signature}
            )
            builder.save()
        with open(os.path.join(staging, MARKER_FILENAME), "wb") as f:
            f.write(module_def_bytes(module_format))
    return export_dir


def _batch_norm(x: tf.Tensor, decay_rate: tf.Tensor, rng: np.random.Generator) -> tf.Tensor:
    """Inference-mode batch norm with non-trivial statistics, as a trained network has.

    The moving-average update that ``decay_rate`` drives is built into UPDATE_OPS, like a TF1
    training graph, but is not part of the signature's output: it never runs at inference,
    which is why the real module's ``decay_rate`` does not change its outputs.
    """
    v1 = tf.compat.v1
    depth = int(x.shape[-1])

    def const(name, values, trainable=True):
        return v1.get_variable(name, initializer=values.astype(np.float32), trainable=trainable)

    gamma = const("BatchNorm/gamma", rng.uniform(0.5, 1.5, depth))
    beta = const("BatchNorm/beta", rng.normal(0.0, 0.1, depth))
    mean = const("BatchNorm/moving_mean", rng.normal(0.0, 0.2, depth), trainable=False)
    variance = const("BatchNorm/moving_variance", rng.uniform(0.5, 2.0, depth), trainable=False)
    batch_mean, batch_variance = tf.nn.moments(x, list(range(x.shape.rank - 1)))
    for moving, batch in ((mean, batch_mean), (variance, batch_variance)):
        update = v1.assign(moving, decay_rate * moving + (1.0 - decay_rate) * batch)
        v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, update)
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, 1e-5)


def write_latents_standin(
    export_dir: str, *, image_size: int = 224, latent_depth: int = 8, seed: int = 0
) -> str:
    """A tiny ``latents`` module: conv 3x3 stride 2 -> BN -> ReLU -> global mean pool.

    Same interface as ``deepmind/llr-pretrain-adv/latents/1``: inputs ``inputs`` float32
    [N, image_size, image_size, 3] in [-1, 1] and ``decay_rate`` (scalar); output latents
    [N, 1, 1, latent_depth].
    """
    rng = np.random.default_rng(seed)

    def build(inputs):
        v1 = tf.compat.v1
        weights = v1.get_variable(
            "conv1/weights",
            initializer=rng.normal(0.0, 0.3, (3, 3, 3, latent_depth)).astype(np.float32),
        )
        net = tf.nn.conv2d(inputs["inputs"], weights, strides=2, padding="SAME")
        net = tf.nn.relu(_batch_norm(net, inputs["decay_rate"], rng))
        return tf.reduce_mean(net, axis=[1, 2], keepdims=True)

    return write_tf1_hub_module(
        export_dir,
        build,
        {
            "inputs": tf.TensorSpec([None, image_size, image_size, 3], tf.float32),
            "decay_rate": tf.TensorSpec([], tf.float32),
        },
        seed=seed,
    )


def write_linear_standin(
    export_dir: str,
    *,
    latent_depth: int = 8,
    seed: int = 1,
    with_decay_rate: bool = False,
    bird_logit_offset: float = 0.0,
) -> str:
    """A ``linear`` module: a 1x1 convolution from latents [N,1,1,D] to logits [N,1,1,2].

    The real ``linear/1`` takes only ``inputs`` (the challenge's submission calls it with
    ``dict(inputs=latents)``); ``with_decay_rate`` adds an unused ``decay_rate`` input to test
    loaders against both forms. ``bird_logit_offset`` is added to the bias of logit 1, e.g. to
    centre a stand-in's bird logits on some images so that it predicts both classes.
    """
    rng = np.random.default_rng(seed)
    bias_values = rng.normal(0.0, 0.1, 2) + np.array([0.0, bird_logit_offset])

    def build(inputs):
        v1 = tf.compat.v1
        weights = v1.get_variable(
            "logits/weights",
            initializer=rng.normal(0.0, 2.0, (1, 1, latent_depth, 2)).astype(np.float32),
        )
        biases = v1.get_variable("logits/biases", initializer=bias_values.astype(np.float32))
        return tf.nn.conv2d(inputs["inputs"], weights, strides=1, padding="VALID") + biases

    specs = {"inputs": tf.TensorSpec([None, 1, 1, latent_depth], tf.float32)}
    if with_decay_rate:
        specs["decay_rate"] = tf.TensorSpec([], tf.float32)
    return write_tf1_hub_module(export_dir, build, specs, seed=seed)


def cache_key(handle: str) -> str:
    """The cache directory name ``tensorflow_hub`` uses for a URL handle: sha1 of the URL."""
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


def seed_hub_cache(cache_dir: str, handle: str, module_dir: str) -> str:
    """Copies ``module_dir`` into ``cache_dir`` as ``tensorflow_hub`` would cache ``handle``.

    ``tensorflow_hub`` treats ``$TFHUB_CACHE_DIR/<sha1(handle)>`` as downloaded when it is a
    non-empty directory; the ``<sha1>.descriptor.txt`` it writes is informational only, but is
    written too so the cache looks like a real one.

    Returns:
      The cached module directory.
    """
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, cache_key(handle))
    with atomic_files.staged(target, overwrite=False) as staging:
        shutil.copytree(module_dir, staging)
    with open(target + ".descriptor.txt", "w") as f:
        f.write(f"Module: {handle}\nSeeded from: {os.path.abspath(module_dir)}\n")
    return target
