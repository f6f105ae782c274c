"""The local linearity regulariser (LLR; Qin et al. 2019, arXiv 1907.02610) as a training loss.

LLR penalises how far the loss strays from its linear approximation in the eps-box around each
training image:

    g(d; x) = |l(x + d) - l(x) - d^T grad_x l(x)|,   gamma(eps, x) = max_{|d|_inf <= eps} g(d; x)

    loss = llr_xent_weight * loss_xent + llr_lambda * gamma + llr_mu * |d_LLR^T grad_x l(x)|

with ``d_LLR`` the maximiser found by a short search. The details the paper leaves open follow
DeepMind's own TF1 code (google-deepmind/local_linearity_regularizer and the PGD of
interval-bound-propagation):

* ``l`` is the softmax cross-entropy on ONE-HOT labels, per example (the sparse op has no
  second derivative); ``grad_x l(x)`` is the gradient of their sum and stays in the graph, so
  the regulariser's gradient back-propagates through it (double back-propagation);
* the search starts from a uniform draw in the eps-box, takes ``llr_steps`` Adam steps
  (beta1 0.9, beta2 0.999, epsilon 1e-9) on ``-mean_batch |l(x+d) - l(x) - d^T g|`` with ``g``
  (and ``l(x)``) held constant, projects onto the eps-box and the image bounds after each step,
  and is not differentiated (``tf.while_loop``, ``tf.stop_gradient``); the ``mu`` term is not
  part of its objective;
* every LLR pass (the clean one and the perturbed ones) runs in inference mode with batch
  norm normalising by the CLEAN batch's statistics, which the clean pass records and the
  perturbed passes reuse (``BatchStatistics``); gradients flow through those statistics (the
  search's passes, which differentiate only with respect to the input, use TensorFlow's fused
  inference kernel instead: same values, faster), and no LLR pass moves the moving statistics
  (only the training pass does);
* eps grows linearly from 0 over the first ``llr_eps_warmup_steps`` global steps.

Departures from DeepMind's code, on purpose:

* the regulariser's clean pass is its own (as DeepMind's), but with ``train_adv_method`` the
  training pass runs over ``[clean; adversarial]`` as in the original ALP code, whose
  statistics the LLR passes do not use: they use the clean batch's alone;
* ``llr_mu`` weighs ``|d^T g|`` on its own (the paper's formula); DeepMind's
  ``smoothing_factor`` sat inside ``lambda`` (their 0.3 with lambda 4 is ``llr_mu=1.2``);
* batch variance as ``mean((x - mean)^2)`` (DeepMind: ``mean(x^2) - mean^2``, which loses
  digits), computed without ``tf.nn.moments``, whose stop-gradient on the mean inside the
  variance is exact at first order but drops a term of the second derivative;
* the random start of each replica is its slice of ONE draw for the global batch, so training
  on several replicas draws what one device draws for the global batch;
* the cross-entropy weighed by ``llr_xent_weight`` is the project's ``loss_xent`` (label
  smoothing, and with an attack the mean over ``[clean; adversarial]``), and weight decay is
  the original ALP code's (every trainable variable); DeepMind used the plain clean
  cross-entropy and decayed only conv/linear weights;
* with bfloat16/float16 models the LLR passes run in float32 (below).

Precision: with a bfloat16/float16 model the training pass keeps the compute dtype, but every
LLR pass (clean, search, perturbed; so the second-order backward too) runs in float32
(``layers.float32_compute``): ``l(x+d) - l(x) - d^T g`` is a cancellation, and bfloat16
rounding is as large as what it measures (resnet_v2_tiny at 32x32, same weights and d, eps
2/255: gamma 0.0144 in float32, 0.0178 in bfloat16, per-example difference 0.011).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import tensorflow as tf
from absl import logging

from adversarial_logit_pairing.models.layers import BatchNorm, batch_norm_hook, float32_compute

# Adam of DeepMind's inner search (interval-bound-propagation's UnrolledAdam defaults).
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPSILON = 1e-9
# Folded into the step seed so the search's random start is independent of the attack's.
_SEARCH_STREAM = 0x11F

LossFn = Callable[[tf.Tensor], tf.Tensor]  # images [N, ...] -> per-example losses [N]


def enabled(hparams) -> bool:
    """Whether the hparams turn the regulariser on (``llr_lambda > 0``)."""
    return hparams.llr_lambda > 0


def one_hot_losses(one_hot: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example softmax cross-entropy in float32 on one-hot (dense) labels.

    The dense op, not the sparse one: TensorFlow gives the sparse op no second derivative.
    """
    return tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(one_hot, tf.float32),
                                                   logits=tf.cast(logits, tf.float32))


