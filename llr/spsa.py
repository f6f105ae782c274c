"""SPSA (Uesato et al. 2018): a gradient-free L-infinity attack, as the challenge ran it.

The challenge used cleverhans' SPSA on one image at a time: eps 16/255, 200 steps, 64
samples per step (32 random +-delta sign vectors, each evaluated mirrored), delta 0.01, Adam
with learning rate 0.01 (beta1 0.9, beta2 0.999, epsilon 1e-9) on the perturbation, which is
projected onto the eps box and the [0, 1] image range after every step; it starts from
``uniform(-eps, eps)``. The loss minimised is ``correct logit - best wrong logit``, and an
image stops once its loss is below -1 (misclassified by a margin of 1). Here all images of
a batch run together in one in-graph loop; each keeps its own early stop, so the result is
the same as running them one by one (up to the random numbers).
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from llr.spatial import margin_loss

EPSILON = 16.0 / 255.0
NUM_STEPS = 200
NUM_SAMPLES = 64
LEARNING_RATE = 0.01
DELTA = 0.01
EARLY_STOP_LOSS_THRESHOLD = -1.0
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPSILON = 0.9, 0.999, 1e-9

ModelFn = Callable[[tf.Tensor], tf.Tensor]


def spsa(
    model_fn: ModelFn,
    images: tf.Tensor,
    labels: tf.Tensor,
    *,
    eps: float = EPSILON,
    num_steps: int = NUM_STEPS,
    num_samples: int = NUM_SAMPLES,
    learning_rate: float = LEARNING_RATE,
    delta: float = DELTA,
    early_stop_loss_threshold: Optional[float] = EARLY_STOP_LOSS_THRESHOLD,
    bounds: tuple[float, float] = (0.0, 1.0),
    seed=(0, 0),
) -> tf.Tensor:
    """Untargeted SPSA against the true ``labels``.

    Args:
      model_fn: images [M,H,W,C] -> logits [M, K]; called on ``N * num_samples`` images at once.
      images: clean images [N,H,W,C] within ``bounds``.
      labels: true classes [N].
      eps: L-infinity radius in image units.
      num_steps: optimisation steps.
      num_samples: model evaluations per image and step (even: half are mirrored).
      learning_rate: Adam learning rate.
      delta: size of the +-delta probes of the gradient estimate.
      early_stop_loss_threshold: an image stops once its loss is below this; None never stops.
      bounds: valid image range.
      seed: shape-[2] integer seed of the stateless random numbers (same seed, same result).

    Returns:
      Adversarial images, same shape as ``images``, within eps of them and within bounds.

    Raises:
      ConfigError: (a ValueError) ``num_samples`` is odd or < 2 (``--spsa_samples``).
    """
    _check_num_samples(num_samples)
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return _spsa_graph(model_fn, images, labels, seed, float(eps), int(num_steps),
                       int(num_samples), float(learning_rate), float(delta),
                       early_stop_loss_threshold, (float(bounds[0]), float(bounds[1])))


def _check_num_samples(num_samples: int) -> None:
    # Half of the probes are the mirror images of the other half.
    if num_samples < 2 or num_samples % 2:
        raise ConfigError(f"spsa: num_samples must be even and >= 2, got {num_samples}")


def _spsa_graph(model_fn, images, labels, seed, eps, num_steps, num_samples, learning_rate,
                delta, threshold, bounds):
    lo, hi = bounds
    half = num_samples // 2
    image_shape = tf.shape(images)
    n = image_shape[0]

    def project(perturbation):
        perturbation = tf.clip_by_value(perturbation, -eps, eps)
        return tf.clip_by_value(images + perturbation, lo, hi) - images

    def loss_of(x, repeat):
        logits = model_fn(x)
        # Minimised: the correct logit minus the best wrong one.
        return -margin_loss(logits, tf.repeat(labels, repeat))

    init_seed, loop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    perturbation = project(tf.random.stateless_uniform(image_shape, init_seed, -eps, eps))
    zeros = tf.zeros_like(images)

    def body(step, perturbation, m, u, done):
        step_seed = tf.random.experimental.stateless_fold_in(loop_seed, step)
        probe_shape = tf.concat([[n, half], image_shape[1:]], axis=0)
        signs = tf.sign(tf.random.stateless_uniform(probe_shape, step_seed, -1.0, 1.0))
        probes = delta * tf.concat([signs, -signs], axis=1)  # [N, S, H, W, C]
        points = (images + perturbation)[:, None] + probes
        flat = tf.reshape(points, tf.concat([[-1], image_shape[1:]], axis=0))
        losses = tf.reshape(loss_of(flat, num_samples), [n, num_samples, 1, 1, 1])
        grad = tf.reduce_mean(losses * probes, axis=1) / delta
        t = tf.cast(step + 1, tf.float32)
        m = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
        u = _ADAM_BETA2 * u + (1.0 - _ADAM_BETA2) * grad * grad
        m_hat = m / (1.0 - _ADAM_BETA1 ** t)
        u_hat = u / (1.0 - _ADAM_BETA2 ** t)
        updated = project(perturbation - learning_rate * m_hat / (tf.sqrt(u_hat) + _ADAM_EPSILON))
        keep = done[:, None, None, None]
        perturbation = tf.where(keep, perturbation, updated)
        if threshold is not None:
            current = loss_of(images + perturbation, 1)
            done = done | (current < threshold)
        return step + 1, perturbation, m, u, done

    def cond(step, perturbation, m, u, done):
        return tf.logical_and(step < num_steps, tf.logical_not(tf.reduce_all(done)))

    _, perturbation, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), perturbation, zeros, zeros, tf.zeros([n], tf.bool)))
    return tf.stop_gradient(images + perturbation)


def compiled_spsa(model_fn: ModelFn, **settings) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor],
                                                             tf.Tensor]:
    """A ``tf.function`` ``attack(images, labels, seed)`` running :func:`spsa` with ``settings``.

    Raises:
      ConfigError: as :func:`spsa`, now rather than at the first call.
    """
    _check_num_samples(settings.get("num_samples", NUM_SAMPLES))

    @tf.function(reduce_retracing=True)
    def attack(images, labels, seed):
        return spsa(model_fn, images, labels, seed=seed, **settings)

    return attack
