"""Model registry: a model's name is enough to build it, load its weights and preprocess for it.

Each registered name maps to a builder and a ``ModelConfig`` (variable scope, native size,
class count and background class, evaluation crop, resize kernels, input normalisation,
classifier scopes) that the input pipelines, ``train.py``, ``eval.py`` and the export read, so
preprocessing is never repeated by hand. Every model is an ``ImageClassifier`` whose variables
carry the TF1 names of the original checkpoints.

Families: TF-Slim ResNet v2 (``resnet_v2_*``), tensorflow/tpu EfficientNet (``efficientnet_bN``
and the AdvProp ``efficientnet_bN_ap``), TF-Slim Inception v3 (``inception_v3``). To add one,
write its module with a ``build(config, num_classes, seed, compute_dtype) -> ImageClassifier``
function and add rows to ``_REGISTRY`` (or call ``register_model``). A family's module is
imported when its first model is created, not with this registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Callable, Optional

import tensorflow as tf

from adversarial_logit_pairing import precision
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models.layers import ImageClassifier

__all__ = [
    "ImageClassifier",
    "ModelConfig",
    "create_model",
    "get_model_config",
    "list_models",
    "register_model",
]


# How the evaluation crop is taken (``ModelConfig.eval_crop``), all centred with offsets
# ``((side - crop) + 1) // 2`` unless stated:
#   'short_side':    a square of ``int(crop_fraction * min(h, w))`` (ALP's ImageNet input).
#   'padded_size':   a square of ``int(size / (size + 32) * min(h, w))`` for the output
#                    ``size`` (tensorflow/tpu EfficientNet at release).
#   'central_fraction': ``tf.image.central_crop(image, crop_fraction)``, i.e. that fraction
#                    of EACH side (TF-Slim / adv_imagenet_models Inception preprocessing).
EVAL_CROPS = ("short_side", "padded_size", "central_fraction")
# How the training crop is sampled (``ModelConfig.train_crop``), both with
# ``tf.image.sample_distorted_bounding_box`` (min object covered 0.1, area 0.08..1, 10 attempts):
#   'object_boxes':    around the record's object boxes, aspect 0.75..1.33, the whole image
#                      when no window fits (ALP / TF-Slim ImageNet input).
#   'whole_image_box': around a box covering the whole image, aspect 3/4..4/3; when the
#                      sampler returns the whole image, the model's evaluation centre crop
#                      instead (tensorflow/tpu EfficientNet's ``_decode_and_random_crop``).
TRAIN_CROPS = ("object_boxes", "whole_image_box")
# Resize kernels, both the TF1 ops (``align_corners=False``, no half-pixel centres).
RESIZE_KERNELS = ("bicubic", "bilinear")
# Normalisation the network applies INSIDE its call to inputs in the dataset range [-1, 1]
# (``ImageClassifier.normalize_inputs``), so attacks and EPS keep working in [-1, 1]:
#   'none':              the network takes [-1, 1] as is (ResNet v2, Inception, AdvProp).
#   'imagenet_mean_std': ``(255 * (x + 1) / 2 - MEAN_RGB) / STDDEV_RGB`` (standard EfficientNet).
INPUT_NORMALIZATIONS = ("none", "imagenet_mean_std")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything a model's registered name carries; the data path and the programs read it.

    Attributes:
      name: the registered name (``--model_name``).
      scope: the TF1 variable scope every variable name starts with; may differ from the
        name ('efficientnet-b0', 'InceptionV3').
      default_image_size: the input side the released weights were trained at;
        ``--dataset_image_size`` may differ (logged).
      num_classes: classes of the released weights on ImageNet: 1001 when class 0 is a
        background class (TF-Slim), else 1000.
      background_class: whether ImageNet class 0 is the background class. ImageNet shards
        carry labels 1..1000: kept for such a model, shifted to 0..999 otherwise.
      eval_crop: one of ``EVAL_CROPS``.
      crop_fraction: the fraction of 'short_side' and 'central_fraction' crops.
      eval_resize: kernel of the evaluation resize, one of ``RESIZE_KERNELS``.
      train_resize: kernel of the training resize, one of ``RESIZE_KERNELS``.
      input_normalization: one of ``INPUT_NORMALIZATIONS``, applied inside the model.
      classifier_scopes: variable-scope prefixes of the classification head(s), whose shapes
        depend on the class count (what fine-tuning across data sets excludes).
      train_crop: one of ``TRAIN_CROPS``, the ImageNet training crop.
      aux_loss_weight: for a model with an auxiliary classifier (``logits_and_aux``), the
        default weight of its cross-entropy in the training loss (the ``aux_loss_weight``
        hparam) and in the step-LL attacks' loss; None for a model without one.
    """

    name: str
    scope: str
    default_image_size: int
    num_classes: int
    background_class: bool
    eval_crop: str
    crop_fraction: float
    eval_resize: str
    train_resize: str
    input_normalization: str
    classifier_scopes: tuple[str, ...]
    train_crop: str = "object_boxes"
    aux_loss_weight: Optional[float] = None

    def __post_init__(self):
        checks = (("eval_crop", EVAL_CROPS), ("train_crop", TRAIN_CROPS),
                  ("eval_resize", RESIZE_KERNELS),
                  ("train_resize", RESIZE_KERNELS), ("input_normalization", INPUT_NORMALIZATIONS))
        for field, allowed in checks:
            if getattr(self, field) not in allowed:
                raise ConfigError(f"model {self.name!r}: {field}={getattr(self, field)!r}, "
                                  f"expected one of {', '.join(allowed)}")


