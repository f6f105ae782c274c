"""Functions shared by training and evaluation, under the original ``model_lib`` names.

``default_hparams``, ``get_lr_schedule`` and ``get_optimizer`` keep the original signatures
(their implementations live in ``hparams``, ``lr_schedules`` and ``optimizers``);
``get_model`` returns the model callable ``model_fn(images, is_training) -> logits``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional, Union

import tensorflow as tf

from adversarial_logit_pairing.checkpoints import variable_name
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import HParams, default_hparams
from adversarial_logit_pairing.lr_schedules import get_lr_schedule
from adversarial_logit_pairing.models import ImageClassifier, create_model
from adversarial_logit_pairing.optimizers import get_optimizer

__all__ = [
    "HParams",
    "default_hparams",
    "get_lr_schedule",
    "get_optimizer",
    "get_model",
    "parse_scopes",
    "filter_trainable_variables",
    "set_drop_connect_rate",
    "variable_name",
]


def get_model(model_name: str, num_classes: int, seed: Optional[int] = None,
              compute_dtype: str = "float32") -> ImageClassifier:
    """Builds a registered model; the result is called as ``model_fn(images, is_training)``.

    ``compute_dtype`` ('float32', 'bfloat16', 'float16') is the dtype of its convolutions and
    activations; variables and logits stay float32.

    The model owns its variables (named as in TF-Slim), so calling it twice shares weights,
    as the original's ``reuse=tf.AUTO_REUSE`` did.

    Raises:
      ConfigError: (a ValueError) for an unknown model name.
    """
    return create_model(model_name, num_classes, seed=seed, compute_dtype=compute_dtype)


def set_drop_connect_rate(model: ImageClassifier, rate: float) -> None:
    """Applies the hparam ``drop_connect_rate`` to a model.

    -1 keeps the model's own rate; a model without drop-connect (no
    ``set_drop_connect_rate`` method) accepts only -1 and 0.

    Raises:
      ConfigError: naming the hparam, for a positive rate on a model without drop-connect.
    """
    if rate == -1:
        return
    setter = getattr(model, "set_drop_connect_rate", None)
    if setter is not None:
        setter(rate)
    elif rate > 0:
        raise ConfigError(f"hparam 'drop_connect_rate={rate}': {model.scope} has no "
                          "drop-connect (EfficientNet models have); use -1 or 0")


def parse_scopes(scopes: Union[None, str, Iterable[str]]) -> list[str]:
    """Comma-separated string or list of scope prefixes -> list without blanks."""
    if not scopes:
        return []
    if isinstance(scopes, str):
        scopes = scopes.split(",")
    return [scope.strip() for scope in scopes if scope and scope.strip()]


def filter_trainable_variables(
    trainable_scopes: Union[None, str, Iterable[str]],
    variables: Sequence[tf.Variable],
) -> list[tf.Variable]:
    """Keeps the variables whose TF1 names start with one of ``trainable_scopes``.

    TF2 equivalent of the original, which removed the other variables from the graph's
    trainable collection: an empty or None ``trainable_scopes`` keeps all of them. The
    training loop differentiates (and applies weight decay to) only what this returns.
    """
    scopes = parse_scopes(trainable_scopes)
    if not scopes:
        return list(variables)
    return [v for v in variables if any(variable_name(v).startswith(s) for s in scopes)]
