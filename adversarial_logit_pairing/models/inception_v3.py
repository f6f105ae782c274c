"""Inception v3 numerically equal to TF-Slim's ``nets.inception_v3`` (Szegedy et al., 2015).

Google's adversarially trained Inception v3 checkpoints (``adv_inception_v3``,
``ens3_adv_inception_v3``, ``ens4_adv_inception_v3``) are TF-Slim checkpoints, so this module
rebuilds that network op for op with the same variable names, in the same creation order.
``LAYOUT`` below is the network's figure: the stem, then the Mixed blocks as tuples of
branches, with Slim's names (end points) for every stage.

Slim's conventions kept on purpose:
  - every conv is conv (no biases) -> batch norm (center, NO gamma, decay 0.9997, epsilon
    0.001) -> ReLU, except the two classifier convs (biases, no batch norm, no activation);
  - the stem and the stride-2 reductions use VALID padding, the Mixed blocks' stride-1 ops
    SAME; the Branch_3 3x3 average pools do not count padded cells (``layers.average_pool``);
  - naming traps the checkpoints carry: ``Mixed_5c/Branch_1`` holds ``Conv2d_0b_1x1`` and
    ``Conv_1_0c_5x5`` (not ``Conv2d_0a_1x1`` / ``Conv2d_0b_5x5`` as in 5b and 5d), Mixed_6a's
    3x3 stride-2 convs are named ``Conv2d_1a_1x1``, and Mixed_7b's Branch_1 3x1 conv is
    ``Conv2d_0b_3x1`` where Mixed_7c's is ``Conv2d_0c_3x1``;
  - the heads shrink their kernels to small feature maps: the Logits pool is
    ``min(8, map)`` (VALID, stride 2) and the AuxLogits conv ``min(5, map)``, which changes
    a VARIABLE name (``AuxLogits/Conv2d_2a_5x5`` at 299, ``Conv2d_2a_3x3`` at 224). The model
    therefore fixes its aux kernel from an ``image_size`` at construction.
  - dropout (keep 0.8) before the Logits conv in training only; 1001 classes, 0 = background.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models.layers import (
    Conv2D,
    ConvBatchNormReLU,
    ImageClassifier,
    Initializer,
    Kernel,
    Layer,
    VariableFactory,
    average_pool,
    truncated_normal,
)

if TYPE_CHECKING:
    from adversarial_logit_pairing.models import ModelConfig

# inception_v3_arg_scope's batch norm.
BATCH_NORM_DECAY = 0.9997
BATCH_NORM_EPSILON = 0.001
DROPOUT_KEEP_PROB = 0.8
# Kernels of the heads before Slim shrinks them to the feature map.
LOGITS_POOL = 8
AUX_POOL, AUX_POOL_STRIDE, AUX_CONV = 5, 3, 5
MAX_IMAGE_SIZE_SEARCHED = 2048


@dataclasses.dataclass(frozen=True)
class Conv:
    """A conv + batch norm + ReLU unit (Slim ``conv2d`` under inception_v3_arg_scope)."""

    name: str
    depth: int
    kernel: Kernel
    stride: int = 1
    padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class Pool:
    """A max or average pool (no variables)."""

    name: str
    kind: str  # 'max' | 'avg'
    kernel: int = 3
    stride: int = 1
    padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class Fork:
    """Two convs on the same input, concatenated: Mixed_7b/7c's expanded 1x3 + 3x1."""

    convs: tuple[Conv, Conv]


@dataclasses.dataclass(frozen=True)
class Mixed:
    """An Inception block: branches ``Branch_0..`` run side by side, concatenated on depth."""

    name: str
    branches: tuple[tuple[Union[Conv, Pool, Fork], ...], ...]


# The Branch_3 pool of every Mixed block but the reductions: 3x3, stride 1, SAME,
# excluding padded cells from the average.
AVG_POOL = Pool("AvgPool_0a_3x3", "avg")
# Branch_2 of the two grid reductions (Mixed_6a, Mixed_7a).
REDUCTION_POOL = Pool("MaxPool_1a_3x3", "max", stride=2, padding="VALID")


def _mixed_5x5(name: str, pool_depth: int,
               branch_1: tuple[str, str] = ("Conv2d_0a_1x1", "Conv2d_0b_5x5")) -> Mixed:
    """Mixed_5b..5d: a 5x5 and a double 3x3 branch; ``branch_1`` names its two convs."""
    return Mixed(name, (
        (Conv("Conv2d_0a_1x1", 64, 1),),
        (Conv(branch_1[0], 48, 1), Conv(branch_1[1], 64, 5)),
        (Conv("Conv2d_0a_1x1", 64, 1), Conv("Conv2d_0b_3x3", 96, 3),
         Conv("Conv2d_0c_3x3", 96, 3)),
        (AVG_POOL, Conv("Conv2d_0b_1x1", pool_depth, 1)),
    ))


