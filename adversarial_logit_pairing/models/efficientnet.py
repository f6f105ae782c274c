"""EfficientNet B0..B8 numerically equal to tensorflow/tpu's ``efficientnet_model.py``.

The released checkpoints (standard and AdvProp) are TF1 name-based checkpoints, so the network
owns its variables under their names (``efficientnet-b0/blocks_3/depthwise_conv2d/...``) and in
the original's creation order. All nine variants come from one table:

  ``BLOCK_STRINGS``: the seven MBConv stages of B0 (repeats, kernel, stride, expansion, filters,
  squeeze-excite ratio), decoded by ``decode_block_string``;
  ``SPECS``: per variant (width, depth, dropout), scaling filters by
  ``round_filters`` and repeats by ``round_repeats``.

Layers: stem 3x3/2 conv -> BN -> swish; MBConv blocks (``MBConvBlock``); head 1x1 conv -> BN ->
swish -> global mean pool -> dropout -> dense. Every conv uses TF 'SAME' padding (size
dependent, asymmetric at stride 2); batch norm is TF1's non-fused layer with momentum 0.99 and
epsilon 1e-3. In training mode a residual block drops its branch per sample ("drop-connect")
with survival probability ``1 - drop_connect_rate * i / n`` for block ``i`` of ``n``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import TYPE_CHECKING, Optional

import tensorflow as tf

from adversarial_logit_pairing.models.layers import (
    KERAS_NAMING,
    Conv2D,
    Dense,
    DepthwiseConv2D,
    ImageClassifier,
    Layer,
    SqueezeExcite,
    UnfusedBatchNorm,
    VariableFactory,
    swish,
)

if TYPE_CHECKING:
    from adversarial_logit_pairing.models import ModelConfig

# TF1 ``tf.layers.Conv2D(padding='same')``: TF SAME padding, ``kernel``/``bias`` names.
_conv = functools.partial(Conv2D, padding="SAME", naming=KERAS_NAMING)

BATCH_NORM_DECAY = 0.99
BATCH_NORM_EPSILON = 1e-3
# tensorflow/tpu's default survival probability 0.8 of the last block.
DROP_CONNECT_RATE = 0.2
DEPTH_DIVISOR = 8

# B0's stages: r repeats, k kernel, s strides (rows, columns), e expansion, i/o filters,
# se squeeze-excite ratio of the block's input filters. Every block has an identity skip
# when its stride is 1 and its input and output filters agree.
BLOCK_STRINGS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)


@dataclasses.dataclass(frozen=True)
class StageArgs:
    """One decoded block string: ``repeats`` MBConv blocks, the first one strided."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
    """A variant's compound scaling (width, depth) and its head dropout rate; its resolution
    is the registry's (``ModelConfig.default_image_size``)."""

    width: float
    depth: float
    dropout: float


# Keyed by the TF1 scope; from tensorflow/tpu's efficientnet_builder.py.
SPECS: dict[str, EfficientNetSpec] = {
    "efficientnet-b0": EfficientNetSpec(1.0, 1.0, 0.2),
    "efficientnet-b1": EfficientNetSpec(1.0, 1.1, 0.2),
    "efficientnet-b2": EfficientNetSpec(1.1, 1.2, 0.3),
    "efficientnet-b3": EfficientNetSpec(1.2, 1.4, 0.3),
    "efficientnet-b4": EfficientNetSpec(1.4, 1.8, 0.4),
    "efficientnet-b5": EfficientNetSpec(1.6, 2.2, 0.4),
    "efficientnet-b6": EfficientNetSpec(1.8, 2.6, 0.5),
    "efficientnet-b7": EfficientNetSpec(2.0, 3.1, 0.5),
    "efficientnet-b8": EfficientNetSpec(2.2, 3.6, 0.5),
    # Not in tensorflow/tpu: a quarter-width, one-block-per-stage network through the same
    # code (7 MBConv blocks, 8..80 filters, head 320) for CPU demos and tests.
    "efficientnet-tiny": EfficientNetSpec(0.25, 0.25, 0.2),
}

_BLOCK_STRING = re.compile(
    r"r(?P<r>\d+)_k(?P<k>\d+)_s(?P<s>\d)(?P<s2>\d)_e(?P<e>\d+)_i(?P<i>\d+)_o(?P<o>\d+)"
    r"_se(?P<se>[\d.]+)"
)