# ---- Batch norm with the clean batch's statistics ---------------------------------------------

class BatchStatistics:
    """Records each batch norm's statistics in a clean pass and reuses them in later passes.

    ``with stats.record(): model(x, is_training=False)`` normalises every batch norm of the
    model by the batch's own mean and (biased) variance, in float32, and keeps them;
    ``with stats.reuse(): model(x + d, is_training=False)`` normalises by the kept ones. Neither
    touches the moving statistics. The statistics are tensors of the clean pass, so gradients
    flow through them as through any batch-norm pass in training mode.

    A layer wrapped for ``--sync_batch_norm`` (``distribution.CrossReplicaBatchNorm``) records
    the statistics of the global batch (all-reduced over the replicas), as its training pass.
    """

    def __init__(self, model: tf.Module):
        from adversarial_logit_pairing.distribution import CrossReplicaBatchNorm

        self.statistics: dict[int, tuple[tf.Tensor, tf.Tensor]] = {}
        self._synchronised = {id(m.layer) for m in model.submodules
                              if isinstance(m, CrossReplicaBatchNorm)}

    @contextlib.contextmanager
    def record(self):
        """A block whose batch norms use, and keep, their batch's statistics."""
        with batch_norm_hook(self._record):
            yield

    @contextlib.contextmanager
    def reuse(self, differentiable: bool = True):
        """A block whose batch norms use the statistics ``record`` kept.

        ``differentiable=False`` normalises with TensorFlow's fused inference kernel, which
        Grappler fuses into the convolutions but which gives the statistics no gradient: for
        the search, which differentiates only with respect to the input.
        """
        with batch_norm_hook(self._reuse if differentiable else self._reuse_fused):
            yield

    def _record(self, layer: BatchNorm, x: tf.Tensor) -> tf.Tensor:
        if id(layer) in self.statistics:
            raise RuntimeError(f"{layer.scope}: batch norm called twice in one recorded pass")
        x32 = tf.cast(x, tf.float32)
        axes = list(range(x.shape.rank - 1))
        ctx = tf.distribute.get_replica_context()
        if id(layer) in self._synchronised and ctx is not None and ctx.num_replicas_in_sync > 1:
            count = tf.cast(tf.reduce_prod(tf.shape(x32)[:-1]), tf.float32)
            sums = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(
                [tf.reduce_sum(x32, axes), count[None]], axis=0))
            mean = sums[:-1] / sums[-1]
            variance = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(
                tf.square(x32 - mean), axes)) / sums[-1]
        else:
            # Not tf.nn.moments: it stops the gradient of the mean inside the variance, exact
            # at first order only; the regulariser differentiates this pass twice.
            mean = tf.reduce_mean(x32, axes)
            variance = tf.reduce_mean(tf.square(x32 - mean), axes)
        self.statistics[id(layer)] = (mean, variance)
        return _normalise(layer, x, mean, variance)

    def _reuse(self, layer: BatchNorm, x: tf.Tensor) -> tf.Tensor:
        if id(layer) not in self.statistics:
            raise RuntimeError(f"{layer.scope}: no statistics recorded for this batch norm")
        mean, variance = self.statistics[id(layer)]
        return _normalise(layer, x, mean, variance)

    def _reuse_fused(self, layer: BatchNorm, x: tf.Tensor) -> tf.Tensor:
        if id(layer) not in self.statistics:
            raise RuntimeError(f"{layer.scope}: no statistics recorded for this batch norm")
        mean, variance = self.statistics[id(layer)]
        gamma = layer.gamma if layer.gamma is not None else tf.ones_like(mean)
        beta = layer.beta if layer.beta is not None else tf.zeros_like(mean)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean=tf.stop_gradient(mean), variance=tf.stop_gradient(variance),
            epsilon=layer.epsilon, is_training=False)
        return y


