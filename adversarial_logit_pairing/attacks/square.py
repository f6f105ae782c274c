"""Square Attack, L-infinity (Andriushchenko, Croce, Flammarion, Hein 2020).

A score-based random search: it needs only the logits, never a gradient, so a model that hides
its gradients (input quantisation, non-differentiable preprocessing, saturated softmax) does
not stop it. This is why AutoAttack runs it last, on the points the gradient attacks missed.

* Start: ``x + eps * s`` with one random sign ``s`` per (column, channel): vertical stripes,
  clipped to ``bounds``.
* Each query draws, per image, a square window of side ``s_i`` and a sign per channel, sets the
  window to ``x +- eps`` (a step of ``2 eps`` from the current best, projected back onto the
  eps-box) and keeps the candidate only if it lowers the margin ``z_y - max_{i != y} z_i``
  (or reaches a misclassification); an image stops as soon as it is misclassified.
* ``s_i = max(round(sqrt(p_i * H * W)), 1)`` with ``p_i = p_init / 2^k``, ``k`` the number of
  thresholds (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000) the iteration exceeds; the
  iteration is first rescaled to a 10000-query budget (``int(i / n_queries * 10000)``) unless
  ``rescale_schedule`` is False, as in AutoAttack's standard version.

The reference (fra31/auto-attack) draws one window and one sign vector per query for the whole
batch; here every image draws its own, as in the authors' original Square Attack code, and the
window's corner can be any of the ``size - side + 1`` positions (see ``square_single_run``).
"""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn, compiled_for
from adversarial_logit_pairing.attacks import batching
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.attacks.losses import margin_loss
from adversarial_logit_pairing.errors import ConfigError

P_INIT = 0.8
# The square-fraction schedule of the reference: p halves after each of these iterations.
P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_fraction(iteration: int, n_queries: int, p_init: float = P_INIT,
                    rescale_schedule: bool = True) -> float:
    """The fraction ``p`` of the image a square covers at query ``iteration`` (0-based)."""
    it = int(iteration / n_queries * 10000) if rescale_schedule else iteration
    return p_init / 2 ** sum(it > threshold for threshold in P_THRESHOLDS)


def square_side(fraction: float, height: int, width: int) -> int:
    """The side of a square covering ``fraction`` of a ``height x width`` image (at least 1)."""
    return min(max(int(round(math.sqrt(fraction * height * width))), 1), height, width)


def _sign(uniform: tf.Tensor) -> tf.Tensor:
    return tf.where(uniform < 0.5, -1.0, 1.0)


def square_single_run(
    model_fn: ModelFn,
    x: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    eps: float,
    bounds: Bounds,
    n_queries: int,
    p_init: float = P_INIT,
    rescale_schedule: bool = True,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One Square run on NHWC images, in-graph; returns (best images, margin [N]).

    Only the images not yet misclassified are sent to the model at each query (the loop stops
    when none is left), so a broken model costs few queries.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    labels = tf.cast(labels, tf.int32)
    lo, hi = bounds
    _, height, width, channels = x.shape
    start_seed, query_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    batch = tf.shape(x)[0]
    stripes = _sign(tf.random.stateless_uniform([batch, 1, width, channels], start_seed))
    x_best = tf.clip_by_value(x + eps * stripes, lo, hi)
    margin_best = -margin_loss(model_fn(x_best), labels)
    sides = tf.constant([
        square_side(square_fraction(i, n_queries, p_init, rescale_schedule), height, width)
        for i in range(n_queries)
    ], tf.int32)
    rows = tf.range(height)
    cols = tf.range(width)

    def body(i, x_best, margin_best):
        active = tf.where(margin_best > 0)[:, 0]
        x_clean = tf.gather(x, active)
        x_cur = tf.gather(x_best, active)
        margin_cur = tf.gather(margin_best, active)
        count = tf.shape(active)[0]
        side = sides[i]
        draws = tf.random.stateless_uniform(
            [count, 2 + channels], tf.random.experimental.stateless_fold_in(query_seed, i))
        # Corners uniform over all size - side + 1 positions. The reference draws them from
        # [0, size - side), so a square never touches the last row or column unless it spans
        # the image: harmless on 32x32, but on a 2x2 image half the pixels are never searched.
        top = tf.cast(draws[:, 0] * tf.cast(height - side + 1, tf.float32), tf.int32)
        left = tf.cast(draws[:, 1] * tf.cast(width - side + 1, tf.float32), tf.int32)
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + side)
        in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + side)
        window = in_rows[:, :, None, None] & in_cols[:, None, :, None]
        signs = tf.reshape(_sign(draws[:, 2:]), [count, 1, 1, channels])
        candidate = x_cur + tf.where(window, 2.0 * eps * signs, 0.0)
        candidate = tf.clip_by_value(candidate, x_clean - eps, x_clean + eps)
        candidate = tf.clip_by_value(candidate, lo, hi)
        margin_new = -margin_loss(model_fn(candidate), tf.gather(labels, active))
        accept = (margin_new < margin_cur) | (margin_new <= 0.0)
        where = active[:, None]
        x_best = tf.tensor_scatter_nd_update(
            x_best, where, tf.where(accept[:, None, None, None], candidate, x_cur))
        margin_best = tf.tensor_scatter_nd_update(
            margin_best, where, tf.where(accept, margin_new, margin_cur))
        return i + 1, x_best, margin_best

    _, x_best, margin_best = tf.while_loop(
        lambda i, x_best, margin_best: (i < n_queries) & tf.reduce_any(margin_best > 0),
        body, (tf.constant(0), x_best, margin_best),
    )
    return x_best, margin_best


def run_square(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    n_queries: int = 5000,
    p_init: float = P_INIT,
    rescale_schedule: bool = True,
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> AttackResult:
    """The L-infinity Square attack on NHWC images with the true ``labels``.

    Args:
      model_fn: images -> logits [N, K], in inference mode (only its outputs are used).
      x: images [N, H, W, C] within ``bounds``; labels: int [N], the true classes.
      eps: L-infinity radius in model units; bounds: (lo, hi) range of valid inputs.
      n_queries: most model queries per image (after the start's).
      p_init: initial fraction of the image a square covers.
      rescale_schedule: rescale the p schedule from 10000 queries to ``n_queries``
        (the reference's default; AutoAttack's standard version turns it off).
      seed, batch_size, robust: as for :func:`~adversarial_logit_pairing.attacks.apgd.run_apgd`.

    Returns:
      AttackResult(x_adv, robust).
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    if n_queries < 1 or not 0.0 < p_init <= 1.0:
        raise ConfigError(f"Square needs n_queries >= 1 and 0 < p_init <= 1, got {n_queries}, "
                          f"{p_init}")
    if len(x.shape) != 4:
        raise ConfigError(f"Square attacks NHWC images, got shape {tuple(x.shape)}")
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    if logits is None:
        return batching.result(x, robust)
    settings = (eps, bounds, int(n_queries), float(p_init), bool(rescale_schedule))

    def graph(model_fn, x, labels, seed):
        images, margin = square_single_run(
            model_fn, x, labels, seed, eps=eps, bounds=bounds, n_queries=settings[2],
            p_init=settings[3], rescale_schedule=settings[4])
        images = tf.where((margin <= 0.0)[:, None, None, None], images, x)
        return images, batching.fooled_flags(model_fn, images, labels)

    compiled = compiled_for(model_fn, ("run_square",) + settings, graph)
    x_adv, robust = batching.run_on_robust(
        compiled, x, labels, x.copy(), robust, batch_size, batching.as_seed(seed))
    return batching.result(x_adv, robust)