def _mixed_7x7(name: str, depth: int) -> Mixed:
    """Mixed_6b..6e: 7x7 convs factorised into 1x7 and 7x1, inner depth ``depth``."""
    return Mixed(name, (
        (Conv("Conv2d_0a_1x1", 192, 1),),
        (Conv("Conv2d_0a_1x1", depth, 1), Conv("Conv2d_0b_1x7", depth, (1, 7)),
         Conv("Conv2d_0c_7x1", 192, (7, 1))),
        (Conv("Conv2d_0a_1x1", depth, 1), Conv("Conv2d_0b_7x1", depth, (7, 1)),
         Conv("Conv2d_0c_1x7", depth, (1, 7)), Conv("Conv2d_0d_7x1", depth, (7, 1)),
         Conv("Conv2d_0e_1x7", 192, (1, 7))),
        (AVG_POOL, Conv("Conv2d_0b_1x1", 192, 1)),
    ))


def _mixed_expanded(name: str, branch_1_3x1: str) -> Mixed:
    """Mixed_7b/7c: expanded filter banks. Only Branch_1's 3x1 conv name differs (a trap)."""
    return Mixed(name, (
        (Conv("Conv2d_0a_1x1", 320, 1),),
        (Conv("Conv2d_0a_1x1", 384, 1),
         Fork((Conv("Conv2d_0b_1x3", 384, (1, 3)), Conv(branch_1_3x1, 384, (3, 1))))),
        (Conv("Conv2d_0a_1x1", 448, 1), Conv("Conv2d_0b_3x3", 384, 3),
         Fork((Conv("Conv2d_0c_1x3", 384, (1, 3)), Conv("Conv2d_0d_3x1", 384, (3, 1))))),
        (AVG_POOL, Conv("Conv2d_0b_1x1", 192, 1)),
    ))


# Feature map sides at 299x299 in the comments.
LAYOUT: tuple[Union[Conv, Pool, Mixed], ...] = (
    Conv("Conv2d_1a_3x3", 32, 3, stride=2, padding="VALID"),  # 149 x 149 x 32
    Conv("Conv2d_2a_3x3", 32, 3, padding="VALID"),  # 147 x 147 x 32
    Conv("Conv2d_2b_3x3", 64, 3),  # 147 x 147 x 64
    Pool("MaxPool_3a_3x3", "max", stride=2, padding="VALID"),  # 73 x 73 x 64
    Conv("Conv2d_3b_1x1", 80, 1, padding="VALID"),  # 73 x 73 x 80
    Conv("Conv2d_4a_3x3", 192, 3, padding="VALID"),  # 71 x 71 x 192
    Pool("MaxPool_5a_3x3", "max", stride=2, padding="VALID"),  # 35 x 35 x 192
    _mixed_5x5("Mixed_5b", 32),  # 35 x 35 x 256
    # The released checkpoints carry these two names (not 0a_1x1 / 0b_5x5).
    _mixed_5x5("Mixed_5c", 64, ("Conv2d_0b_1x1", "Conv_1_0c_5x5")),  # 35 x 35 x 288
    _mixed_5x5("Mixed_5d", 64),  # 35 x 35 x 288
    Mixed("Mixed_6a", (  # 17 x 17 x 768
        # 3x3 stride-2 convs named '1x1' in the checkpoints.
        (Conv("Conv2d_1a_1x1", 384, 3, stride=2, padding="VALID"),),
        (Conv("Conv2d_0a_1x1", 64, 1), Conv("Conv2d_0b_3x3", 96, 3),
         Conv("Conv2d_1a_1x1", 96, 3, stride=2, padding="VALID")),
        (REDUCTION_POOL,),
    )),
    _mixed_7x7("Mixed_6b", 128),  # 17 x 17 x 768
    _mixed_7x7("Mixed_6c", 160),
    _mixed_7x7("Mixed_6d", 160),
    _mixed_7x7("Mixed_6e", 192),  # AuxLogits branch off here
    Mixed("Mixed_7a", (  # 8 x 8 x 1280
        (Conv("Conv2d_0a_1x1", 192, 1),
         Conv("Conv2d_1a_3x3", 320, 3, stride=2, padding="VALID")),
        (Conv("Conv2d_0a_1x1", 192, 1), Conv("Conv2d_0b_1x7", 192, (1, 7)),
         Conv("Conv2d_0c_7x1", 192, (7, 1)),
         Conv("Conv2d_1a_3x3", 192, 3, stride=2, padding="VALID")),
        (REDUCTION_POOL,),
    )),
    _mixed_expanded("Mixed_7b", "Conv2d_0b_3x1"),  # 8 x 8 x 2048
    _mixed_expanded("Mixed_7c", "Conv2d_0c_3x1"),  # 8 x 8 x 2048
)
AUX_SOURCE = "Mixed_6e"