def _normalise(layer: BatchNorm, x: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor) -> tf.Tensor:
    """``layer``'s affine batch norm of ``x`` by the given statistics, in float32.

    The same for ``BatchNorm`` and ``UnfusedBatchNorm``: they differ only in the moving-variance
    update, which no LLR pass makes.
    """
    y = tf.nn.batch_normalization(tf.cast(x, tf.float32), mean, variance, layer.beta,
                                  layer.gamma, layer.epsilon)
    return tf.cast(y, x.dtype)


# ---- The search for d_LLR ---------------------------------------------------------------------

def project(delta: tf.Tensor, images: tf.Tensor, eps: tf.Tensor,
            bounds: tuple[float, float]) -> tf.Tensor:
    """``delta`` clipped to the eps-box, then so that ``images + delta`` stays in ``bounds``."""
    delta = tf.clip_by_value(delta, -eps, eps)
    return tf.clip_by_value(images + delta, bounds[0], bounds[1]) - images


def uniform_start(images: tf.Tensor, eps: tf.Tensor, bounds: tuple[float, float],
                  seed: tf.Tensor) -> tf.Tensor:
    """A uniform draw in ``[-eps, eps]``, projected; under a strategy, this replica's slice.

    Each replica draws the start of the whole global batch from the same seed and keeps its
    own rows, so several replicas start where one device would on the global batch.
    """
    ctx = tf.distribute.get_replica_context()
    replicas = 1 if ctx is None else ctx.num_replicas_in_sync
    batch = tf.shape(images)[0]
    shape = tf.concat([[batch * replicas], tf.shape(images)[1:]], axis=0)
    start = tf.random.stateless_uniform(shape, seed, minval=-1.0, maxval=1.0) * eps
    if replicas > 1:
        start = start[tf.cast(ctx.replica_id_in_sync_group, tf.int32) * batch:][:batch]
    return project(start, images, eps, bounds)


def search(loss_fn: LossFn, images: tf.Tensor, clean_loss: tf.Tensor, clean_grad: tf.Tensor,
           start: tf.Tensor, eps: tf.Tensor, steps: int, learning_rate: float,
           bounds: tuple[float, float]) -> tf.Tensor:
    """``d_LLR``: projected Adam ascent of ``mean |loss_fn(x+d) - l(x) - d^T g|`` from ``start``.

    Args:
      loss_fn: per-example losses of a perturbed batch (with the clean batch's statistics).
      images: the clean batch x (float32).
      clean_loss, clean_grad: ``l(x)`` [N] and ``g = grad_x l(x)``, held constant here.
      start: the initial ``d`` (``uniform_start``).
      eps: the box radius in model units (a scalar tensor; it may warm up).
      steps: Adam steps (a Python int); 0 returns ``start``.
      learning_rate: Adam's learning rate in model units.
      bounds: the image range.

    Returns:
      ``d`` (float32, no gradient): the last iterate, as DeepMind's search returns it.
    """
    images, clean_loss, clean_grad, start = (
        tf.stop_gradient(t) for t in (images, clean_loss, clean_grad, start))
    axes = list(range(1, images.shape.rank))

    def body(t, delta, m, v):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            linear = clean_loss + tf.reduce_sum(delta * clean_grad, axes)
            objective = -tf.reduce_mean(tf.abs(loss_fn(images + delta) - linear))
        grad = tape.gradient(objective, delta)
        t = t + 1.0
        m = ADAM_BETA1 * m + (1.0 - ADAM_BETA1) * grad
        v = ADAM_BETA2 * v + (1.0 - ADAM_BETA2) * tf.square(grad)
        m_hat = m / (1.0 - tf.pow(ADAM_BETA1, t))
        v_hat = v / (1.0 - tf.pow(ADAM_BETA2, t))
        delta = delta - learning_rate * m_hat / (tf.sqrt(v_hat) + ADAM_EPSILON)
        return t, project(delta, images, eps, bounds), m, v

    if steps == 0:
        return start
    zeros = tf.zeros_like(start)
    # A hand-written Adam: Keras' optimizers update variables, not loop-carried tensors.
    _, delta, _, _ = tf.while_loop(lambda t, *_: t < steps, body,
                                   (tf.constant(0.0), start, zeros, zeros),
                                   parallel_iterations=1, maximum_iterations=steps)
    return tf.stop_gradient(delta)


