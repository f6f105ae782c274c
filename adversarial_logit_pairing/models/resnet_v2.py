"""Pre-activation ResNets (ResNet v2) numerically equal to TF-Slim's ``nets.resnet_v2``.

The released ALP checkpoints are TF-Slim ``resnet_v2_50`` checkpoints, so this module rebuilds
that network op for op (Keras' ResNet50V2 differs: pool padding, epsilon, dense head) with
the same variable names. The variants differ only by their row in ``SPECS``:

  root: 7x7/2 conv with biases, no BN ('conv1'), 3x3/2 max-pool (SAME).
  blocks: bottleneck units; the stride of a block sits in its LAST unit (Slim's convention).
  head: 'postnorm' BN + ReLU, global mean pool, 'logits' 1x1 conv with biases.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional

import tensorflow as tf

from adversarial_logit_pairing.models.layers import (
    BatchNorm,
    Conv2D,
    ImageClassifier,
    Layer,
    VariableFactory,
)

if TYPE_CHECKING:
    from adversarial_logit_pairing.models import ModelConfig

# Slim's ``resnet_utils.conv2d_same`` padding, ``weights``/``biases`` names.
_conv = functools.partial(Conv2D, padding="SLIM_SAME")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block: ``num_units`` bottlenecks of output depth ``4 * base_depth``."""

    base_depth: int  # the bottleneck (conv1/conv2) depth
    num_units: int
    stride: int  # applied by the block's last unit


@dataclasses.dataclass(frozen=True)
class ResNetV2Spec:
    root_depth: int
    blocks: tuple[BlockSpec, ...]


def _slim_blocks(*units_per_block: int) -> tuple[BlockSpec, ...]:
    """Slim's four ImageNet blocks (bottleneck depths 64..512, strides 2, 2, 2, 1)."""
    return tuple(
        BlockSpec(base_depth, units, stride)
        for base_depth, units, stride in zip((64, 128, 256, 512), units_per_block, (2, 2, 2, 1))
    )


SPECS: dict[str, ResNetV2Spec] = {
    "resnet_v2_50": ResNetV2Spec(64, _slim_blocks(3, 4, 6, 3)),
    "resnet_v2_101": ResNetV2Spec(64, _slim_blocks(3, 4, 23, 3)),
    "resnet_v2_152": ResNetV2Spec(64, _slim_blocks(3, 8, 36, 3)),
    "resnet_v2_200": ResNetV2Spec(64, _slim_blocks(3, 24, 36, 3)),
    # Not in Slim: a small network through the same code for CPU demos and tests.
    "resnet_v2_tiny": ResNetV2Spec(
        16, (BlockSpec(8, 1, 2), BlockSpec(16, 1, 2), BlockSpec(32, 1, 1))
    ),
}


class Bottleneck(Layer):
    """Slim ``resnet_v2.bottleneck``: preact BN+ReLU, 1x1 -> 3x3 (strided) -> 1x1, plus shortcut.

    The shortcut is a 1x1 conv (with biases, no BN) of the pre-activation when the depth
    changes, otherwise the unit's raw input subsampled by a 1x1 max-pool of the unit's stride.
    """

    def __init__(
        self,
        scope: str,
        in_depth: int,
        depth: int,
        base_depth: int,
        stride: int,
        factory: VariableFactory,
    ):
        super().__init__(scope)
        self.stride = stride
        self.preact = BatchNorm(f"{scope}/preact", in_depth, factory)
        self.shortcut = None
        if depth != in_depth:
            self.shortcut = _conv(
                f"{scope}/shortcut", in_depth, depth, 1, factory, stride=stride, use_bias=True
            )
        self.conv1 = _conv(f"{scope}/conv1", in_depth, base_depth, 1, factory)
        self.bn1 = BatchNorm(f"{scope}/conv1/BatchNorm", base_depth, factory)
        self.conv2 = _conv(f"{scope}/conv2", base_depth, base_depth, 3, factory, stride=stride)
        self.bn2 = BatchNorm(f"{scope}/conv2/BatchNorm", base_depth, factory)
        self.conv3 = _conv(f"{scope}/conv3", base_depth, depth, 1, factory, use_bias=True)
        self._adopt(self.preact, self.shortcut, self.conv1, self.bn1, self.conv2, self.bn2,
                    self.conv3)

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        preact = tf.nn.relu(self.preact(x, is_training))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        elif self.stride > 1:
            shortcut = tf.nn.max_pool2d(x, 1, self.stride, "SAME")
        else:
            shortcut = x
        residual = tf.nn.relu(self.bn1(self.conv1(preact), is_training))
        residual = tf.nn.relu(self.bn2(self.conv2(residual), is_training))
        residual = self.conv3(residual)
        return shortcut + residual


class ResNetV2(ImageClassifier):
    """A ResNet v2 of ``SPECS``; variables under ``<scope>/`` as in TF-Slim."""

    def __init__(
        self,
        spec: ResNetV2Spec,
        scope: str,
        num_classes: int,
        config: ModelConfig,
        seed: Optional[int] = None,
        compute_dtype: tf.DType = tf.float32,
    ):
        super().__init__(scope, num_classes, config, compute_dtype)
        factory = VariableFactory(seed)
        self.root = self._track(
            _conv(f"{scope}/conv1", 3, spec.root_depth, 7, factory, stride=2, use_bias=True)
        )
        depth = spec.root_depth
        self.units = []
        for block_index, block in enumerate(spec.blocks, start=1):
            for unit_index in range(1, block.num_units + 1):
                unit = Bottleneck(
                    f"{scope}/block{block_index}/unit_{unit_index}/bottleneck_v2",
                    in_depth=depth,
                    depth=4 * block.base_depth,
                    base_depth=block.base_depth,
                    stride=block.stride if unit_index == block.num_units else 1,
                    factory=factory,
                )
                self.units.append(self._track(unit))
                depth = 4 * block.base_depth
        self.postnorm = self._track(BatchNorm(f"{scope}/postnorm", depth, factory))
        self.logits = self._track(
            _conv(f"{scope}/logits", depth, num_classes, 1, factory, use_bias=True)
        )

    def __call__(self, images: tf.Tensor, is_training: bool) -> tf.Tensor:
        net = self.root(self.normalize_inputs(images))
        # SAME max-pooling pads with -inf (bottom/right first), unlike an explicit zero pad.
        net = tf.nn.max_pool2d(net, 3, 2, "SAME")
        for unit in self.units:
            net = unit(net, is_training)
        net = tf.nn.relu(self.postnorm(net, is_training))
        # Pool and classify in float32 whatever the compute dtype: a bfloat16 sum over 64
        # positions loses digits, and the head costs next to nothing.
        net = tf.reduce_mean(tf.cast(net, tf.float32), axis=[1, 2], keepdims=True)
        return tf.squeeze(self.logits(net), axis=[1, 2])


def build(config: ModelConfig, num_classes: int, seed: Optional[int] = None,
          compute_dtype: tf.DType = tf.float32) -> ResNetV2:
    """Registry builder: the ResNet v2 named ``config.name`` under ``config.scope``."""
    return ResNetV2(SPECS[config.name], config.scope, num_classes, config, seed, compute_dtype)
