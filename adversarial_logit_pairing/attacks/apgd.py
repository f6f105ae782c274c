"""Auto-PGD, L-infinity (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...").

APGD is PGD without a step size to tune: it starts with a step of 2*eps, adds momentum, and
halves the step at checkpoints where progress stalled, restarting from the best point found.

* Step: ``z = P(x + eta * sign(g))``, ``x_next = P(x + 0.75 (z - x) + 0.25 (x - x_prev))``
  (the first step is plain, ``x_1 = z``); ``P`` clips to the eps-box and to ``bounds``.
* Checkpoints at ``p_j * n_iter`` with ``p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: periods of 22%, 19%, 16%, ... of the
  budget, never shorter than 6% (:func:`checkpoint_iterations`, integer arithmetic as the
  reference: ``int(0.22 n)``, ``int(0.03 n)``, ``int(0.06 n)``, each at least 1).
* At a checkpoint, per example, the step halves and the iterate restarts from the highest-loss
  point (with that point's gradient) if at most ``rho = 0.75`` of the steps of the period raised
  the loss, or if the step was not halved at the previous checkpoint and the best loss has not
  risen since (:func:`checkpoint_decision`).
* The returned point of each example is its last misclassified iterate, if any.

One run is one ``tf.while_loop`` (:func:`apgd_single_run`); :func:`run_apgd` and
:func:`run_apgd_targeted` run it per restart / per target, only on the points still robust,
in chunks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn, compiled_for
from adversarial_logit_pairing.attacks import batching
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.attacks.losses import (
    TARGETED_LOSSES,
    loss_function,
    top_targets,
)
from adversarial_logit_pairing.errors import ConfigError

RHO = 0.75
MOMENTUM = 0.75


def checkpoint_fractions() -> list[float]:
    """The paper's checkpoint fractions ``p_1, p_2, ...`` below 1 (``p_0 = 0`` left out)."""
    fractions = [0.0, 0.22]
    while True:
        step = max(fractions[-1] - fractions[-2] - 0.03, 0.06)
        if fractions[-1] + step >= 1.0 - 1e-9:
            return fractions[1:]
        fractions.append(round(fractions[-1] + step, 10))


def checkpoint_iterations(n_iter: int) -> list[int]:
    """The iteration counts after which APGD checks its progress, as the reference computes them.

    Periods start at ``max(int(0.22 n), 1)`` iterations and shrink by ``max(int(0.03 n), 1)``
    down to ``max(int(0.06 n), 1)``; for ``n`` a multiple of 100 they are ``p_j * n`` exactly.
    """
    period = max(int(0.22 * n_iter), 1)
    shrink = max(int(0.03 * n_iter), 1)
    shortest = max(int(0.06 * n_iter), 1)
    done, checks = 0, []
    while done + period <= n_iter:
        done += period
        checks.append(done)
        period = max(period - shrink, shortest)
    return checks


def checkpoint_decision(
    increases: tf.Tensor,
    period: tf.Tensor,
    reduced_at_last_check: tf.Tensor,
    best_loss: tf.Tensor,
    best_loss_at_last_check: tf.Tensor,
    rho: float = RHO,
) -> tf.Tensor:
    """Whether each example halves its step at this checkpoint (bool [N]).

    Args:
      increases: int [N], steps of the period whose loss exceeded the previous step's.
      period: number of steps in the period.
      reduced_at_last_check: bool [N], the step was halved at the previous checkpoint (True
        before the first, so the second condition cannot fire there).
      best_loss, best_loss_at_last_check: float [N], the best loss now and at the last check.
      rho: the success fraction below which the step is too large.
    """
    oscillating = tf.cast(increases, tf.float32) <= rho * tf.cast(period, tf.float32)
    stalled = tf.logical_and(
        tf.logical_not(reduced_at_last_check), best_loss_at_last_check >= best_loss
    )
    return tf.logical_or(oscillating, stalled)


def _per_example(flags: tf.Tensor, rank: int) -> tf.Tensor:
    return tf.reshape(flags, [-1] + [1] * (rank - 1))


class ApgdRun(NamedTuple):
    """One APGD run on one chunk."""

    x_adv: tf.Tensor  # last misclassified iterate per example (the start if none)
    robust: tf.Tensor  # bool [N]: no iterate (nor the start) was misclassified
    best_loss: tf.Tensor  # float [N]
    x_best_loss: tf.Tensor  # the iterate of highest loss
    step_sizes: tf.Tensor  # float [n_iter, N]: the step used at each iteration


