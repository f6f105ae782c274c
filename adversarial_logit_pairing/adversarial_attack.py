"""Adversarial attacks of the original ALP code: projected gradient descent and its variants.

Attack descriptions are the original strings:

* ``clean``: no attack, the input is returned unchanged.
* ``pgd_EPS_STEP_NITER``: untargeted PGD against the model's own *prediction* ``argmax(logits)``
  (not the true label, as in the original, so evaluation needs no labels).
* ``pgdll_EPS_STEP_NITER``: PGD targeted at the least-likely predicted class ``argmin(logits)``.
* ``pgdrnd_EPS_STEP_NITER``: PGD targeted at a uniformly random class.

EPS and STEP are integers on the 0..255 pixel scale and are rescaled to model units by
``(bounds[1] - bounds[0]) / 255``; with the bounds (-1, 1) of the ALP datasets, 16 means 32/255.

The PGD loop runs in-graph (a ``tf.while_loop`` of a few steps per iteration, so the model is
traced a fixed number of times whatever NITER is); called eagerly, the attack is compiled once per
model, description and input signature and cached, so no Python loop runs per PGD step.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from typing import Callable, Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

ModelFn = Callable[[tf.Tensor], tf.Tensor]
Seed = Optional[Union[tf.Tensor, tuple, list]]

_METHODS = ("pgd", "pgdll", "pgdrnd")
_DESCRIPTION_RE = re.compile(r"^(pgd|pgdll|pgdrnd)_(\d+)_(\d+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A parsed attack description; ``eps`` and ``step`` are on the 0..255 scale."""

    method: str  # 'clean', 'pgd', 'pgdll' or 'pgdrnd'
    eps: int = 0
    step: int = 0
    num_iter: int = 0

    @property
    def is_clean(self) -> bool:
        return self.method == "clean"


def parse_attack_description(attack_description: str) -> AttackSpec:
    """Parses ``clean`` or ``METHOD_EPS_STEP_NITER``.

    Raises:
      ConfigError: (a ValueError) naming the description when it is malformed.
    """
    description = (attack_description or "").strip()
    if description == "clean":
        return AttackSpec("clean")
    match = _DESCRIPTION_RE.match(description)
    if not match:
        raise ConfigError(
            f"invalid attack description {attack_description!r}: expected 'clean' or "
            f"'METHOD_EPS_STEP_NITER' with METHOD in {', '.join(_METHODS)} and integer "
            "EPS, STEP, NITER (e.g. 'pgdll_16_2_10')"
        )
    method, eps, step, num_iter = match.groups()
    spec = AttackSpec(method, int(eps), int(step), int(num_iter))
    if spec.num_iter < 1:
        raise ConfigError(f"invalid attack description {attack_description!r}: NITER must be >= 1")
    return spec


def _split_seed(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    pair = tf.random.experimental.stateless_split(seed, num=2)
    return pair[0], pair[1]


def _uniform(shape, minval, maxval, dtype, seed: Optional[tf.Tensor]) -> tf.Tensor:
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval, dtype=dtype)


# PGD steps per tf.while_loop iteration (see _pgd_graph).
STEPS_PER_ITERATION = 5


def _repeat(step: Callable[[tf.Tensor], tf.Tensor], steps: int, count: int,
            x: tf.Tensor) -> tf.Tensor:
    """``x`` after ``count`` in-graph loop iterations of ``steps`` calls of ``step``."""

    def body(i, x):
        for _ in range(steps):
            x = step(x)
        return i + 1, x

    _, x = tf.while_loop(lambda i, _: i < count, body, (tf.constant(0), x))
    return x


def _pgd_graph(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    eps: float,
    step_size: float,
    num_iter: int,
    labels: tf.Tensor,
    targeted: bool,
    seed: Optional[tf.Tensor],
) -> tf.Tensor:
    """The PGD computation; traced inside the caller's graph or a cached tf.function."""
    x = tf.convert_to_tensor(x)
    lo, hi = bounds
    box_lo = tf.maximum(x - eps, lo)
    box_hi = tf.minimum(x + eps, hi)
    noise = _uniform(tf.shape(x), -eps, eps, x.dtype, seed)
    x_adv = tf.clip_by_value(x + noise, box_lo, box_hi)
    labels = tf.cast(labels, tf.int32)
    # Descending the target's loss is ascending its negative.
    direction = -1.0 if targeted else 1.0

    def pgd_step(x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = model_fn(x_adv)
            one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
            # The original differentiates the SUM over the batch: each example's gradient is
            # then independent of the batch size.
            loss = tf.reduce_sum(
                tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)
            )
        grad = tape.gradient(loss, x_adv)
        x_next = x_adv + direction * step_size * tf.sign(grad)
        return tf.clip_by_value(x_next, box_lo, box_hi)

    # Each iteration of a tf.while_loop costs a fixed overhead that, on resnet_v2_50 at 64x64
    # on a 2-core CPU, added 4-5% to ten gradient steps; running STEPS_PER_ITERATION steps per
    # iteration removes it (bench/attack.py) while the body is still traced a fixed number of
    # times whatever NUM_ITER is. The remainder runs in a one-step loop.
    full, rest = divmod(num_iter, STEPS_PER_ITERATION)
    for steps, count in ((STEPS_PER_ITERATION, full), (1, rest)):
        if count:
            x_adv = _repeat(pgd_step, steps, count, x_adv)
    return tf.stop_gradient(x_adv)