def decode_block_string(block_string: str) -> StageArgs:
    """``'r2_k3_s22_e6_i16_o24_se0.25'`` -> ``StageArgs`` (square strides only).

    Raises:
      ValueError: for a string of another form or with unequal row/column strides.
    """
    match = _BLOCK_STRING.fullmatch(block_string)
    if match is None or match["s"] != match["s2"]:
        raise ValueError(f"not an EfficientNet block string: {block_string!r}")
    return StageArgs(
        repeats=int(match["r"]),
        kernel_size=int(match["k"]),
        stride=int(match["s"]),
        expand_ratio=int(match["e"]),
        input_filters=int(match["i"]),
        output_filters=int(match["o"]),
        se_ratio=float(match["se"]),
    )


def round_filters(filters: int, width: float) -> int:
    """Filters scaled by ``width``, rounded to a multiple of 8 but never down by over 10%."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Repeats scaled by ``depth``, rounded up."""
    return int(math.ceil(depth * repeats))


def drop_connect(x: tf.Tensor, survival_prob: float) -> tf.Tensor:
    """Keeps each sample's ``x`` with probability ``survival_prob`` (then scaled by its inverse),
    else zeroes it: stochastic depth on a residual branch (Huang et al. 2016)."""
    keep = tf.floor(survival_prob + tf.random.uniform([tf.shape(x)[0], 1, 1, 1]))
    return x / tf.cast(survival_prob, x.dtype) * tf.cast(keep, x.dtype)


class _ScopeNames:
    """TF1 Keras layer names inside one variable scope: the first ``conv2d``, then
    ``conv2d_1``, ... per layer kind, in creation order."""

    def __init__(self, scope: str):
        self.scope = scope
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str) -> str:
        count = self.counts.get(kind, 0)
        self.counts[kind] = count + 1
        return f"{self.scope}/{kind}" if count == 0 else f"{self.scope}/{kind}_{count}"


class MBConvBlock(Layer):
    """Mobile inverted bottleneck: [expand 1x1 -> BN -> swish] -> depthwise kxk (stride) ->
    BN -> swish -> squeeze-excite -> project 1x1 -> BN, plus the identity when the shape stays.

    Variables, in creation order (a block without expansion starts at the depthwise conv and
    its later ``conv2d``/BN names shift down by one): ``conv2d`` (expand),
    ``tpu_batch_normalization``, ``depthwise_conv2d``, ``tpu_batch_normalization_1``,
    ``se/conv2d``, ``se/conv2d_1``, ``conv2d_1`` (project), ``tpu_batch_normalization_2``.
    """

    def __init__(
        self,
        scope: str,
        args: StageArgs,
        factory: VariableFactory,
        survival_prob: float,
    ):
        super().__init__(scope)
        self.args = args
        self.survival_prob = survival_prob
        names = _ScopeNames(scope)
        filters = args.input_filters * args.expand_ratio
        parts: list[Layer] = []
        self.expand = self.expand_bn = None
        if args.expand_ratio != 1:
            self.expand = _conv(names("conv2d"), args.input_filters, filters, 1, factory)
            self.expand_bn = _batch_norm(names("tpu_batch_normalization"), filters, factory)
            parts += [self.expand, self.expand_bn]
        self.depthwise = DepthwiseConv2D(names("depthwise_conv2d"), filters, args.kernel_size,
                                         factory, stride=args.stride)
        self.depthwise_bn = _batch_norm(names("tpu_batch_normalization"), filters, factory)
        reduced = max(1, int(args.input_filters * args.se_ratio))
        self.se = SqueezeExcite(f"{scope}/se", filters, reduced, factory)
        self.project = _conv(names("conv2d"), filters, args.output_filters, 1, factory)
        self.project_bn = _batch_norm(names("tpu_batch_normalization"), args.output_filters,
                                      factory)
        parts += [self.depthwise, self.depthwise_bn, self.se, self.project, self.project_bn]
        self._adopt(*parts)
        self.has_skip = args.stride == 1 and args.input_filters == args.output_filters

    def __call__(self, inputs: tf.Tensor, is_training: bool) -> tf.Tensor:
        x = inputs
        if self.expand is not None:
            x = swish(self.expand_bn(self.expand(x), is_training))
        x = swish(self.depthwise_bn(self.depthwise(x), is_training))
        x = self.se(x)
        x = self.project_bn(self.project(x), is_training)
        if not self.has_skip:
            return x
        if is_training and self.survival_prob < 1.0:
            x = drop_connect(x, self.survival_prob)
        return x + inputs