Builder = Callable[[ModelConfig, int, Optional[int], tf.DType], ImageClassifier]


def _family(module: str) -> Builder:
    """``models.<module>.build``, importing the module at the first model it builds."""

    def build(config: ModelConfig, num_classes: int, seed: Optional[int],
              compute_dtype: tf.DType) -> ImageClassifier:
        family = importlib.import_module(f"{__name__}.{module}")
        return family.build(config, num_classes, seed, compute_dtype)

    return build


def _slim_resnet(name: str, image_size: int = 224) -> tuple[Builder, ModelConfig]:
    return _family("resnet_v2"), ModelConfig(
        name=name,
        scope=name,
        default_image_size=image_size,
        num_classes=1001,
        background_class=True,
        eval_crop="short_side",
        crop_fraction=0.875,
        eval_resize="bicubic",
        train_resize="bicubic",
        input_normalization="none",
        classifier_scopes=(f"{name}/logits",),
    )


# EfficientNet-bN's native input side (tensorflow/tpu's efficientnet_builder.py) and timm's
# crop pct, equal to side / (side + 32) rounded.
_EFFICIENTNET_INPUTS = {
    "b0": (224, 0.875), "b1": (240, 0.882), "b2": (260, 0.890), "b3": (300, 0.904),
    "b4": (380, 0.922), "b5": (456, 0.934), "b6": (528, 0.942), "b7": (600, 0.949),
    "b8": (672, 0.954),
}


def _efficientnet(variant: str, advprop: bool) -> tuple[Builder, ModelConfig]:
    """tensorflow/tpu's EfficientNet-``variant``: the standard checkpoints take ImageNet
    mean/std-normalised inputs, the AdvProp ones ('_ap') [-1, 1]. Evaluation crops
    ``size / (size + 32)`` of the short side ('padded_size'); ``crop_fraction`` (timm's crop
    pct, that ratio rounded) is informative only. Training samples its crop around the
    whole image ('whole_image_box')."""
    scope = f"efficientnet-{variant}"
    image_size, crop_fraction = _EFFICIENTNET_INPUTS[variant]
    name = f"efficientnet_{variant}" + ("_ap" if advprop else "")
    return _family("efficientnet"), ModelConfig(
        name=name,
        scope=scope,
        default_image_size=image_size,
        num_classes=1000,
        background_class=False,
        eval_crop="padded_size",
        crop_fraction=crop_fraction,
        eval_resize="bicubic",
        train_resize="bicubic",
        input_normalization="none" if advprop else "imagenet_mean_std",
        classifier_scopes=(f"{scope}/head/dense",),
        train_crop="whole_image_box",
    )


