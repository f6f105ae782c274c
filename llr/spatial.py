"""The challenge's spatial attacks: a grid of rotations and translations, and one random one.

From "A Rotation and a Translation Suffice" (Engstrom et al. 2018) as the Unrestricted
Adversarial Examples challenge ran it on bird-or-bicycle: the image is first shrunk inside a
black border (15% of each side), then every combination of dx, dy in ``linspace(-18, 18, 5)``
pixels and an angle in ``linspace(-30, 30, 31)`` degrees (5 x 5 x 31 = 775 transforms) is
tried, and per image the transform with the largest ``wrong logit - correct logit`` is kept
(the first one on ties). Rotation is about the image centre (positive = counter-clockwise on
screen), then translation (positive dx right, dy down); bilinear sampling, black outside.

The challenge's code unpacked its grid tuples in the wrong order (angles took the dx values
and the dy took the angles, and the dy count reused the dx count); the grid here is the one
the challenge describes. It also rounded images to uint8 around the PIL transform; here they
stay float.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack

SPATIAL_LIMITS = (18.0, 18.0, 30.0)  # dx and dy in pixels, angle in degrees
GRID_GRANULARITY = (5, 5, 31)
BLACK_BORDER_FRACTION = 0.15

ModelFn = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass
class GridAttackResult:
    """Worst images [N,H,W,C], their transforms [N,3] (dx, dy, angle) and margin losses [N]."""

    images: tf.Tensor
    transforms: np.ndarray
    losses: np.ndarray


def grid(limits=SPATIAL_LIMITS, granularity=GRID_GRANULARITY) -> np.ndarray:
    """All (dx, dy, angle) of the grid [T, 3], dx slowest and angle fastest."""
    axes = [np.linspace(-float(limit), float(limit), int(count))
            for limit, count in zip(limits, granularity)]
    return np.asarray(list(itertools.product(*axes)), np.float32).reshape(-1, 3)


def add_black_border(images: tf.Tensor, fraction: float) -> tf.Tensor:
    """Shrinks each image and pads it with ``int(fraction * side)`` black pixels per edge.

    A rotated or shifted image then stays (mostly) inside the frame.
    """
    if fraction <= 0:
        return images
    height, width = int(images.shape[1]), int(images.shape[2])
    border_h, border_w = int(height * fraction), int(width * fraction)
    inner = tf.image.resize(images, [height - 2 * border_h, width - 2 * border_w],
                            method="bilinear", antialias=True)
    return tf.pad(inner, [[0, 0], [border_h, border_h], [border_w, border_w], [0, 0]])


def transform_matrices(transforms: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Projective matrices [N, 8] mapping output pixels to input pixels for (dx, dy, angle)."""
    transforms = tf.cast(tf.convert_to_tensor(transforms), tf.float32)
    dx, dy, angle = tf.unstack(transforms, axis=1)
    theta = angle * (np.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # input = R(-angle) (output - centre - shift) + centre; y points down, so a visual
    # counter-clockwise rotation by theta has the inverse [[cos, -sin], [sin, cos]].
    sx, sy = cx + dx, cy + dy
    zeros = tf.zeros_like(cos)
    return tf.stack([cos, -sin, cx - cos * sx + sin * sy,
                     sin, cos, cy - sin * sx - cos * sy,
                     zeros, zeros], axis=1)


def transform_images(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Rotates then translates each image by its (dx, dy, angle) row of ``transforms`` [N, 3].

    A single transform [3] applies to every image.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    transforms = tf.cast(tf.convert_to_tensor(transforms), tf.float32)
    if transforms.shape.rank == 1:
        transforms = tf.tile(transforms[None], [tf.shape(images)[0], 1])
    height, width = images.shape[1], images.shape[2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transform_matrices(transforms, height, width),
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def margin_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Best wrong logit minus the correct logit [N]; > 0 means misclassified."""
    labels = tf.cast(labels, tf.int32)
    one_hot = tf.equal(tf.range(tf.shape(logits)[-1])[None, :], labels[:, None])
    correct = tf.reduce_sum(tf.where(one_hot, logits, tf.zeros_like(logits)), axis=-1)
    wrong = tf.reduce_max(tf.where(one_hot, tf.fill(tf.shape(logits), -np.inf), logits), axis=-1)
    return wrong - correct


def grid_attack(
    model_fn: ModelFn,
    images: tf.Tensor,
    labels: tf.Tensor,
    *,
    limits=SPATIAL_LIMITS,
    granularity=GRID_GRANULARITY,
    black_border: float = BLACK_BORDER_FRACTION,
    on_transform: Optional[Callable[[int, int], None]] = None,
) -> GridAttackResult:
    """Per image, the grid transform that maximises ``wrong logit - correct logit``.

    Args:
      model_fn: images [N,H,W,C] in [0,1] -> logits [N, K].
      images: clean images [N,H,W,C] in [0, 1] (static height and width).
      labels: true classes [N].
      limits: (dx px, dy px, angle degrees) maxima of the grid.
      granularity: number of values of dx, dy and angle.
      black_border: fraction of each side turned into a black border first (0: none).
      on_transform: called as ``on_transform(done, total)`` after each transform, for progress.

    Returns:
      A :class:`GridAttackResult`.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    labels = tf.convert_to_tensor(labels)
    bordered = add_black_border(images, black_border)
    transforms = grid(limits, granularity)

    step = _grid_step(model_fn)
    n = tf.shape(images)[0]
    best_images = images
    best_loss = tf.fill([n], tf.constant(-np.inf, tf.float32))
    best_index = tf.zeros([n], tf.int32)
    for index, transform in enumerate(transforms):
        best_images, best_loss, best_index = step(
            bordered, labels, tf.constant(transform), best_images, best_loss, best_index,
            tf.constant(index, tf.int32))
        if on_transform is not None:
            on_transform(index + 1, len(transforms))
    return GridAttackResult(best_images, transforms[best_index.numpy()], best_loss.numpy())


def _grid_step(model_fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable:
    """The compiled 'try one transform, keep the worse case per image' step for ``model_fn``.

    Cached per model function with the attacks' compiled functions, so batch after batch
    reuses it (traced once per input shape) instead of tracing the model again.
    """
    return adversarial_attack.compiled_for(model_fn, ("spatial_grid_step",), _try_transform)


def _try_transform(model_fn, bordered, labels, transform, best_images, best_loss, best_index,
                   index):
    # The model arrives as an argument: the cached step must not hold it (see compiled_for).
    candidate = transform_images(bordered, transform)
    loss = margin_loss(model_fn(candidate), labels)
    better = loss > best_loss
    return (tf.where(better[:, None, None, None], candidate, best_images),
            tf.where(better, loss, best_loss),
            tf.where(better, index, best_index))


def random_transforms(n: int, limits=SPATIAL_LIMITS, seed=(0, 0)) -> tf.Tensor:
    """Uniform (dx, dy, angle) [n, 3] within ``limits`` (stateless: same seed, same draw)."""
    limits = tf.constant(limits, tf.float32)
    unit = tf.random.stateless_uniform([n, 3], seed=seed, minval=-1.0, maxval=1.0)
    return unit * limits


def random_spatial(images: tf.Tensor, limits=SPATIAL_LIMITS, black_border: float = 0.0,
                   seed=(0, 0)) -> tf.Tensor:
    """One random rotation and translation per image (the challenge's SPSA starts from it)."""
    images = tf.convert_to_tensor(images, tf.float32)
    transforms = random_transforms(int(images.shape[0]), limits, seed)
    return transform_images(add_black_border(images, black_border), transforms)