class EfficientNet(ImageClassifier):
    """An EfficientNet of ``SPECS`` under ``<scope>/`` with tensorflow/tpu's variable names.

    Attributes:
      blocks: the MBConv blocks, ``blocks[i]`` under ``<scope>/blocks_<i>``.
      dropout_rate: head dropout in training mode.
    """

    def __init__(
        self,
        spec: EfficientNetSpec,
        scope: str,
        num_classes: int,
        config: ModelConfig,
        seed: Optional[int] = None,
        compute_dtype: tf.DType = tf.float32,
        dropout_rate: Optional[float] = None,
        drop_connect_rate: float = DROP_CONNECT_RATE,
    ):
        """Creates every variable (see the module docstring).

        Args:
          spec: the variant's row of ``SPECS``.
          scope: the TF1 scope, 'efficientnet-bN' (or 'efficientnet-tiny').
          num_classes: width of the logits.
          config: the registered name's ``ModelConfig``.
          seed: makes the initial weights a function of (seed, variable name).
          compute_dtype: dtype of the activations; variables and logits stay float32.
          dropout_rate: head dropout in training; None takes the variant's (``spec.dropout``).
          drop_connect_rate: the last block's drop probability; 0 turns drop-connect off.
        """
        super().__init__(scope, num_classes, config, compute_dtype)
        factory = VariableFactory(seed)
        self.dropout_rate = spec.dropout if dropout_rate is None else dropout_rate
        stem_filters = round_filters(32, spec.width)
        self.stem = self._track(
            _conv(f"{scope}/stem/conv2d", 3, stem_filters, 3, factory, stride=2)
        )
        self.stem_bn = self._track(
            _batch_norm(f"{scope}/stem/tpu_batch_normalization", stem_filters, factory)
        )
        block_args = []
        for stage in map(decode_block_string, BLOCK_STRINGS):
            stage = dataclasses.replace(
                stage,
                input_filters=round_filters(stage.input_filters, spec.width),
                output_filters=round_filters(stage.output_filters, spec.width),
            )
            block_args.append(stage)
            # The stage's later blocks take its output and keep the resolution.
            rest = dataclasses.replace(stage, input_filters=stage.output_filters, stride=1)
            block_args += [rest] * (round_repeats(stage.repeats, spec.depth) - 1)
        self.blocks = []
        for index, args in enumerate(block_args):
            survival_prob = 1.0 - drop_connect_rate * index / len(block_args)
            block = MBConvBlock(f"{scope}/blocks_{index}", args, factory, survival_prob)
            self.blocks.append(self._track(block))
        head_filters = round_filters(1280, spec.width)
        self.head = self._track(_conv(f"{scope}/head/conv2d", block_args[-1].output_filters,
                                           head_filters, 1, factory))
        self.head_bn = self._track(
            _batch_norm(f"{scope}/head/tpu_batch_normalization", head_filters, factory)
        )
        self.dense = self._track(Dense(f"{scope}/head/dense", head_filters, num_classes, factory))

    def __call__(self, images: tf.Tensor, is_training: bool) -> tf.Tensor:
        net = self.normalize_inputs(images)
        net = swish(self.stem_bn(self.stem(net), is_training))
        for block in self.blocks:
            net = block(net, is_training)
        net = swish(self.head_bn(self.head(net), is_training))
        # Pool and classify in float32 whatever the compute dtype (as ResNet v2 does).
        net = tf.reduce_mean(tf.cast(net, tf.float32), axis=[1, 2])
        if is_training and self.dropout_rate > 0:
            net = tf.nn.dropout(net, rate=self.dropout_rate)
        return self.dense(net)

    def set_drop_connect_rate(self, rate: float) -> None:
        """Block ``i`` of ``n`` keeps its branch with probability ``1 - rate * i / n``.

        ``train.py``'s hparam ``drop_connect_rate`` (tensorflow/tpu's flag of that name);
        0 turns drop-connect off. Set it before the model is traced.
        """
        for index, block in enumerate(self.blocks):
            block.survival_prob = 1.0 - rate * index / len(self.blocks)


def _batch_norm(scope: str, channels: int, factory: VariableFactory) -> UnfusedBatchNorm:
    return UnfusedBatchNorm(scope, channels, factory, decay=BATCH_NORM_DECAY,
                            epsilon=BATCH_NORM_EPSILON)


def build(config: ModelConfig, num_classes: int, seed: Optional[int] = None,
          compute_dtype: tf.DType = tf.float32) -> EfficientNet:
    """Registry builder: the EfficientNet of ``config.scope`` ('efficientnet-bN')."""
    return EfficientNet(SPECS[config.scope], config.scope, num_classes, config, seed,
                        compute_dtype)
