"""Variable-owning building blocks that name their variables exactly as TF-Slim did.

A TF1 checkpoint is a map from variable names (``resnet_v2_50/conv1/weights``) to tensors, so a
model that wants to read and write the released checkpoints must own variables under those very
names. Keras layers name variables after Python objects (``conv2d_3/kernel``); these blocks
take the full TF1 scope instead and create every variable eagerly in ``__init__``, which also
lets a model be built under a ``tf.distribute`` strategy scope and called later inside
``tf.function`` or ``strategy.run``.

``ImageClassifier`` is the base class of every registered model (``models.create_model``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
import zlib
from typing import TYPE_CHECKING, Callable, Optional, Union

import tensorflow as tf

from adversarial_logit_pairing import advprop, precision
from adversarial_logit_pairing.checkpoints import variable_name

if TYPE_CHECKING:
    from adversarial_logit_pairing.models import ModelConfig

# TF-Slim's resnet_arg_scope defaults.
BATCH_NORM_DECAY = 0.997
BATCH_NORM_EPSILON = 1e-5
# tensorflow/tpu EfficientNet's MEAN_RGB / STDDEV_RGB, on the 0..255 scale.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class VariableFactory:
    """Creates variables under exact TF1 names, with Slim's initialisers.

    With a ``seed`` every variable's initial value is a pure function of (seed, variable name),
    so two models built with the same seed are equal whatever the creation order; without a
    seed the global random state is used, as TF1 did without a graph seed.
    """

    def __init__(self, seed: Optional[int] = None):
        self.seed = seed

    def variable(
        self,
        name: str,
        shape: tuple[int, ...],
        initializer: Callable[[tuple[int, ...], str], tf.Tensor],
        trainable: bool = True,
        moving_statistic: bool = False,
    ) -> tf.Variable:
        """One float32 variable named ``name`` (its ``.name`` is ``name + ':0'``).

        Args:
          name: full TF1 name without ``:0``.
          shape: variable shape.
          initializer: ``(shape, name) -> initial value``.
          trainable: whether optimisers update it.
          moving_statistic: batch-norm moving mean/variance. Such variables are ON_READ /
            MEAN (as in Keras' BatchNormalization) so that each replica of a MirroredStrategy
            updates its own copy inside ``strategy.run`` and a read outside averages them.

        Raises:
          RuntimeError: when an enclosing name scope (e.g. a TF1 graph that already holds the
            name) changed the name, which would break checkpoint compatibility. Only code
            calling the library can cause it (the programs build each model once, eagerly),
            so it is an internal error with a traceback, not a ``UserError``.
        """
        kwargs = {}
        if moving_statistic:
            kwargs = dict(
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
            )
        # An empty name scope resets any enclosing one: names must be absolute.
        with tf.name_scope(""):
            variable = tf.Variable(
                lambda: initializer(shape, name),
                name=name,
                dtype=tf.float32,
                trainable=trainable,
                **kwargs,
            )
        if variable.name != name + ":0":
            raise RuntimeError(
                f"variable {name!r} was created as {variable.name!r}; build models eagerly "
                "and at most once per TF1 graph so their names stay checkpoint-compatible"
            )
        return variable

    def variance_scaling(self, shape: tuple[int, ...], name: str) -> tf.Tensor:
        """Slim's ``variance_scaling_initializer()``: factor 2.0, FAN_IN, truncated normal.

        Slim (unlike Keras) uses stddev ``sqrt(1.3 * factor / fan_in)`` for the truncated normal.
        """
        fan_in = math.prod(shape[:-1]) if len(shape) > 1 else shape[-1]
        return self.draw(name, shape, "truncated_normal", stddev=math.sqrt(1.3 * 2.0 / fan_in))

    def draw(self, name: str, shape: tuple[int, ...], distribution: str,
             **kwargs: float) -> tf.Tensor:
        """A float32 draw from ``tf.random.<distribution>`` (normal, truncated_normal, uniform).

        Seeded, the stateless twin is used with a seed made of (seed, crc32 of ``name``), as the
        class docstring says; crc32 is stable across processes, unlike Python's salted hash().
        """
        if self.seed is None:
            return getattr(tf.random, distribution)(shape, dtype=tf.float32, **kwargs)
        seed = tf.constant([self.seed, zlib.crc32(name.encode("utf-8"))], dtype=tf.int64)
        return getattr(tf.random, "stateless_" + distribution)(
            shape, seed=seed, dtype=tf.float32, **kwargs)

    @staticmethod
    def zeros(shape: tuple[int, ...], name: str) -> tf.Tensor:
        del name
        return tf.zeros(shape, tf.float32)

    @staticmethod
    def ones(shape: tuple[int, ...], name: str) -> tf.Tensor:
        del name
        return tf.ones(shape, tf.float32)


class Layer(tf.Module):
    """A block owning variables under one TF1 scope; ``variables_by_name`` keeps Slim's order."""

    def __init__(self, scope: str):
        super().__init__(name=_module_name(scope))
        self.scope = scope
        self._ordered: list[tf.Variable] = []

    def _add(self, variable: tf.Variable) -> tf.Variable:
        self._ordered.append(variable)
        return variable

    def _adopt(self, *parts: Optional[Layer]) -> None:
        """Lists the variables of sub-blocks (None skipped) after this block's own, in order."""
        for part in parts:
            if part is not None:
                self._ordered.extend(part.variables_by_name.values())

    @property
    def variables_by_name(self) -> dict[str, tf.Variable]:
        """TF1 name (without ':0') -> variable, in the order Slim created them."""
        return {variable_name(variable): variable for variable in self._ordered}


# A kernel side, or (height, width) for Inception's factorised 1x7 / 7x1 convolutions.
Kernel = int | tuple[int, int]
# ``(shape, name) -> initial value`` of a variable (see ``VariableFactory.variable``).
Initializer = Callable[[tuple[int, ...], str], tf.Tensor]


def _pair(kernel: Kernel) -> tuple[int, int]:
    return (kernel, kernel) if isinstance(kernel, int) else (int(kernel[0]), int(kernel[1]))


def truncated_normal(factory: VariableFactory, stddev: float) -> Initializer:
    """Slim's ``trunc_normal(stddev)``: a normal cut at two sigmas, seeded as ``factory`` is.

    Inception's auxiliary head uses it (stddev 0.01 and 0.001) instead of variance scaling.
    """
    return lambda shape, name: factory.draw(name, shape, "truncated_normal", stddev=stddev)


def fan_out_normal(factory: VariableFactory) -> Initializer:
    """tensorflow/tpu's conv initialiser: untruncated normal, stddev ``sqrt(2 / fan_out)``.

    ``fan_out = kh * kw * shape[-1]``, so a depthwise kernel [k, k, C, 1] has fan-out k * k.
    """
    return lambda shape, name: factory.draw(
        name, shape, "normal", stddev=math.sqrt(2.0 / (shape[0] * shape[1] * shape[-1])))


def fan_out_uniform(factory: VariableFactory) -> Initializer:
    """tensorflow/tpu's dense initialiser: uniform in ``+-1 / sqrt(units)``."""

    def initializer(shape: tuple[int, ...], name: str) -> tf.Tensor:
        limit = 1.0 / math.sqrt(shape[-1])
        return factory.draw(name, shape, "uniform", minval=-limit, maxval=limit)

    return initializer


@dataclasses.dataclass(frozen=True)
class ConvNaming:
    """A family's row for its convolutions' variables: leaf names and initialiser."""

    weights: str
    biases: str
    initializer: Callable[[VariableFactory], Initializer]


# TF-Slim (ResNet v2, Inception v3): ``weights``/``biases``, Slim's variance scaling.
SLIM_NAMING = ConvNaming("weights", "biases", lambda factory: factory.variance_scaling)
# TF1 Keras layers (tensorflow/tpu EfficientNet): ``kernel``/``bias``, normal on fan-out.
KERAS_NAMING = ConvNaming("kernel", "bias", fan_out_normal)
# Padding rules of ``Conv2D``: TensorFlow's 'SAME' and 'VALID', and Slim's
# ``resnet_utils.conv2d_same`` ('SLIM_SAME'), see ``Conv2D``.
PADDINGS = ("SAME", "VALID", "SLIM_SAME")


class Conv2D(Layer):
    """A 2-D convolution of any family: padding rule and variable naming are arguments.

    Variables ``<scope>/<naming.weights>`` [kh, kw, in, out] and, with ``use_bias``,
    ``<scope>/<naming.biases>``; the weights start from ``initializer`` (default: the naming's).
    Padding:
      'SAME' / 'VALID': TensorFlow's own. SAME depends on the input size: at stride 2 the odd
        padded cell goes to the bottom/right (Slim's plain ``conv2d``, TF1 ``tf.layers``).
      'SLIM_SAME': Slim's ``conv2d_same`` (ResNets): SAME at stride 1; a stride > 1 pads
        ``(k-1)//2`` before and the rest after, then uses VALID, so the result does not depend
        on whether the input size is even. For 1x1 kernels this equals plain SAME padding.
    """

    def __init__(
        self,
        scope: str,
        in_channels: int,
        out_channels: int,
        kernel_size: Kernel,
        factory: VariableFactory,
        stride: int = 1,
        padding: str = "SAME",
        use_bias: bool = False,
        naming: ConvNaming = SLIM_NAMING,
        initializer: Optional[Initializer] = None,
    ):
        super().__init__(scope)
        if padding not in PADDINGS:
            raise ValueError(f"{scope}: padding must be one of {PADDINGS}, got {padding!r}")
        self.kernel_size = _pair(kernel_size)
        self.stride = stride
        self.padding = padding
        shape = (*self.kernel_size, in_channels, out_channels)
        self.weights = self._add(factory.variable(
            f"{scope}/{naming.weights}", shape, initializer or naming.initializer(factory)))
        self.biases = None
        if use_bias:
            self.biases = self._add(
                factory.variable(f"{scope}/{naming.biases}", (out_channels,), factory.zeros))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        padding = "SAME" if self.padding == "SLIM_SAME" else self.padding
        if self.padding == "SLIM_SAME" and self.stride > 1:
            pads = [[(k - 1) // 2, k - 1 - (k - 1) // 2] for k in self.kernel_size]
            if any(map(any, pads)):
                x = tf.pad(x, [[0, 0], *pads, [0, 0]])
            padding = "VALID"
        # Weights are float32 variables; a reduced-precision model casts them at use, so the
        # convolution runs in the input's dtype (see adversarial_logit_pairing.precision).
        y = tf.nn.conv2d(x, _as(self.weights, x.dtype), strides=self.stride, padding=padding)
        if self.biases is not None:
            y = tf.nn.bias_add(y, _as(self.biases, x.dtype))
        return y


# Batch norm replaced by a hook, per thread (MirroredStrategy runs each replica's step in a
# thread of its own): ``hook(layer, x) -> y`` or None. The local linearity regulariser
# (``llr_regularizer.BatchStatistics``) sets it to normalise its passes with the statistics of
# the clean batch: a pass with given batch statistics, without a copy of the model.
_hook = threading.local()


@contextlib.contextmanager
def batch_norm_hook(hook: Callable[[BatchNorm, tf.Tensor], tf.Tensor]):
    """A block in which every ``BatchNorm(x, is_training)`` call returns ``hook(layer, x)``.

    The hook owns the normalisation and any moving-statistics update, whatever
    ``is_training`` says (the model still applies it elsewhere, e.g. to dropout). Blocks do
    not nest.
    """
    if getattr(_hook, "hook", None) is not None:
        raise RuntimeError("batch_norm_hook blocks do not nest")
    _hook.hook = hook
    try:
        yield
    finally:
        _hook.hook = None


@contextlib.contextmanager
def float32_compute():
    """A block in which every model computes in float32, whatever its ``compute_dtype``.

    Per thread, like ``batch_norm_hook``; the local linearity regulariser runs its passes in
    it, because bfloat16 rounding is as large as the non-linearity it measures.
    """
    _hook.float32 = True
    try:
        yield
    finally:
        _hook.float32 = False


def _hooked(layer: BatchNorm, x: tf.Tensor) -> Optional[tf.Tensor]:
    """``hook(layer, x)`` inside a ``batch_norm_hook`` block, else None."""
    hook = getattr(_hook, "hook", None)
    return None if hook is None else hook(layer, x)


class BatchNorm(Layer):
    """Slim ``batch_norm`` (fused) with in-place moving-statistics updates.

    Variables ``<scope>/{gamma,beta,moving_mean,moving_variance}`` (gamma only with ``scale``,
    beta only with ``center``). In training mode the batch is normalised with its own biased
    variance while the moving variance follows the Bessel-corrected one, as the fused op
    reports it and as Slim's UPDATE_OPS used it: ``moving -= (1 - decay) * (moving - batch)``.
    The update is an assignment made during the call, so a caller needs no UPDATE_OPS
    bookkeeping; it works eagerly, in ``tf.function``, under ``GradientTape`` and per replica.
    """

    def __init__(
        self,
        scope: str,
        channels: int,
        factory: VariableFactory,
        decay: float = BATCH_NORM_DECAY,
        epsilon: float = BATCH_NORM_EPSILON,
        center: bool = True,
        scale: bool = True,
    ):
        super().__init__(scope)
        self.channels = channels
        self.decay = decay
        self.epsilon = epsilon
        self.gamma = self.beta = None
        if scale:
            self.gamma = self._add(factory.variable(f"{scope}/gamma", (channels,), factory.ones))
        if center:
            self.beta = self._add(factory.variable(f"{scope}/beta", (channels,), factory.zeros))
        self.moving_mean = self._add(
            factory.variable(
                f"{scope}/moving_mean", (channels,), factory.zeros,
                trainable=False, moving_statistic=True,
            )
        )
        self.moving_variance = self._add(
            factory.variable(
                f"{scope}/moving_variance", (channels,), factory.ones,
                trainable=False, moving_statistic=True,
            )
        )

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        twin = advprop.twin_in_use(self)
        if twin is not None:  # AdvProp: this pass runs through the auxiliary batch norms
            return twin(x, is_training)
        hooked = _hooked(self, x)  # see batch_norm_hook
        if hooked is not None:
            return hooked
        # The fused op normalises a float16/bfloat16 ``x`` with float32 scale, offset and
        # statistics (and returns float32 batch statistics), so those are never cast.
        gamma = self.gamma if self.gamma is not None else tf.ones([self.channels], tf.float32)
        beta = self.beta if self.beta is not None else tf.zeros([self.channels], tf.float32)
        if not is_training:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta,
                mean=tf.convert_to_tensor(self.moving_mean),
                variance=tf.convert_to_tensor(self.moving_variance),
                epsilon=self.epsilon, is_training=False,
            )
            return y
        y, batch_mean, batch_variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, is_training=True
        )
        self._update_moving(batch_mean, self._tracked_variance(batch_variance, x))
        return y

    def _tracked_variance(self, batch_variance: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        """The batch variance the moving variance follows: the fused op's, Bessel-corrected,
        as Slim's UPDATE_OPS used it."""
        del x
        return batch_variance

    def _update_moving(self, batch_mean: tf.Tensor, batch_variance: tf.Tensor) -> None:
        """Slim's UPDATE_OPS, made in place: ``moving -= (1 - decay) * (moving - batch)``."""
        rate = 1.0 - self.decay
        for moving, batch in ((self.moving_mean, batch_mean),
                              (self.moving_variance, batch_variance)):
            moving.assign_sub((moving - tf.stop_gradient(batch)) * rate)


class ConvBatchNormReLU(Layer):
    """Slim ``conv2d`` under an arg_scope with ``normalizer_fn=batch_norm``, ``activation_fn=relu``.

    The conv has no biases (batch norm's beta replaces them); variables, in Slim's creation
    order: ``<scope>/weights``, then ``<scope>/BatchNorm/{gamma,beta,moving_mean,
    moving_variance}`` (no gamma when ``scale`` is False, as in Inception's arg_scope: ReLU
    follows, so a per-channel scale would only rescale the next layer's weights).
    """

    def __init__(self, conv: Conv2D, factory: VariableFactory, decay: float = BATCH_NORM_DECAY,
                 epsilon: float = BATCH_NORM_EPSILON, scale: bool = True):
        super().__init__(conv.scope)
        self.conv = conv
        self.out_channels = int(conv.weights.shape[-1])
        self.bn = BatchNorm(f"{conv.scope}/BatchNorm", self.out_channels, factory, decay=decay,
                            epsilon=epsilon, scale=scale)
        self._adopt(self.conv, self.bn)

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        return tf.nn.relu(self.bn(self.conv(x), is_training))


def average_pool(x: tf.Tensor, kernel_size: Kernel, stride: int, padding: str) -> tf.Tensor:
    """Slim's ``avg_pool2d``: with SAME padding, padded cells are NOT counted in the average.

    TensorFlow's AvgPool divides each window's sum by the number of cells inside the image,
    so a border output is the mean of its in-image neighbours; PyTorch's default
    (``count_include_pad=True``) and an explicit zero pad followed by a VALID pool would
    divide by the full window and shrink the borders. Inception's Branch_3 pools rely on it.
    """
    return tf.nn.avg_pool2d(x, _pair(kernel_size), stride, padding)


class ImageClassifier(tf.Module):
    """Base of every registered model: ``model(images, is_training) -> logits``.

    Subclasses create all their ``Layer`` objects in ``__init__`` through ``_track`` (in the
    order the TF1 original created its variables) and implement ``__call__``.

    Attributes:
      scope: the TF1 variable scope every variable name starts with (e.g. 'resnet_v2_50').
      num_classes: width of the logits.
      config: the ``ModelConfig`` of the registered name (input size, crop, range, ...).
      compute_dtype: the tf.DType activations are computed in (float32, bfloat16, float16);
        variables are float32 whatever it is, and logits are returned float32.
    """

    def __init__(self, scope: str, num_classes: int, config: ModelConfig,
                 compute_dtype: tf.DType = tf.float32):
        super().__init__(name=_module_name(scope))
        self.scope = scope
        self.num_classes = num_classes
        self.config = config
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self._layers: list[Layer] = []

    def _track(self, layer: Layer) -> Layer:
        self._layers.append(layer)
        return layer

    @property
    def variables_by_name(self) -> dict[str, tf.Variable]:
        """Every model variable by its TF1 name (no ':0'), in the original's creation order."""
        named: dict[str, tf.Variable] = {}
        for layer in self._layers:
            named.update(layer.variables_by_name)
        return named

    @property
    def variables(self) -> tuple[tf.Variable, ...]:
        """All variables in TF1 creation order (tf.Module would sort by attribute name)."""
        return tuple(self.variables_by_name.values())

    @property
    def trainable_variables(self) -> tuple[tf.Variable, ...]:
        """Weights, biases, gamma and beta in TF1 creation order; no moving statistics."""
        return tuple(v for v in self.variables_by_name.values() if v.trainable)

    def __call__(self, images: tf.Tensor, is_training: bool) -> tf.Tensor:
        """Logits [batch, num_classes] (float32) for images [batch, height, width, 3].

        ``is_training`` is a Python bool: True normalises with batch statistics and updates
        the moving statistics in place; False uses (and changes) nothing else.
        """
        raise NotImplementedError

    def inference(self, images: tf.Tensor) -> tf.Tensor:
        """``self(images, is_training=False)``: the model as an attack's ``model_fn``.

        Give the attacks this bound method rather than a lambda: it tells them which model
        they run, so they enter ``cast_weights()`` around the whole attack.
        """
        return self(images, is_training=False)

    def cast_weights(self) -> contextlib.AbstractContextManager:
        """A block in which this model casts each float32 weight once, not at every call.

        A bfloat16/float16 model casts its weights at each use; PGD calls the model NITER+1
        times, so entered inside the traced attack (``adversarial_attack`` does it for
        ``model.inference``) the block turns NITER+1 casts per weight into one, made outside
        the loop on each run. The cast values are the same wherever the cast runs; the
        attack's output may still differ in the last bits, as after any change to a graph,
        because TensorFlow fuses and picks kernels per graph and PGD's sign steps amplify
        rounding. For inference passes only: see ``precision.cast_weights_once``. A float32
        model adds nothing to its graph.
        """
        if self.compute_dtype == tf.float32:
            return contextlib.nullcontext()
        return precision.cast_weights_once()

    def normalize_inputs(self, images: tf.Tensor) -> tf.Tensor:
        """Dataset-range images [-1, 1] -> the network's own input, in the compute dtype.

        Every family's ``__call__`` starts with it. Normalisation beyond the dataset range
        (``config.input_normalization``) is part of the model, so attacks perturb and clip in
        [-1, 1] and EPS keeps its meaning for every model. 'none' adds no op (ResNet v2 graphs
        are unchanged).
        """
        images = tf.convert_to_tensor(images)
        if self.config.input_normalization == "imagenet_mean_std":
            pixels = (tf.cast(images, tf.float32) + 1.0) * 127.5
            images = (pixels - IMAGENET_MEAN_RGB) / IMAGENET_STDDEV_RGB
        return tf.cast(images, tf.float32 if getattr(_hook, "float32", False)
                       else self.compute_dtype)


# ---------------------------------------------------------------------------------------------
# Layers of tensorflow/tpu's EfficientNet (TF1 Keras layers: ``kernel``/``bias`` names, TF
# 'SAME' padding, non-fused batch norm); its plain convolutions are ``Conv2D`` with
# ``KERAS_NAMING``.
# ---------------------------------------------------------------------------------------------


def swish(x: tf.Tensor) -> tf.Tensor:
    """``x * sigmoid(x)`` (TF1's ``tf.nn.swish``, EfficientNet's activation)."""
    return tf.nn.silu(x)


class DepthwiseConv2D(Layer):
    """TF1 Keras ``DepthwiseConv2D(padding='same', use_bias=False)``.

    Variable ``<scope>/depthwise_kernel`` [k, k, channels, 1] (depth multiplier 1).
    """

    def __init__(self, scope: str, channels: int, kernel_size: int, factory: VariableFactory,
                 stride: int = 1):
        super().__init__(scope)
        self.stride = stride
        shape = (kernel_size, kernel_size, channels, 1)
        self.depthwise_kernel = self._add(
            factory.variable(f"{scope}/depthwise_kernel", shape, fan_out_normal(factory))
        )

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.depthwise_conv2d(
            x, _as(self.depthwise_kernel, x.dtype), strides=[1, self.stride, self.stride, 1],
            padding="SAME",
        )


class SqueezeExcite(Layer):
    """Squeeze-and-excitation: ``x * sigmoid(expand(swish(reduce(mean_hw(x)))))``.

    Variables ``<scope>/conv2d/{kernel,bias}`` (reduce to ``reduced_channels``) then
    ``<scope>/conv2d_1/{kernel,bias}`` (back to ``channels``), as tensorflow/tpu's ``se`` scope.
    """

    def __init__(self, scope: str, channels: int, reduced_channels: int,
                 factory: VariableFactory):
        super().__init__(scope)
        self.reduce = Conv2D(f"{scope}/conv2d", channels, reduced_channels, 1, factory,
                             use_bias=True, naming=KERAS_NAMING)
        self.expand = Conv2D(f"{scope}/conv2d_1", reduced_channels, channels, 1, factory,
                             use_bias=True, naming=KERAS_NAMING)
        self._adopt(self.reduce, self.expand)

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        # The spatial mean in float32: a bfloat16 sum over thousands of positions loses digits.
        squeezed = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2], keepdims=True)
        squeezed = tf.cast(squeezed, x.dtype)
        return tf.sigmoid(self.expand(swish(self.reduce(squeezed)))) * x


