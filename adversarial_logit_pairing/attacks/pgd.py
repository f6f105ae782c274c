"""Multi-restart PGD on the TRUE labels: the attack of the critiques of ALP.

Engstrom, Ilyas and Athalye (2018) broke the released ALP ImageNet model with PGD from a random
start on the true labels (not the model's prediction, which the original evaluation attacks),
with many steps and restarts. Each restart here runs only on the points still robust, and a
point counts as broken as soon as one restart misclassifies it. The PGD step itself is the
original one, :func:`adversarial_logit_pairing.adversarial_attack.pgd`.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack
from adversarial_logit_pairing.adversarial_attack import ModelFn
from adversarial_logit_pairing.attacks import batching
from adversarial_logit_pairing.attacks.batching import ArrayLike, AttackResult, Bounds, Seed
from adversarial_logit_pairing.errors import ConfigError


def run_pgd_true_labels(
    model_fn: ModelFn,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float,
    step_size: float,
    n_iter: int,
    n_restarts: int = 1,
    bounds: Bounds = (-1.0, 1.0),
    seed: Seed = (0, 0),
    batch_size: int = 128,
    robust: Optional[ArrayLike] = None,
) -> AttackResult:
    """L-infinity PGD with random start ascending the cross-entropy of the true ``labels``.

    Args:
      model_fn: images -> logits [N, K], in inference mode.
      x: images within ``bounds``; labels: int [N], the true classes.
      eps, step_size: radius and step in model units; n_iter: steps per restart.
      n_restarts: random restarts, each on the points all earlier ones failed on.
      bounds, seed, batch_size, robust: as for :func:`~.apgd.run_apgd`.

    Returns:
      AttackResult(x_adv, robust).
    """
    eps, bounds = batching.check_inputs(eps, bounds, batch_size)
    if n_iter < 1 or n_restarts < 1 or not step_size > 0:
        raise ConfigError(f"PGD needs n_iter >= 1, n_restarts >= 1 and step_size > 0, got "
                          f"{n_iter}, {n_restarts}, {step_size}")
    x, labels, logits, robust = batching.start_state(model_fn, x, labels, robust, batch_size)
    if logits is None:
        return batching.result(x, robust)

    def chunk(x, labels, seed):
        images = adversarial_attack.pgd(x, bounds, model_fn, eps, float(step_size), int(n_iter),
                                        labels, targeted=False, seed=seed)
        predicted = batching.logits_in_chunks(model_fn, images.numpy(), len(images)).argmax(1)
        return images, tf.constant(predicted != labels.numpy())

    return batching.run_restarts(lambda _: chunk, x, labels, robust, batch_size, seed,
                                 n_restarts)