def apgd_single_run(
    model_fn: ModelFn,
    x: tf.Tensor,
    labels: tf.Tensor,
    targets: Optional[tf.Tensor],
    seed: tf.Tensor,
    *,
    eps: float,
    bounds: Bounds,
    loss: str,
    n_iter: int,
    rho: float = RHO,
    x_init: Optional[tf.Tensor] = None,
) -> ApgdRun:
    """One APGD run, in-graph (call it inside a tf.function for speed).

    The random start is ``x + eps * t / max|t|`` with ``t ~ U(-1, 1)`` drawn from the stateless
    ``seed`` (one coordinate on the eps-sphere, as the reference), clipped to ``bounds``;
    ``x_init`` replaces it.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    labels = tf.cast(labels, tf.int32)
    lo, hi = bounds
    rank = len(x.shape)
    loss_fn = loss_function(loss)
    box_lo = tf.maximum(x - eps, lo)
    box_hi = tf.minimum(x + eps, hi)

    def project(v):
        return tf.clip_by_value(v, box_lo, box_hi)

    def select(flags, a, b):
        return tf.where(_per_example(flags, rank), a, b)

    def evaluate(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = model_fn(v)
            values = loss_fn(logits, labels, targets)
            total = tf.reduce_sum(values)
        # A model without a gradient path (input quantisation) gets zeros, not a crash.
        grad = tape.gradient(total, v, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        correct = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)
        return values, grad, correct

    if x_init is None:
        t = tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0)
        t_max = tf.reduce_max(tf.abs(t), axis=list(range(1, rank)), keepdims=True)
        start = tf.clip_by_value(x + eps * t / (t_max + 1e-12), lo, hi)
    else:
        start = tf.convert_to_tensor(x_init, tf.float32)
    loss0, grad0, correct0 = evaluate(start)
    checks = [False] * n_iter
    for done in checkpoint_iterations(n_iter):
        checks[done - 1] = True
    is_check = tf.constant(checks, tf.bool)
    batch = tf.shape(x)[0]

    def body(i, x_cur, x_prev, grad, step, x_best, grad_best, loss_best, loss_last,
             increases, since, best_at_check, reduced_at_check, robust, x_adv, trace):
        trace = trace.write(i, tf.reshape(step, [-1]))
        momentum = tf.where(i > 0, MOMENTUM, 1.0)
        z = project(x_cur + step * tf.sign(grad))
        x_new = project(x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - x_prev))
        loss_new, grad_new, correct = evaluate(x_new)
        robust = tf.logical_and(robust, correct)
        x_adv = select(correct, x_adv, x_new)
        # The paper counts f(x_k) > f(x_{k-1}) with x_0 the start; the reference's first
        # comparison of each run reads a not-yet-written zero instead (a negative index).
        increases += tf.cast(loss_new > loss_last, tf.int32)
        improved = loss_new > loss_best
        x_best = select(improved, x_new, x_best)
        grad_best = select(improved, grad_new, grad_best)
        loss_best = tf.where(improved, loss_new, loss_best)
        since += 1
        at_check = is_check[i]
        halve = tf.logical_and(at_check, checkpoint_decision(
            increases, since, reduced_at_check, loss_best, best_at_check, rho))
        reduced_at_check = tf.where(at_check, halve, reduced_at_check)
        best_at_check = tf.where(at_check, loss_best, best_at_check)
        step = select(halve, step / 2.0, step)
        x_next = select(halve, x_best, x_new)
        grad_next = select(halve, grad_best, grad_new)
        increases = tf.where(at_check, tf.zeros_like(increases), increases)
        since = tf.where(at_check, 0, since)
        return (i + 1, x_next, x_cur, grad_next, step, x_best, grad_best, loss_best, loss_new,
                increases, since, best_at_check, reduced_at_check, robust, x_adv, trace)

    state = (
        tf.constant(0), start, start, grad0,
        2.0 * eps * tf.ones(tf.concat([[batch], tf.ones([rank - 1], tf.int32)], 0)),
        start, grad0, loss0, loss0, tf.zeros([batch], tf.int32), tf.constant(0), loss0,
        tf.ones([batch], tf.bool), correct0, start,
        tf.TensorArray(tf.float32, size=n_iter, element_shape=[None]),
    )
    final = tf.while_loop(lambda i, *_: i < n_iter, body, state)
    return ApgdRun(final[14], final[13], final[7], final[5], final[15].stack())


def _chunk_fn(model_fn: ModelFn, eps: float, bounds: Bounds, loss: str, n_iter: int,
              rho: float):
    """The compiled per-chunk APGD: (x, labels, targets, seed) -> (images, fooled)."""

    def graph(model_fn, x, labels, targets, seed):
        run = apgd_single_run(model_fn, x, labels, targets, seed, eps=eps, bounds=bounds,
                              loss=loss, n_iter=n_iter, rho=rho)
        images = tf.where(_per_example(run.robust, len(x.shape)), x, run.x_adv)
        return images, batching.fooled_flags(model_fn, images, labels)

    return compiled_for(model_fn, ("apgd", eps, bounds, loss, n_iter, rho), graph)


def _check_settings(n_iter: int, n_restarts: int, rho: float) -> None:
    if n_iter < 1 or n_restarts < 1:
        raise ConfigError(f"APGD needs n_iter >= 1 and n_restarts >= 1, got {n_iter}, "
                          f"{n_restarts}")
    if not 0.0 < rho < 1.0:
        raise ConfigError(f"APGD rho must be in (0, 1), got {rho}")


def run_apgd(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    loss: str = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = RHO,
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> AttackResult:
    """Untargeted APGD on the true ``labels`` (APGD-CE with ``loss='ce'``, APGD-DLR with 'dlr').

    Args:
      model_fn: images -> logits [N, K], in inference mode.
      x: images [N, ...] within ``bounds``; labels: int [N], the true classes.
      eps: L-infinity radius in model units.
      bounds: (lo, hi) range of valid inputs.
      loss: 'ce', 'dlr' (>= 3 classes) or 'margin' (any number of classes).
      n_iter: iterations per run; n_restarts: runs, each on the points still robust.
      rho: checkpoint success fraction.
      seed: shape-[2] stateless seed; the same seed (and batch_size) gives the same result.
      batch_size: most points attacked at once (bounds the memory).
      robust: optional bool [N]; only points True here (and correctly classified) are attacked.

    Returns:
      AttackResult(x_adv, robust).

    Raises:
      ConfigError: for an unknown or undefined loss (DLR with < 3 classes) or bad settings.
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    _check_settings(n_iter, n_restarts, rho)
    if loss in TARGETED_LOSSES:
        raise ConfigError(f"loss {loss!r} is targeted: use apgd_targeted")
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    if logits is None:
        return batching.result(x, robust)
    loss_function(loss, logits.shape[1])
    compiled = _chunk_fn(model_fn, eps, bounds, loss, n_iter, float(rho))
    return batching.run_restarts(
        lambda _: lambda x, labels, seed: compiled(x, labels, labels, seed),
        x, labels, robust, batch_size, seed, n_restarts)