# Eager calls reuse one compiled function per (model_fn, key): the attacks here, and other
# per-model steps such as llr.spatial's grid step; keyed weakly on model_fn so a discarded
# model frees its functions.
_COMPILED: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def compiled_for(model_fn: ModelFn, key: tuple, graph_fn: Callable) -> Callable:
    """The tf.function of ``graph_fn`` cached for ``model_fn`` under ``key``.

    One function serves seeded and unseeded calls: tf.function traces ``seed=None`` apart
    from a seed tensor, and each once per input signature.
    """
    try:
        per_model = _COMPILED.setdefault(model_fn, {})
    except TypeError:  # not weak-referenceable (e.g. a bound method); compile without caching
        per_model = {}
    fn = per_model.get(key)
    if fn is None:
        fn = per_model[key] = tf.function(graph_fn, reduce_retracing=True)
    return fn


def pgd(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    eps: float,
    step_size: float,
    num_iter: int,
    labels: tf.Tensor,
    targeted: bool = False,
    seed: Seed = None,
) -> tf.Tensor:
    """L-infinity projected gradient descent (Madry et al.) as the original ALP code runs it.

    Starts at ``x + uniform(-eps, eps)`` clipped to the box ``[max(x-eps, lo), min(x+eps, hi)]``;
    each of ``num_iter`` steps moves by ``step_size * sign(grad)`` of the summed softmax
    cross-entropy of ``labels`` (up when untargeted, down when targeted) and clips to the box.

    Args:
      x: images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) range of valid inputs.
      model_fn: maps images to logits [N, K]; call it in inference mode (BN moving statistics).
      eps: radius of the L-infinity box, in model units.
      step_size: size of one step, in model units.
      num_iter: number of gradient steps (a Python int).
      labels: int class indices [N]: the label to move away from, or the target.
      targeted: whether to descend (target) instead of ascend the loss.
      seed: None to use the global RNG, or a shape-[2] integer seed for stateless random
        numbers (the same seed gives the same output).

    Returns:
      Adversarial images, same shape and dtype as ``x``; no gradient flows through them.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    settings = ((lo, hi), float(eps), float(step_size), int(num_iter), bool(targeted))
    if seed is not None:
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if not tf.executing_eagerly():
        return _pgd_graph(
            x, (lo, hi), model_fn, float(eps), float(step_size), int(num_iter), labels,
            bool(targeted), seed,
        )
    compiled = compiled_for(
        model_fn, ("pgd", settings),
        lambda x, labels, seed: _pgd_graph(x, (lo, hi), model_fn, *settings[1:4], labels,
                                           settings[4], seed),
    )
    return compiled(x, labels, seed)


def _attack_graph(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    spec: AttackSpec,
    seed: Optional[tf.Tensor],
) -> tf.Tensor:
    """Labels from the model's prediction (or a random target), then PGD; traced in a graph."""
    lo, hi = bounds
    scale = (hi - lo) / 255.0
    start_seed = target_seed = None
    if seed is not None:
        start_seed, target_seed = _split_seed(seed)
    logits = model_fn(x)
    if spec.method == "pgd":
        labels = tf.argmax(logits, axis=-1)
    elif spec.method == "pgdll":
        labels = tf.argmin(logits, axis=-1)
    else:
        num_classes = tf.shape(logits, out_type=tf.int64)[-1]
        batch = tf.shape(logits, out_type=tf.int64)[:1]
        if target_seed is None:
            labels = tf.random.uniform(batch, 0, num_classes, dtype=tf.int64)
        else:
            labels = tf.random.stateless_uniform(
                batch, seed=target_seed, minval=0, maxval=num_classes, dtype=tf.int64
            )
    return _pgd_graph(
        x, (lo, hi), model_fn, spec.eps * scale, spec.step * scale, spec.num_iter,
        tf.stop_gradient(labels), spec.method != "pgd", start_seed,
    )


def generate_adversarial_examples(
    x: tf.Tensor,
    bounds: tuple[float, float],
    model_fn: ModelFn,
    attack_description: str,
    seed: Seed = None,
) -> tf.Tensor:
    """Generates adversarial examples as described by an original attack string.

    Inside a ``tf.function`` the attack is traced into the caller's graph. Called eagerly, it
    runs a tf.function cached per (model_fn, description, bounds) that traces once per input
    signature, so repeated eager calls with the same model and shapes never retrace.

    Args:
      x: clean images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) range of the images, e.g. (-1, 1).
      model_fn: maps images to logits [N, K], in inference mode.
      attack_description: 'clean', 'pgd_EPS_STEP_NITER', 'pgdll_...' or 'pgdrnd_...'.
      seed: None, or a shape-[2] integer seed making the random start and the random target
        of 'pgdrnd' reproducible.

    Returns:
      The adversarial images (``x`` itself for 'clean').

    Raises:
      ConfigError: (a ValueError) when the description is malformed.
    """
    spec = parse_attack_description(attack_description)
    if spec.is_clean:
        return x
    bounds = (float(bounds[0]), float(bounds[1]))
    if seed is not None:
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if not tf.executing_eagerly():
        return _attack_graph(x, bounds, model_fn, spec, seed)
    # Compiling the label pass with the loop matters: run eagerly, a ResNet forward is
    # hundreds of separately dispatched ops.
    compiled = compiled_for(
        model_fn, ("attack", spec, bounds),
        lambda x, seed: _attack_graph(x, bounds, model_fn, spec, seed),
    )
    return compiled(x, seed)