Op = Callable[[tf.Tensor, bool], tf.Tensor]


# --- Feature map sizes: which images the network takes ------------------------------------

def _side_after(spec: Union[Conv, Pool], side: int) -> int:
    kernel = spec.kernel if isinstance(spec.kernel, int) else max(spec.kernel)
    if spec.padding == "SAME":
        return -(-side // spec.stride)
    return (side - kernel) // spec.stride + 1 if side >= kernel else 0


def feature_map_sides(image_side: int) -> dict[str, int]:
    """End point -> side of its feature map for an image side (0 once the image is too small).

    Only the VALID and strided ops change the side, and the non-square kernels all sit in
    SAME stride-1 convs, so one function serves the height and the width.
    """
    sides, side = {}, image_side
    for spec in LAYOUT:
        ops = spec.branches[0] if isinstance(spec, Mixed) else (spec,)
        for op in ops:  # the branches of a block agree on the output size
            side = _side_after(op, side) if side > 0 else 0
        sides[spec.name] = side
    return sides


def _head_sides(image_side: int) -> tuple[int, int]:
    """(map side under the Logits pool, map side under the AuxLogits conv); 0 if none."""
    sides = feature_map_sides(image_side)
    final, aux_source = sides[LAYOUT[-1].name], sides[AUX_SOURCE]
    aux = (aux_source - AUX_POOL) // AUX_POOL_STRIDE + 1 if aux_source >= AUX_POOL else 0
    return final, aux


def _takes(image_side: int, with_aux: bool) -> bool:
    """Whether Slim's heads reduce this side to exactly one cell (its squeeze succeeds)."""
    final, aux = _head_sides(image_side)
    # Logits: VALID pool of min(8, final) cells with Slim's default stride 2.
    if final < 1 or (final - min(LOGITS_POOL, final)) // 2 + 1 != 1:
        return False
    return not with_aux or 1 <= aux <= AUX_CONV


@functools.cache
def image_size_range(with_aux: bool) -> tuple[int, int]:
    """(smallest, largest) image side the network takes; with AuxLogits or without.

    75 to 362 for the Logits alone (a final map of 1 to 9 cells: the 8x8 stride-2 pool must
    leave one cell), 107 to 346 with the AuxLogits (Mixed_6e must hold a 5x5 pool window,
    and the pooled map at most 5 cells for the 5x5 conv); Slim fails outside these ranges.
    """
    sides = [s for s in range(1, MAX_IMAGE_SIZE_SEARCHED) if _takes(s, with_aux)]
    return sides[0], sides[-1]


def aux_kernel_size(image_side: int) -> int:
    """Side of the AuxLogits ``Conv2d_2a_{k}x{k}`` kernel Slim builds for this image side."""
    return min(AUX_CONV, _head_sides(image_side)[1])


def check_image_size(height: Optional[int], width: Optional[int], with_aux: bool) -> None:
    """Raises ConfigError naming the size and the supported range if the network can't take it.

    Unknown (None) sides pass, as in Slim, which then assumes full-size kernels.
    """
    low, high = image_size_range(with_aux)
    for side in (height, width):
        if side is not None and not low <= side <= high:
            what = "InceptionV3 with AuxLogits" if with_aux else "InceptionV3"
            raise ConfigError(
                f"{what} takes images of {low}x{low} to {high}x{high} pixels, got "
                f"{height}x{width}: smaller ones shrink a feature map to nothing, larger "
                f"ones leave more than one cell under the classifier"
            )


# --- The network ---------------------------------------------------------------------------

class _PoolOp:
    def __init__(self, spec: Pool):
        self.spec = spec

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        del is_training
        spec = self.spec
        if spec.kind == "max":
            return tf.nn.max_pool2d(x, spec.kernel, spec.stride, spec.padding)
        return average_pool(x, spec.kernel, spec.stride, spec.padding)


class _ForkOp(tf.Module):
    # A tf.Module so that ``model.submodules`` reaches its two units.
    def __init__(self, left: ConvBatchNormReLU, right: ConvBatchNormReLU):
        super().__init__()
        self.left, self.right = left, right

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        return tf.concat([self.left(x, is_training), self.right(x, is_training)], axis=3)


class MixedBlock(Layer):
    """A ``Mixed`` spec's branches under ``<scope>/Branch_<i>``, created in Slim's order."""

    def __init__(self, scope: str, spec: Mixed, in_channels: int, factory: VariableFactory):
        super().__init__(scope)
        self.branches: list[list[Op]] = []
        self.out_channels = 0
        for index, branch in enumerate(spec.branches):
            ops, channels = [], in_channels
            for op in branch:
                if isinstance(op, Pool):
                    ops.append(_PoolOp(op))
                    continue
                convs = op.convs if isinstance(op, Fork) else (op,)
                units = [_conv_unit(f"{scope}/Branch_{index}/{conv.name}", conv, channels,
                                    factory) for conv in convs]
                self._adopt(*units)
                ops.append(_ForkOp(*units) if isinstance(op, Fork) else units[0])
                channels = sum(unit.out_channels for unit in units)
            self.branches.append(ops)
            self.out_channels += channels

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        outputs = []
        for ops in self.branches:
            y = x
            for op in ops:
                y = op(y, is_training)
            outputs.append(y)
        return tf.concat(outputs, axis=3)


def _conv_unit(scope: str, spec: Conv, in_channels: int, factory: VariableFactory,
               initializer: Optional[Initializer] = None) -> ConvBatchNormReLU:
    conv = Conv2D(scope, in_channels, spec.depth, spec.kernel, factory, stride=spec.stride,
                  padding=spec.padding, initializer=initializer)
    return ConvBatchNormReLU(conv, factory, decay=BATCH_NORM_DECAY, epsilon=BATCH_NORM_EPSILON,
                             scale=False)


class InceptionV3(ImageClassifier):
    """TF-Slim's ``inception_v3`` with its AuxLogits head; variables under ``<scope>/``.

    ``model(images, is_training)`` returns the main logits and runs only the path to them
    (so it takes any image side in ``image_size_range(False)``); ``logits_and_aux`` also
    returns the AuxLogits that the Inception training loss adds (weight 0.4), and
    ``end_points`` returns every stage by its Slim name. The AuxLogits' moving statistics
    move only in calls that compute the AuxLogits, as in Slim without ``create_aux_logits``.

    Attributes:
      image_size: the image side the AuxLogits conv kernel was fixed for (the variable name
        ``AuxLogits/Conv2d_2a_{k}x{k}`` depends on it, see ``aux_kernel_size``).
      dropout_keep_prob: keep probability of the dropout before the Logits conv in training
        (Slim's 0.8); read when a call is traced, so set it before wrapping in tf.function.
    """

    def __init__(
        self,
        scope: str,
        num_classes: int,
        config: ModelConfig,
        seed: Optional[int] = None,
        compute_dtype: tf.DType = tf.float32,
        image_size: Optional[int] = None,
        dropout_keep_prob: float = DROPOUT_KEEP_PROB,
    ):
        super().__init__(scope, num_classes, config, compute_dtype)
        self.image_size = int(image_size or config.default_image_size)
        check_image_size(self.image_size, self.image_size, with_aux=True)
        self.dropout_keep_prob = dropout_keep_prob
        factory = VariableFactory(seed)
        self.stages: list[tuple[str, Op]] = []
        channels_at: dict[str, int] = {}
        channels = 3
        for spec in LAYOUT:
            stage_scope = f"{scope}/{spec.name}"
            if isinstance(spec, Pool):
                self.stages.append((spec.name, _PoolOp(spec)))
                continue
            if isinstance(spec, Mixed):
                layer = MixedBlock(stage_scope, spec, channels, factory)
            else:
                layer = _conv_unit(stage_scope, spec, channels, factory)
            self.stages.append((spec.name, self._track(layer)))
            channels = channels_at[spec.name] = layer.out_channels

        # AuxLogits (created before Logits, as in Slim): 5x5/3 VALID avg pool -> 1x1 conv ->
        # k x k VALID conv (k shrinks to the map, and so does the variable name) -> classes.
        aux = f"{scope}/AuxLogits"
        self.aux_kernel = k = aux_kernel_size(self.image_size)
        self.aux_conv = self._track(_conv_unit(
            f"{aux}/Conv2d_1b_1x1", Conv("Conv2d_1b_1x1", 128, 1), channels_at[AUX_SOURCE],
            factory))
        self.aux_reduce = self._track(_conv_unit(
            f"{aux}/Conv2d_2a_{k}x{k}", Conv(f"Conv2d_2a_{k}x{k}", 768, k, padding="VALID"),
            128, factory, initializer=truncated_normal(factory, 0.01)))
        self.aux_logits = self._track(Conv2D(
            f"{aux}/Conv2d_2b_1x1", 768, num_classes, 1, factory, use_bias=True,
            initializer=truncated_normal(factory, 0.001)))
        self.logits = self._track(Conv2D(
            f"{scope}/Logits/Conv2d_1c_1x1", channels, num_classes, 1, factory,
            use_bias=True))

    def end_points(self, images: tf.Tensor, is_training: bool,
                   include_aux: bool = True) -> dict[str, tf.Tensor]:
        """Every stage by its Slim end-point name, for images [batch, height, width, 3].

        Keys: the ``LAYOUT`` names ('Conv2d_1a_3x3' .. 'Mixed_7c', compute dtype), then
        'AuxLogits' (with ``include_aux``), 'PreLogits' (pooled, after dropout; [N, 1, 1,
        2048]) and 'Logits' ([N, num_classes]), all three float32.

        Raises:
          ConfigError: for an image size the network (or its AuxLogits) cannot take, or
            whose AuxLogits kernel differs from the one this model was built for.
        """
        net = self.normalize_inputs(images)
        height, width = net.shape[1], net.shape[2]
        check_image_size(height, width, include_aux)
        if include_aux:
            self._check_aux_kernel(height, width)
        points: dict[str, tf.Tensor] = {}
        for name, stage in self.stages:
            net = stage(net, is_training)
            points[name] = net
        if include_aux:
            points["AuxLogits"] = self._aux_logits(points[AUX_SOURCE], is_training)
        # Pool and classify in float32 whatever the compute dtype (as ResNet v2 does).
        net = tf.cast(net, tf.float32)
        kernel = [LOGITS_POOL if side is None else min(LOGITS_POOL, side)
                  for side in net.shape[1:3]]
        net = average_pool(net, kernel, 2, "VALID")  # Slim's avg_pool2d default stride
        if is_training and self.dropout_keep_prob < 1.0:
            net = tf.nn.dropout(net, rate=1.0 - self.dropout_keep_prob)
        points["PreLogits"] = net
        points["Logits"] = tf.squeeze(self.logits(net), axis=[1, 2])
        return points

    def _check_aux_kernel(self, height: Optional[int], width: Optional[int]) -> None:
        needed = [self.aux_kernel if side is None else aux_kernel_size(side)
                  for side in (height, width)]
        if needed != [self.aux_kernel] * 2:
            raise ConfigError(
                f"images of {height}x{width} need the AuxLogits conv "
                f"Conv2d_2a_{needed[0]}x{needed[1]}, but this model was built for "
                f"{self.image_size}x{self.image_size} images (Conv2d_2a_{self.aux_kernel}x"
                f"{self.aux_kernel}); build it with image_size={height}"
            )

    def _aux_logits(self, net: tf.Tensor, is_training: bool) -> tf.Tensor:
        net = average_pool(tf.cast(net, tf.float32), AUX_POOL, AUX_POOL_STRIDE, "VALID")
        net = self.aux_reduce(self.aux_conv(net, is_training), is_training)
        return tf.squeeze(self.aux_logits(net), axis=[1, 2])

    def logits_and_aux(self, images: tf.Tensor,
                       is_training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        """(Logits, AuxLogits), both [batch, num_classes] float32; see ``end_points``."""
        points = self.end_points(images, is_training, include_aux=True)
        return points["Logits"], points["AuxLogits"]

    def __call__(self, images: tf.Tensor, is_training: bool) -> tf.Tensor:
        """Logits [batch, num_classes] (float32); the AuxLogits head is not run."""
        return self.end_points(images, is_training, include_aux=False)["Logits"]


def build(config: ModelConfig, num_classes: int, seed: Optional[int] = None,
          compute_dtype: tf.DType = tf.float32,
          image_size: Optional[int] = None) -> InceptionV3:
    """Registry builder: Inception v3 under ``config.scope``.

    ``image_size`` (default ``config.default_image_size``, 299) fixes the AuxLogits conv
    kernel and hence its variable name; the main logits take any size in
    ``image_size_range(False)`` either way.
    """
    return InceptionV3(config.scope, num_classes, config, seed, compute_dtype,
                       image_size=image_size)
