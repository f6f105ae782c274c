"""Model registry: a model's name is enough to build it, load its weights and preprocess for it.

Each registered name maps to a builder and a ``ModelConfig`` (input size, crop, resize
interpolation, input range, default number of classes) that the input pipelines read, so
evaluation preprocessing is never repeated by hand. Every model is an ``ImageClassifier``
whose variables carry the TF1 names of the original checkpoints.

To add a family (Inception v3, EfficientNets), write its module with a
``build(config, num_classes, seed) -> ImageClassifier`` function and add rows to ``_REGISTRY``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Optional

import tensorflow as tf

from adversarial_logit_pairing import precision
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import resnet_v2
from adversarial_logit_pairing.models.layers import ImageClassifier

__all__ = [
    "ImageClassifier",
    "ModelConfig",
    "create_model",
    "get_model_config",
    "list_models",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Defaults carried by a model name.

    Attributes:
      name: the registered name (for TF-Slim models also the variable scope).
      default_image_size: the input side the weights were trained at (a flag may override it;
        ALP trains resnet_v2_50 at 64).
      crop_pct: central-crop fraction used before resizing at evaluation.
      interpolation: resize method name ('bicubic', 'bilinear').
      input_range: pixel values the model expects, e.g. (-1.0, 1.0).
      num_classes: classes of the released weights (1001 = background + ImageNet for Slim).
    """

    name: str
    default_image_size: int
    crop_pct: float
    interpolation: str
    input_range: tuple[float, float]
    num_classes: int


Builder = Callable[[ModelConfig, int, Optional[int], tf.DType], ImageClassifier]


def _slim_resnet(name: str, image_size: int = 224) -> tuple[Builder, ModelConfig]:
    return resnet_v2.build, ModelConfig(
        name=name,
        default_image_size=image_size,
        crop_pct=0.875,
        interpolation="bicubic",
        input_range=(-1.0, 1.0),
        num_classes=1001,
    )


_REGISTRY: dict[str, tuple[Builder, ModelConfig]] = {
    "resnet_v2_50": _slim_resnet("resnet_v2_50"),
    "resnet_v2_101": _slim_resnet("resnet_v2_101"),
    "resnet_v2_152": _slim_resnet("resnet_v2_152"),
    "resnet_v2_200": _slim_resnet("resnet_v2_200"),
    "resnet_v2_tiny": _slim_resnet("resnet_v2_tiny", image_size=32),
}


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
