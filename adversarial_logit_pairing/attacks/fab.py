"""FAB-T, the targeted Fast Adaptive Boundary attack, L-infinity (Croce & Hein 2020, ICML).

FAB looks for the SMALLEST perturbation that changes the decision, not for the highest loss
inside the eps-ball: each step linearises the boundary between the true class ``y`` and the
target ``t`` around the current iterate, ``f(v) ~ f(x1) + g . (v - x1)`` with
``f = z_t - z_y``, and projects onto that hyperplane (intersected with the input box) both the
iterate ``x1`` and the original point ``x0``:

* ``d1``, ``d2``: the minimal-L-inf moves of ``x1`` and ``x0`` onto the hyperplane
  (:func:`project_linf_onto_hyperplane`).
* ``alpha = min(|d1| / (|d1| + |d2|), alpha_max)`` biases the step back towards ``x0`` (0.1),
  ``x1 <- clip((1 - alpha)(x1 + eta d1) + alpha (x0 + eta d2))`` with overshoot ``eta = 1.05``.
* When ``x1`` is misclassified it is recorded if closer than the best so far, then pulled back
  to ``x0 + beta (x1 - x0)`` (``beta = 0.9``) to search for a closer one.

On a linear model the linearisation is exact, so FAB converges to the analytic minimal
perturbation ``|f(x0)| / ||g||_1``. In AutoAttack a point counts as broken only when the best
perturbation found is within eps. Restarts after the first start from
``x0 + eps/2 * u / max|u|``, ``u ~ U(-1, 1)``, as the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn, compiled_for
from adversarial_logit_pairing.attacks import batching
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.attacks.losses import targeted_margin_loss, top_targets
from adversarial_logit_pairing.errors import ConfigError

ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9


def project_linf_onto_hyperplane(points: tf.Tensor, w: tf.Tensor, b: tf.Tensor,
                                 lo: float, hi: float) -> tf.Tensor:
    """Per row, the smallest-L-inf move ``d`` with ``w . (p + d) = b`` and ``lo <= p + d <= hi``.

    Moving coordinate ``i`` by at most ``lam`` towards the hyperplane changes ``w . p`` by
    ``|w_i| min(lam, room_i)``, ``room_i`` the distance to the box face in that direction; the
    total is piecewise linear and increasing in ``lam``, so the smallest ``lam`` reaching the
    hyperplane is found on the sorted rooms in closed form. If even the box corner in that
    direction falls short, ``d`` goes to that corner (the closest the box gets).

    Args:
      points, w: [M, D]; b: [M].

    Returns:
      d [M, D].
    """
    need_signed = b - tf.reduce_sum(w * points, axis=1)
    direction = tf.sign(need_signed)[:, None] * tf.sign(w)
    room = tf.maximum(tf.where(direction > 0, hi - points, points - lo), 0.0)
    room = tf.where(direction == 0, 0.0, room)
    weight = tf.abs(w) * tf.abs(direction)
    need = tf.abs(need_signed)
    order = tf.argsort(room, axis=1)
    room_sorted = tf.gather(room, order, batch_dims=1)
    weight_sorted = tf.gather(weight, order, batch_dims=1)
    saturated = tf.cumsum(weight_sorted * room_sorted, axis=1)  # sum_{j <= k} a_j r_j
    rest = tf.reduce_sum(weight_sorted, axis=1, keepdims=True) - tf.cumsum(weight_sorted, 1)
    reach = saturated + room_sorted * rest  # g(r_k): the change at lam = r_k, increasing in k
    size = tf.shape(points)[1]
    k = tf.reduce_sum(tf.cast(reach < need[:, None], tf.int32), axis=1)
    feasible = k < size
    k = tf.minimum(k, size - 1)
    # For lam in [r_{k-1}, r_k]: g(lam) = sum_{j < k} a_j r_j + lam * sum_{j >= k} a_j.
    below = tf.gather(saturated - weight_sorted * room_sorted, k, batch_dims=1)
    slope = tf.gather(rest + weight_sorted, k, batch_dims=1)
    lam = (need - below) / tf.maximum(slope, 1e-30)
    lam = tf.where(feasible, lam, float("inf"))
    return direction * tf.minimum(lam[:, None], room)


def _linf_norm(v: tf.Tensor) -> tf.Tensor:
    return tf.reduce_max(tf.abs(v), axis=1)


class FabRun(NamedTuple):
    """One FAB run: the closest misclassified point found and its L-inf distance to ``x``."""

    x_adv: tf.Tensor  # the input itself where nothing was found
    distance: tf.Tensor  # float [N], +inf where nothing was found


def fab_single_run(
    model_fn: ModelFn,
    x: tf.Tensor,
    labels: tf.Tensor,
    targets: tf.Tensor,
    x_start: tf.Tensor,
    *,
    bounds: Bounds,
    n_iter: int,
    alpha_max: float = ALPHA_MAX,
    eta: float = ETA,
    beta: float = BETA,
) -> FabRun:
    """One targeted FAB run from ``x_start``, in-graph (call it inside a tf.function)."""
    x = tf.convert_to_tensor(x, tf.float32)
    labels = tf.cast(labels, tf.int32)
    targets = tf.cast(targets, tf.int32)
    lo, hi = bounds
    shape = tf.shape(x)
    batch = shape[0]
    x0 = tf.reshape(x, [batch, -1])

    image_shape = [-1] + x.shape[1:].as_list()  # static, so the model sees its image size

    def model(flat):
        return model_fn(tf.reshape(flat, image_shape))

    def body(i, x1, best, best_distance):
        with tf.GradientTape() as tape:
            tape.watch(x1)
            diff = targeted_margin_loss(model(x1), labels, targets)  # z_t - z_y
            total = tf.reduce_sum(diff)
        grad = tape.gradient(total, x1, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # The linearised boundary {v : diff + grad . (v - x1) = 0}.
        offset = -diff + tf.reduce_sum(grad * x1, axis=1)
        moves = project_linf_onto_hyperplane(
            tf.concat([x1, x0], 0), tf.concat([grad, grad], 0), tf.concat([offset, offset], 0),
            lo, hi)
        d1, d2 = moves[:batch], moves[batch:]
        a1 = tf.maximum(_linf_norm(d1), 1e-8)
        a2 = tf.maximum(_linf_norm(d2), 1e-8)
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1 = tf.clip_by_value((1.0 - alpha) * (x1 + eta * d1) + alpha * (x0 + eta * d2), lo, hi)
        fooled = tf.not_equal(tf.argmax(model(x1), axis=1, output_type=tf.int32), labels)
        distance = _linf_norm(x1 - x0)
        closer = fooled & (distance < best_distance)
        best = tf.where(closer[:, None], x1, best)
        best_distance = tf.where(closer, distance, best_distance)
        x1 = tf.where(fooled[:, None], x0 + beta * (x1 - x0), x1)
        # The model may lose the static batch size; the loop needs it constant.
        return (i + 1, tf.ensure_shape(x1, x0.shape), tf.ensure_shape(best, x0.shape),
                tf.ensure_shape(best_distance, x0.shape[:1]))

    _, _, best, best_distance = tf.while_loop(
        lambda i, *_: i < n_iter, body,
        (tf.constant(0), tf.reshape(x_start, [batch, -1]), x0,
         tf.fill([batch], float("inf"))),
    )
    return FabRun(tf.reshape(best, shape), best_distance)


def run_fab_targeted(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    n_target_classes: int = 9,
    n_iter: int = 100,
    n_restarts: int = 1,
    alpha_max: float = ALPHA_MAX,
    eta: float = ETA,
    beta: float = BETA,
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> AttackResult:
    """FAB-T with the eps threshold: a point is broken if FAB finds a perturbation within eps.

    Targets are the ``n_target_classes`` highest non-true logits of the clean image (fewer if the
    model has fewer classes), each tried (with ``n_restarts`` runs) only on the points still
    robust. AutoAttack's standard version uses 9 targets, 1 restart, 100 iterations.

    Args: as :func:`~adversarial_logit_pairing.attacks.apgd.run_apgd_targeted`, plus the FAB step
      parameters alpha_max, eta, beta.

    Returns:
      AttackResult(x_adv, robust).
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    if n_iter < 1 or n_restarts < 1:
        raise ConfigError(f"FAB needs n_iter >= 1 and n_restarts >= 1, got {n_iter}, "
                          f"{n_restarts}")
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    if logits is None:
        return batching.result(x, robust)
    count = min(n_target_classes, logits.shape[1] - 1)
    targets = top_targets(tf.constant(logits), tf.constant(labels), count).numpy()
    settings = (eps, bounds, int(n_iter), float(alpha_max), float(eta), float(beta))

    def compiled(random_start: bool):
        def graph(model_fn, x, labels, targets, seed):
            start = x
            if random_start:
                rank = len(x.shape)
                u = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
                u_max = tf.reduce_max(tf.abs(u), axis=list(range(1, rank)), keepdims=True)
                start = tf.clip_by_value(x + 0.5 * eps * u / u_max, *bounds)
            run = fab_single_run(model_fn, x, labels, targets, start, bounds=bounds,
                                 n_iter=settings[2], alpha_max=settings[3], eta=settings[4],
                                 beta=settings[5])
            within = run.distance <= eps
            images = tf.where(tf.reshape(within, [-1] + [1] * (len(x.shape) - 1)),
                              run.x_adv, x)
            return images, batching.fooled_flags(model_fn, images, labels)

        return compiled_for(model_fn, ("fab-t", random_start) + settings, graph)

    return batching.run_restarts(lambda restart: compiled(restart > 0), x, labels, robust,
                                 batch_size, seed, n_restarts, targets)
