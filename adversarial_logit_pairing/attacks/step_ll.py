"""Single-step least-likely-class attacks: Step-LL, its random-eps training form, R+Step-LL.

The attacks of the adversarially trained Inception v3 checkpoints (descriptions parsed by
``adversarial_attack.parse_attack_description``, grammar in its docstring):

* ``stepll``: Kurakin, Goodfellow and Bengio (ICLR 2017, arXiv 1611.01236),
  ``x_adv = clip(x - eps * sign(grad_x J(x, y_LL)))`` with ``y_LL = argmin logits(x)``: one step
  DOWN the loss of the least-likely class, which makes it the prediction where it can.
* ``stepllrand``: the same with a fresh ``eps`` per example, drawn from a normal N(0, sigma)
  truncated to [0, EPS], sigma = EPS / 2 (the paper trains with N(0, 8) on [0, 16]), so that
  a model trained on it meets small as well as large perturbations.
* ``rstepll``: R+Step-LL of Tramer et al. (ICLR 2018, arXiv 1705.07204), a random sign step
  first to leave the data point's sharp loss curvature (which single-step training produces and
  which masks its gradients), ``x' = clip(x + alpha * sign(N(0, I)))``, then
  ``x_adv = clip(x' - (eps - alpha) * sign(grad_x' J(x', y_LL)))`` with ``y_LL`` the
  least-likely class at ``x'``, where the gradient is taken (one forward pass, no label pass).

``J`` is the loss of the reference's attack code (adv_imagenet_models' step-LL): softmax
cross-entropy with label smoothing 0.1 of the one-hot ``y_LL`` and, for a model with an
auxiliary head (its registered ``ModelConfig.aux_loss_weight``, 0.4 for ``inception_v3``), that
weight times the same cross-entropy of the auxiliary logits. Its sum over the batch is
differentiated, so each example's step is its own. ``clip`` is to the image bounds: one sign
step of at most eps stays in the eps box by itself. The model runs in inference mode and no
gradient flows through the result.
"""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

# adversarial_logit_pairing.adversarial_attack dispatches here; this module must not import it
# (the attacks package imports that module).
METHODS = ("stepll", "stepllrand", "rstepll")
# Label smoothing of the reference's attack loss (adv_imagenet_models' step-LL).
LABEL_SMOOTHING = 0.1

HeadsFn = Callable[[tf.Tensor], tuple[tf.Tensor, Optional[tf.Tensor]]]


def loss_heads(model_fn: Callable[[tf.Tensor], tf.Tensor]) -> tuple[HeadsFn, float]:
    """``(images -> (logits, aux_logits or None), aux weight)`` of the attack loss.

    The auxiliary head takes part when ``model_fn`` is a registered model's ``inference``
    whose config gives an ``aux_loss_weight`` and which has ``logits_and_aux``: what
    ``train.py`` and ``eval.py`` pass. Any other ``model_fn`` is taken as logits alone.
    """
    model = getattr(model_fn, "__self__", None)
    weight = getattr(getattr(model, "config", None), "aux_loss_weight", None)
    logits_and_aux = getattr(model, "logits_and_aux", None)
    if getattr(model_fn, "__name__", "") == "inference" and weight and callable(logits_and_aux):
        return (lambda x: logits_and_aux(x, is_training=False)), float(weight)
    return (lambda x: (model_fn(x), None)), 0.0


def smoothed_cross_entropy_sum(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Sum over the batch of the cross-entropy of one-hot ``labels`` smoothed by 0.1."""
    logits = tf.cast(logits, tf.float32)
    num_classes = tf.shape(logits)[-1]
    one_hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
    smoothed = one_hot * (1.0 - LABEL_SMOOTHING) + LABEL_SMOOTHING / tf.cast(num_classes,
                                                                            tf.float32)
    return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=smoothed, logits=logits))


def least_likely_step(x: tf.Tensor, bounds: tuple[float, float], heads_fn: HeadsFn,
                      aux_weight: float, eps: tf.Tensor) -> tf.Tensor:
    """``clip(x - eps * sign(grad J(x, argmin logits(x))))``; ``eps`` a scalar or one per image.

    The least-likely class comes from the same forward pass as the gradient.
    """
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits, aux_logits = heads_fn(x)
        labels = tf.stop_gradient(tf.argmin(logits, axis=-1, output_type=tf.int32))
        loss = smoothed_cross_entropy_sum(labels, logits)
        if aux_logits is not None and aux_weight:
            loss += aux_weight * smoothed_cross_entropy_sum(labels, aux_logits)
    grad = tape.gradient(loss, x)
    eps = tf.cast(eps, x.dtype)
    if eps.shape.rank == 1:
        eps = tf.reshape(eps, [-1] + [1] * (x.shape.rank - 1))
    return tf.clip_by_value(x - eps * tf.sign(grad), bounds[0], bounds[1])


def random_eps(batch: tf.Tensor, eps_max: float, seed: Optional[tf.Tensor]) -> tf.Tensor:
    """One eps per example from N(0, eps_max / 2) truncated to [0, eps_max] (Kurakin et al.)."""
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    return tf.random.stateless_parameterized_truncated_normal(
        tf.reshape(batch, [1]), seed, means=0.0, stddevs=eps_max / 2.0, minvals=0.0,
        maxvals=eps_max)


def random_sign_step(x: tf.Tensor, bounds: tuple[float, float], alpha: float,
                     seed: Optional[tf.Tensor]) -> tf.Tensor:
    """``clip(x + alpha * sign(N(0, I)))``: R+Step-LL's random first step."""
    if seed is None:
        noise = tf.random.normal(tf.shape(x), dtype=x.dtype)
    else:
        noise = tf.random.stateless_normal(tf.shape(x), seed, dtype=x.dtype)
    return tf.clip_by_value(x + alpha * tf.sign(noise), bounds[0], bounds[1])


def attack_graph(x: tf.Tensor, bounds: tuple[float, float],
                 model_fn: Callable[[tf.Tensor], tf.Tensor], method: str, eps: int, alpha: int,
                 seed: Optional[tf.Tensor]) -> tf.Tensor:
    """The adversarial examples of one step-LL description, traced into the caller's graph.

    Args:
      x: images [N, H, W, C] within ``bounds``.
      bounds: (lo, hi) of the images; EPS and ALPHA are rescaled by ``(hi - lo) / 255``.
      model_fn: images -> logits in inference mode (see ``loss_heads`` for the aux head).
      method: one of ``METHODS``.
      eps, alpha: the description's EPS and ALPHA (0..255 scale; alpha for 'rstepll' only).
      seed: None (global RNG) or a shape-[2] int64 seed for 'stepllrand' and 'rstepll'.

    Returns:
      The adversarial images, same shape and dtype as ``x``; no gradient flows through them.
    """
    x = tf.convert_to_tensor(x)
    scale = (bounds[1] - bounds[0]) / 255.0
    heads_fn, aux_weight = loss_heads(model_fn)
    if method == "stepll":
        step = tf.constant(eps * scale)
    elif method == "stepllrand":
        step = random_eps(tf.shape(x)[0], eps * scale, seed)
    elif method == "rstepll":
        x = random_sign_step(x, bounds, alpha * scale, seed)
        step = tf.constant((eps - alpha) * scale)
    else:
        raise ValueError(f"not a step-LL method: {method!r} (expected one of {METHODS})")
    return tf.stop_gradient(least_likely_step(x, bounds, heads_fn, aux_weight, step))