def run_apgd_targeted(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    bounds: Bounds = (-1.0, 1.0),
    n_target_classes: int = 9,
    loss: str = "dlr-targeted",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = RHO,
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> AttackResult:
    """APGD-T: targeted APGD towards each of the highest non-true classes in turn.

    The targets are the ``n_target_classes`` highest logits other than the true one on the clean
    image (fewer if the model has fewer classes); each target's run attacks only the points all
    earlier targets failed on. Success means misclassification (into any class), as in the
    reference. Use ``loss='margin-targeted'`` for models with fewer than 4 classes.

    Args: as :func:`run_apgd`, plus n_target_classes.

    Returns:
      AttackResult(x_adv, robust).

    Raises:
      ConfigError: targeted DLR with < 4 classes, an untargeted loss, or bad settings.
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    _check_settings(n_iter, n_restarts, rho)
    if loss not in TARGETED_LOSSES:
        raise ConfigError(f"apgd_targeted needs a targeted loss ({', '.join(TARGETED_LOSSES)}), "
                          f"got {loss!r}")
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    if logits is None:
        return batching.result(x, robust)
    num_classes = logits.shape[1]
    loss_function(loss, num_classes)
    count = min(n_target_classes, num_classes - 1)
    targets = top_targets(tf.constant(logits), tf.constant(labels), count).numpy()
    compiled = _chunk_fn(model_fn, eps, bounds, loss, n_iter, float(rho))
    return batching.run_restarts(lambda _: compiled, x, labels, robust, batch_size, seed,
                                 n_restarts, targets)