def nonlinearity(loss_fn: LossFn, images: tf.Tensor, clean_loss: tf.Tensor,
                 clean_grad: tf.Tensor, delta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(|l(x+d) - l(x) - d^T g|, |d^T g|)`` per example, differentiable in the weights.

    ``d`` is a constant; ``l(x)`` and ``g`` are not (their gradients reach the weights, ``g``'s
    by double back-propagation).
    """
    delta = tf.stop_gradient(delta)
    dot = tf.reduce_sum(delta * clean_grad, list(range(1, images.shape.rank)))
    diff = loss_fn(images + delta) - clean_loss - dot
    return tf.abs(diff), tf.abs(dot)


def warmed_up_eps(eps: float, warmup_steps: int, global_step: tf.Tensor) -> tf.Tensor:
    """``eps * min(step / warmup_steps, 1)``: DeepMind's linear schedule from 0 (or just eps)."""
    if warmup_steps <= 0:
        return tf.constant(eps, tf.float32)
    rate = tf.cast(global_step, tf.float32) / float(warmup_steps)
    return eps * tf.clip_by_value(rate, 0.0, 1.0)


# ---- The regulariser of one batch -------------------------------------------------------------

def clean_pass(model, images: tf.Tensor, one_hot: tf.Tensor,
               statistics: BatchStatistics) -> tuple[tf.Tensor, tf.Tensor]:
    """``(l(x), grad_x l(x))``: the clean LLR pass, recording the batch's statistics.

    Inference mode (no dropout, no moving-statistics update) with batch statistics; the
    gradient (of the SUM of the per-example losses) is taken under a tape of its own, so an
    enclosing tape can differentiate it again.
    """
    with tf.GradientTape() as tape:
        tape.watch(images)
        with statistics.record():
            logits = model(images, is_training=False)
        clean_loss = one_hot_losses(one_hot, logits)
    return clean_loss, tape.gradient(clean_loss, images)


def perturbed_loss_fn(model, one_hot: tf.Tensor, statistics: BatchStatistics,
                      differentiable: bool = True) -> LossFn:
    """Per-example losses of a perturbed batch normalised by the clean batch's statistics.

    ``differentiable=False``: faster, but no gradient reaches the weights through the
    statistics (``BatchStatistics.reuse``); the search's passes.
    """

    def loss_fn(perturbed: tf.Tensor) -> tf.Tensor:
        with statistics.reuse(differentiable):
            return one_hot_losses(one_hot, model(perturbed, is_training=False))

    return loss_fn


def regularizer(model, images: tf.Tensor, one_hot: tf.Tensor, eps: tf.Tensor, steps: int,
                learning_rate: float, bounds: tuple[float, float],
                seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(gamma, grad_term)``: batch means of ``g(d_LLR; x)`` and ``|d_LLR^T grad_x l(x)|``.

    Args:
      model: an ``ImageClassifier`` (its batch norms honour ``layers.batch_norm_hook``).
      images: the clean batch in ``bounds`` (float32).
      one_hot: [N, K] one-hot labels.
      eps, learning_rate: the box radius and the search's Adam learning rate, model units.
      steps: the search's Adam steps.
      bounds: the image range.
      seed: [2] int stateless seed of the random start.

    Both are differentiable in the model's weights (call under the training tape).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    statistics = BatchStatistics(model)
    with float32_compute():
        clean_loss, clean_grad = clean_pass(model, images, one_hot, statistics)
        loss_fn = perturbed_loss_fn(model, one_hot, statistics)
        start = uniform_start(images, eps, bounds, seed)
        delta = search(perturbed_loss_fn(model, one_hot, statistics, differentiable=False),
                       images, clean_loss, clean_grad, start, eps, steps, learning_rate, bounds)
        gamma, grad_term = nonlinearity(loss_fn, images, clean_loss, clean_grad, delta)
    return tf.reduce_mean(gamma), tf.reduce_mean(grad_term)


# ---- The training step's hook -----------------------------------------------------------------

def search_seed(seed: int, global_step: tf.Variable,
                micro_batch: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The start's seed: a function of (seed, step, micro-batch), the same on every replica."""
    step_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(global_step, tf.int64)])
    if micro_batch is not None:
        step_seed = tf.random.experimental.stateless_fold_in(step_seed, micro_batch)
    return tf.random.experimental.stateless_fold_in(step_seed, _SEARCH_STREAM)


def add_llr_losses(losses: dict, model, images: tf.Tensor, labels: tf.Tensor, num_classes: int,
                   hparams, bounds: tuple[float, float], seed: int, global_step: tf.Variable,
                   micro_batch: Optional[tf.Tensor] = None) -> dict:
    """``losses`` (``training.alp_losses``) with the regulariser's terms, when it is on.

    Adds ``loss_llr_gamma = llr_lambda * gamma`` and ``loss_llr_grad = llr_mu * |d^T g|`` to
    ``total_loss`` and weighs ``loss_xent`` by ``llr_xent_weight``; with ``llr_lambda = 0``
    returns ``losses`` untouched (and builds nothing). Call it under the training tape, on the
    CLEAN images of the step (not the adversarial half).
    """
    if not enabled(hparams):
        return losses
    scale = (bounds[1] - bounds[0]) / 255.0
    eps = warmed_up_eps(hparams.llr_eps * scale, hparams.llr_eps_warmup_steps, global_step)
    one_hot = tf.one_hot(labels, num_classes)
    gamma, grad_term = regularizer(
        model, images, one_hot, eps, hparams.llr_steps,
        hparams.llr_adam_lr * (bounds[1] - bounds[0]), bounds,
        search_seed(seed, global_step, micro_batch))
    losses = dict(losses)
    xent = losses["loss_xent"]
    losses["loss_xent"] = hparams.llr_xent_weight * xent
    losses["loss_llr_gamma"] = hparams.llr_lambda * gamma
    losses["loss_llr_grad"] = hparams.llr_mu * grad_term
    losses["total_loss"] = (losses["total_loss"] + (hparams.llr_xent_weight - 1.0) * xent
                            + losses["loss_llr_gamma"] + losses["loss_llr_grad"])
    return losses


def log_gamma(step: int, outputs: dict, hparams) -> None:
    """Logs the search's final gamma (batch mean, unweighted) of the step just run."""
    if enabled(hparams) and "loss_llr_gamma" in outputs:
        logging.info("global_step %d: llr gamma = %.5f", step,
                     float(outputs["loss_llr_gamma"]) / hparams.llr_lambda)
