"""Running an attack chunk by chunk on the points that are still robust.

Every strong attack here is a compiled per-chunk function (an in-graph loop) driven from Python:
the driver gathers the points still robust, feeds them in chunks of at most ``batch_size`` (so
memory is bounded whatever the number of points), and scatters back the points each chunk
fooled. Running an attack only on the points all earlier attacks (restarts, targets) failed on
is what the reference does, and saves most of the cost once the model is broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.adversarial_attack import ModelFn, compiled_for
from adversarial_logit_pairing.errors import ConfigError

Seed = Union[tf.Tensor, Sequence[int]]
# Images, labels and masks may come as numpy arrays or eager tensors.
ArrayLike = Union[np.ndarray, tf.Tensor]
Bounds = tuple[float, float]
# chunk_fn(x, labels, [extra,] seed) -> (adversarial images, fooled flags); compiled.
ChunkFn = Callable[..., tuple[tf.Tensor, tf.Tensor]]


class AttackResult(NamedTuple):
    """Output of an attack: the images and which points survived it.

    ``x_adv`` holds the adversarial image of every point the attack fooled and the clean image
    of every other point; ``robust`` [N] is True where the model still predicts the true label
    (False as well for points that were already misclassified, or excluded, on entry).
    """

    x_adv: tf.Tensor
    robust: tf.Tensor


def as_seed(seed: Seed) -> tf.Tensor:
    """A shape-[2] int64 stateless seed."""
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    if seed.shape != (2,):
        raise ConfigError(f"an attack seed must have shape [2], got {seed.shape}")
    return seed


def fold_seed(seed: tf.Tensor, *values: int) -> tf.Tensor:
    """``seed`` folded with each of ``values``: independent streams per stage, restart, chunk."""
    for value in values:
        seed = tf.random.experimental.stateless_fold_in(seed, value)
    return seed


def check_inputs(eps: float, bounds: Bounds, batch_size: int) -> tuple[float, Bounds]:
    """Validates the settings every attack shares; returns them as floats."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise ConfigError(f"attack bounds must satisfy lo < hi, got {bounds}")
    if not eps > 0:
        raise ConfigError(f"attack eps must be > 0, got {eps}")
    if batch_size < 1:
        raise ConfigError(f"attack batch_size must be >= 1, got {batch_size}")
    return float(eps), (lo, hi)


def logits_in_chunks(model_fn: ModelFn, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model_fn`` on ``x`` chunk by chunk (one compiled forward pass per model)."""
    forward = compiled_for(model_fn, ("strong_attacks.logits",), lambda model_fn, x: model_fn(x))
    chunks = [forward(tf.constant(x[start:start + batch_size])).numpy()
              for start in range(0, len(x), batch_size)]
    return np.concatenate(chunks, axis=0)


def start_state(
    model_fn: ModelFn, x: ArrayLike, labels: ArrayLike, robust: Optional[ArrayLike],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], np.ndarray]:
    """(x, labels, clean logits, robust) as numpy; ``robust`` defaults to correctly classified.

    A caller's ``robust`` mask is intersected with clean correctness, so a point the model
    already gets wrong is never attacked; only the points it lets through are sent to the model
    (their logits are filled in, the others' rows are zero). The logits are None when no point
    is left to attack.
    """
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != x.shape[:1]:
        raise ConfigError(f"labels shape {labels.shape} does not match {len(x)} images")
    candidates = np.ones(len(x), bool) if robust is None else np.asarray(robust, bool)
    picked = np.flatnonzero(candidates)
    correct = np.zeros(len(x), bool)
    if not picked.size:
        return x, labels, None, correct
    picked_logits = logits_in_chunks(model_fn, x[picked], batch_size)
    logits = np.zeros((len(x), picked_logits.shape[1]), np.float32)
    logits[picked] = picked_logits
    correct[picked] = picked_logits.argmax(axis=1) == labels[picked]
    return x, labels, logits, correct


def run_on_robust(
    chunk_fn: ChunkFn,
    x: np.ndarray,
    labels: np.ndarray,
    x_adv: np.ndarray,
    robust: np.ndarray,
    batch_size: int,
    seed: tf.Tensor,
    extra: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``chunk_fn`` on the points where ``robust`` holds, at most ``batch_size`` at a time.

    Returns:
      Updated copies of (x_adv, robust): fooled points get the chunk's image and robust False.
    """
    x_adv, robust = x_adv.copy(), robust.copy()
    todo = np.flatnonzero(robust)
    for chunk, start in enumerate(range(0, len(todo), batch_size)):
        picked = todo[start:start + batch_size]
        args = [tf.constant(x[picked]), tf.constant(labels[picked])]
        if extra is not None:
            args.append(tf.constant(extra[picked]))
        images, fooled = chunk_fn(*args, fold_seed(seed, chunk))
        fooled = fooled.numpy()
        x_adv[picked[fooled]] = images.numpy()[fooled]
        robust[picked[fooled]] = False
    return x_adv, robust


def run_restarts(
    chunk_for: Callable[[int], ChunkFn],
    x: np.ndarray,
    labels: np.ndarray,
    robust: np.ndarray,
    batch_size: int,
    seed: Seed,
    n_restarts: int,
    targets: Optional[np.ndarray] = None,
) -> AttackResult:
    """``n_restarts`` runs of ``chunk_for(restart)`` on the points still robust, for each
    target column of ``targets`` (int [N, T]) in turn when given; a run is seeded by
    ``fold_seed(seed, restart)``, or ``fold_seed(seed, target, restart)`` with targets."""
    seed, x_adv = as_seed(seed), x.copy()
    for target in range(targets.shape[1]) if targets is not None else (None,):
        for restart in range(n_restarts):
            path = (restart,) if target is None else (target, restart)
            extra = None if target is None else np.ascontiguousarray(targets[:, target])
            x_adv, robust = run_on_robust(chunk_for(restart), x, labels, x_adv, robust,
                                          batch_size, fold_seed(seed, *path), extra=extra)
    return result(x_adv, robust)


def fooled_flags(model_fn: ModelFn, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """In-graph final check: the model's prediction on ``images`` differs from ``labels``."""
    predicted = tf.argmax(model_fn(images), axis=1, output_type=tf.int32)
    return tf.not_equal(predicted, tf.cast(labels, tf.int32))


def result(x_adv: np.ndarray, robust: np.ndarray) -> AttackResult:
    return AttackResult(tf.constant(x_adv), tf.constant(robust))