class Dense(Layer):
    """TF1 ``tf.layers.Dense``: ``<scope>/kernel`` [in, out] and ``<scope>/bias``."""

    def __init__(self, scope: str, in_features: int, out_features: int,
                 factory: VariableFactory):
        super().__init__(scope)
        self.kernel = self._add(factory.variable(f"{scope}/kernel", (in_features, out_features),
                                                 fan_out_uniform(factory)))
        self.bias = self._add(factory.variable(f"{scope}/bias", (out_features,), factory.zeros))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return tf.nn.bias_add(tf.matmul(x, _as(self.kernel, x.dtype)), _as(self.bias, x.dtype))


class UnfusedBatchNorm(BatchNorm):
    """TF1 ``tf.layers.BatchNormalization(fused=False)``, which tensorflow/tpu's
    ``TpuBatchNormalization`` is (it refuses ``fused=True``).

    Same variables and inference as ``BatchNorm``; the difference is the training update: the
    non-fused layer moves ``moving_variance`` towards the BIASED batch variance (``tf.nn.moments``),
    where the fused op (Slim, Keras' default) reports it with Bessel's correction.
    """

    def _tracked_variance(self, batch_variance: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
        # The fused op normalised with the biased variance but returns the corrected one.
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
        return batch_variance * (count - 1.0) / tf.maximum(count, 1.0)


# --------------------------------- end of the EfficientNet layers ---------------------------------


def _as(variable: tf.Variable, dtype: tf.DType) -> Union[tf.Variable, tf.Tensor]:
    """The variable's value in ``dtype``: no op in float32, one cast per ``cast_weights`` block
    in reduced precision (``precision.cast_variable``)."""
    return precision.cast_variable(variable, dtype)


def _module_name(scope: str) -> str:
    """tf.Module names must be Python identifiers; TF1 scopes may hold '/', '-' or dots."""
    name = re.sub(r"\W", "_", scope)
    return name if re.match(r"[A-Za-z_]", name) else "_" + name