_REGISTRY: dict[str, tuple[Builder, ModelConfig]] = {
    "resnet_v2_50": _slim_resnet("resnet_v2_50"),
    "resnet_v2_101": _slim_resnet("resnet_v2_101"),
    "resnet_v2_152": _slim_resnet("resnet_v2_152"),
    "resnet_v2_200": _slim_resnet("resnet_v2_200"),
    "resnet_v2_tiny": _slim_resnet("resnet_v2_tiny", image_size=32),
    # efficientnet_b0 .. efficientnet_b8 and efficientnet_b0_ap .. efficientnet_b8_ap.
    **{
        f"efficientnet_b{index}{suffix}": _efficientnet(f"b{index}", advprop=suffix == "_ap")
        for index in range(9)
        for suffix in ("", "_ap")
    },
    # Not in tensorflow/tpu: SPECS' 'efficientnet-tiny' at 32 px, [-1, 1] inputs as the AdvProp
    # checkpoints, for CPU demos and tests (the AdvProp row of the demo).
    "efficientnet_tiny": (_family("efficientnet"), dataclasses.replace(
        _efficientnet("b0", advprop=True)[1], name="efficientnet_tiny", scope="efficientnet-tiny",
        default_image_size=32, classifier_scopes=("efficientnet-tiny/head/dense",))),
    # TF-Slim / adv_imagenet_models: central_crop(0.875) of each side, TF1 bilinear to 299.
    "inception_v3": (_family("inception_v3"), ModelConfig(
        name="inception_v3",
        scope="InceptionV3",
        default_image_size=299,
        num_classes=1001,
        background_class=True,
        eval_crop="central_fraction",
        crop_fraction=0.875,
        eval_resize="bilinear",
        train_resize="bilinear",
        input_normalization="none",
        classifier_scopes=("InceptionV3/Logits", "InceptionV3/AuxLogits"),
        # Slim's train_image_classifier and the adversarial training papers: 0.4 x AuxLogits.
        aux_loss_weight=0.4,
    )),
}


def register_model(builder: Builder, config: ModelConfig) -> None:
    """Adds (or replaces) a registered name; model families call it for their table rows."""
    _REGISTRY[config.name] = (builder, config)


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def get_model_config(name: str) -> ModelConfig:
    """The default config of a registered model.

    Raises:
      ConfigError: (a ValueError) naming the unknown model and the known ones.
    """
    try:
        return _REGISTRY[name][1]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(
    name: str,
    num_classes: int,
    seed: Optional[int] = None,
    compute_dtype: precision.DTypeLike = "float32",
) -> ImageClassifier:
    """Builds a registered model with all its variables (call under a strategy scope if any).

    Args:
      name: a name from ``list_models()``.
      num_classes: width of the logits (may differ from the config's default, e.g. 200 for
        Tiny ImageNet).
      seed: makes the initial weights a deterministic function of (seed, variable name).
      compute_dtype: 'float32', 'bfloat16' or 'float16': the dtype of convolutions and
        activations. Variables (hence checkpoints) are float32 in every case and the logits
        are returned float32; see ``adversarial_logit_pairing.precision``.

    Raises:
      ConfigError: (a ValueError) for an unknown name, a non-positive ``num_classes`` or an
        unknown ``compute_dtype``.
    """
    config = get_model_config(name)
    integral = isinstance(num_classes, numbers.Integral) and not isinstance(num_classes, bool)
    if not integral or num_classes < 1:
        raise ConfigError(f"model {name!r}: num_classes must be a positive integer, "
                          f"got {num_classes!r}")
    dtype = precision.resolve_compute_dtype(compute_dtype)
    builder = _REGISTRY[name][0]
    return builder(config, int(num_classes), seed, dtype)
