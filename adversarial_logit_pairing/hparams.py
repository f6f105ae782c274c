"""Hyper-parameters: the original's ``--hparams`` string and its defaults.

:class:`HParams` keeps the semantics of TF1's ``tf.contrib.training.HParams`` that the original
command lines rely on: ``"name=value,name=[a,b,c]"`` strings whose values take the type of the
default (int, float, bool, str, list of numbers), and an error for an unknown name or a value of
the wrong type. Errors are :class:`~adversarial_logit_pairing.errors.ConfigError` so that the
command-line programs report them in one line.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Optional

from adversarial_logit_pairing.errors import ConfigError

if TYPE_CHECKING:
    from adversarial_logit_pairing.models import ModelConfig

# Values the code downstream knows how to handle; checked when parsing so that a typo fails at
# start-up rather than after the data pipeline and model are built.
CHOICES = {
    "optimizer": ("rms", "momentum", "adam"),
    "lr_schedule": ("exp_decay", "step", "fixed"),
    "augment": ("none", "autoaugment", "randaugment"),
}

_TRUE = ("true", "1")
_FALSE = ("false", "0")


def _type_name(kind: type) -> str:
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(kind, kind.__name__)


def _parse_scalar(name: str, kind: type, text: str, what: str = "") -> Any:
    """Parses one value written on the command line as the type ``kind``."""
    bad = ConfigError(f"hparam '{name}': expected {what or _type_name(kind)}, got '{text}'")
    if kind is bool:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise bad
    if kind is int:
        try:
            return int(text)  # int('1.5') fails on purpose: TF1 rejected it too.
        except ValueError:
            raise bad from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    return text


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Casts a Python value to the type of ``default`` when TF1 HParams allowed it.

    As in TF1: an int may become a float, but not the reverse; bools and numbers never mix;
    nothing becomes a string.
    """
    def fail() -> ConfigError:
        return ConfigError(
            f"hparam '{name}': expected {_describe(default)}, got {value!r}"
        )

    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        kind = _element_type(default)
        return [_coerce(name, kind(), v) for v in value]
    kind = type(default)
    if kind is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if isinstance(value, bool) != (kind is bool):
        raise fail()
    if kind is int and not isinstance(value, numbers.Integral):
        raise fail()
    if not isinstance(value, numbers.Number):
        raise fail()
    return kind(value)


def _element_type(default: list) -> type:
    # An empty default list cannot tell; the original's lists are all numeric.
    if any(isinstance(v, float) for v in default) or not default:
        return float
    return type(default[0])


def _describe(default: Any) -> str:
    if isinstance(default, list):
        return f"a list of {_type_name(_element_type(default))} written [a,b,...]"
    return _type_name(type(default))


def _split_pairs(values: str) -> list[str]:
    """Splits at the commas that are not inside ``[...]``."""
    pairs, depth, start = [], 0, 0
    for i, char in enumerate(values):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"hparams '{values}': unbalanced ']'")
        elif char == "," and depth == 0:
            pairs.append(values[start:i])
            start = i + 1
    if depth != 0:
        raise ConfigError(f"hparams '{values}': unbalanced '['")
    pairs.append(values[start:])
    if pairs and not pairs[-1].strip():  # a trailing comma is harmless (TF1 allowed it)
        pairs.pop()
    return pairs


class HParams:
    """A named set of typed hyper-parameters with TF1 ``HParams`` semantics.

    Values are read as attributes (``hp.batch_size``); assigning an attribute goes through
    :meth:`set_hparam`, so it is type-checked too.
    """

    def __init__(self, **defaults: Any) -> None:
        object.__setattr__(self, "_values", {})
        for name, value in defaults.items():
            if isinstance(value, tuple):
                value = list(value)
            self._values[name] = list(value) if isinstance(value, list) else value

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"HParams has no hparam '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        self.set_hparam(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def _unknown(self, name: str) -> ConfigError:
        return ConfigError(f"unknown hparam '{name}' (known: {', '.join(self._values)})")

    def add_hparam(self, name: str, value: Any) -> None:
        """Adds a new hparam whose type is ``value``'s (TF1 ``HParams.add_hparam``).

        Raises:
          ConfigError: ``name`` exists already.
        """
        if name in self._values:
            raise ConfigError(f"hparam '{name}' exists already")
        self._values[name] = list(value) if isinstance(value, (list, tuple)) else value

    def set_hparam(self, name: str, value: Any) -> None:
        """Sets one hparam, cast to its default's type.

        Raises:
          ConfigError: unknown name, value of an incompatible type, or a value outside the
            choices of ``optimizer`` / ``lr_schedule``.
        """
        if name not in self._values:
            raise self._unknown(name)
        value = _coerce(name, self._values[name], value)
        _check_choice(name, value)
        self._values[name] = value

    def parse(self, values: str) -> HParams:
        """Overrides hparams from a ``"name=value,name=[a,b],..."`` string; returns ``self``.

        The string is checked as a whole before anything is changed, so a bad string leaves
        the hparams as they were. An empty string changes nothing.

        Raises:
          ConfigError: malformed pair, unknown or repeated name, badly typed value, invalid
            choice, or (for ``lr_schedule=step``) ``lr_list`` not one longer than
            ``lr_decay_epochs``.
        """
        if not values or not values.strip():
            return self
        parsed: dict[str, Any] = {}
        for pair in _split_pairs(values):
            name, sep, text = pair.partition("=")
            name, text = name.strip(), text.strip()
            if not sep or not name:
                raise ConfigError(f"hparams '{values}': malformed pair '{pair.strip()}', "
                                  "expected name=value")
            if name not in self._values:
                raise self._unknown(name)
            if name in parsed:
                raise ConfigError(f"hparam '{name}' is given more than once in '{values}'")
            parsed[name] = self._parse_value(name, text)
        merged = dict(self._values, **parsed)
        for name, value in parsed.items():
            _check_choice(name, value)
        validate(merged)
        self._values.update(parsed)
        return self

    def _parse_value(self, name: str, text: str) -> Any:
        default = self._values[name]
        if not isinstance(default, list):
            if "[" in text or "]" in text:
                raise ConfigError(
                    f"hparam '{name}': expected {_describe(default)}, got '{text}'"
                )
            return _parse_scalar(name, type(default), text)
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigError(f"hparam '{name}': expected {_describe(default)}, got '{text}'")
        inner = text[1:-1].strip()
        if not inner:
            return []
        kind = _element_type(default)
        return [
            _parse_scalar(name, kind, item.strip(), what=_describe(default) + f" ('{text}')")
            for item in inner.split(",")
        ]

    def values(self) -> dict[str, Any]:
        """A copy of all hparams as a plain dict (lists copied too)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._values.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HParams) and self.values() == other.values()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"HParams({items})"

    __str__ = __repr__


def _check_choice(name: str, value: Any) -> None:
    choices = CHOICES.get(name)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"hparam '{name}': expected one of {', '.join(choices)}, got '{value}'"
        )


def validate(values: dict[str, Any]) -> None:
    """Checks the relations between hparams that no single value can show.

    Raises:
      ConfigError: for ``lr_schedule=step``, ``lr_list`` must have one more entry than
        ``lr_decay_epochs`` (a value before each boundary and one after the last), and the
        boundaries must not decrease; a negative warm-up, RandAugment setting, or a
        ``drop_connect_rate`` outside [0, 1) other than -1; a negative ``llr_*`` value.
    """
    _validate_efficientnet_recipe(values)
    _validate_llr(values)
    if values.get("lr_schedule") != "step":
        return
    lr_list = values.get("lr_list", [])
    epochs = values.get("lr_decay_epochs", [])
    if len(lr_list) != len(epochs) + 1:
        raise ConfigError(
            f"hparams lr_schedule=step: lr_list needs one more value than lr_decay_epochs, "
            f"got lr_list={lr_list} ({len(lr_list)} values) and lr_decay_epochs={epochs} "
            f"({len(epochs)} boundaries)"
        )
    if any(b < a for a, b in zip(epochs, epochs[1:])):
        raise ConfigError(f"hparam 'lr_decay_epochs': must not decrease, got {epochs}")


def _validate_efficientnet_recipe(values: dict[str, Any]) -> None:
    for name in ("lr_warmup_epochs", "randaugment_num_layers", "randaugment_magnitude"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"hparam '{name}': must be >= 0, got {values[name]}")
    rate = values.get("drop_connect_rate", -1.0)
    if rate != -1.0 and not 0.0 <= rate < 1.0:
        raise ConfigError(f"hparam 'drop_connect_rate': expected -1 (the model's own) or a "
                          f"rate in [0, 1), got {rate}")


def _validate_llr(values: dict[str, Any]) -> None:
    """The local linearity regulariser's hparams are weights, sizes and counts: not negative."""
    for name in ("llr_lambda", "llr_mu", "llr_eps", "llr_steps", "llr_adam_lr",
                 "llr_eps_warmup_steps", "llr_xent_weight"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"hparam '{name}': must be >= 0, got {values[name]}")


def default_hparams(model_config: Optional[ModelConfig] = None) -> HParams:
    """Returns the original's default hyper-parameters (same names, types and values).

    With the ``model_config`` of a model that has an auxiliary head (``aux_loss_weight`` not
    None, e.g. ``inception_v3``), also ``aux_loss_weight``: the weight of the auxiliary
    logits' label-smoothed cross-entropy in the training loss (0.4 registered); for other
    models that hparam does not exist. The hparams this project adds (mixed batch, the
    EfficientNet recipe, the local linearity regulariser ``llr_*``) are off by default: with
    their defaults training is the original's.
    """
    hparams = HParams(
        # Batch sizes: training (per replica, clean half) and evaluation.
        batch_size=32,
        eval_batch_size=50,
        # General training parameters.
        weight_decay=0.0001,
        label_smoothing=0.1,
        # Adversarial training: the attack description and the logit pairing weight.
        # train_adv_method: 'clean', pgd_EPS_STEP_NITER, pgdll_EPS_STEP_NITER,
        # pgdrnd_EPS_STEP_NITER, stepll_EPS, stepllrand_EPS (eps per example from N(0, EPS/2)
        # truncated to [0, EPS]) or rstepll_EPS_ALPHA (R+Step-LL); see adversarial_attack.
        train_adv_method="clean",
        train_lp_weight=0.0,
        # Kurakin et al.'s mixed batch (see mixed_batch): 0 keeps ALP's batch, every example
        # plus its adversarial copy; in (0, 1], the fraction k/m of the m examples replaced by
        # their adversarial examples (0.5 in the paper). The loss weighs the adversarial
        # examples by train_adv_loss_weight (lambda; 0.3 in the paper):
        # (sum_clean + lambda * sum_adv) / (clean count + lambda * adversarial count).
        train_adv_fraction=0.0,
        train_adv_loss_weight=1.0,
        # AdvProp (not in the original): auxiliary batch norms for the adversarial half, the
        # clean and adversarial losses summed (see adversarial_logit_pairing.advprop).
        advprop=False,
        # Optimizer: 'rms', 'momentum' or 'adam' with TF1 semantics.
        optimizer="rms",
        momentum=0.9,
        rmsprop_decay=0.9,
        rmsprop_epsilon=1.0,
        # Learning-rate schedule: 'exp_decay', 'step' or 'fixed'.
        lr_schedule="exp_decay",
        learning_rate=0.045,
        lr_decay_factor=0.94,
        lr_num_epochs_per_decay=2.0,
        lr_list=[1.0 / 6, 2.0 / 6, 3.0 / 6, 4.0 / 6, 5.0 / 6, 1.0, 0.1, 0.01, 0.001, 0.0001],
        lr_decay_epochs=[1, 2, 3, 4, 5, 30, 60, 80, 90],
        # Not in the original; the tensorflow/tpu EfficientNet recipe (defaults: off).
        # Linear warm-up of the learning rate from 0 over this many epochs (EfficientNet: 5).
        lr_warmup_epochs=0.0,
        # Training-image augmentation after crop, resize and flip: 'none', 'autoaugment'
        # (policy v0) or 'randaugment' (N layers at magnitude M; tensorflow/tpu's 2 and 10).
        augment="none",
        randaugment_num_layers=2,
        randaugment_magnitude=10.0,
        # Drop-connect: the last residual block's drop probability, earlier blocks' scaled
        # down linearly; -1: the model's own (EfficientNet 0.2), 0: off. Only models with
        # drop-connect (EfficientNet) accept a positive rate.
        drop_connect_rate=-1.0,
        # Local linearity regulariser (Qin et al. 2019; llr_regularizer.py), not in the
        # original: off while llr_lambda is 0, and then the other llr_* hparams do nothing.
        # The other defaults are DeepMind's CIFAR-10 config, so llr_lambda=4 alone trains
        # as DeepMind did (their mu, 0.3, weighs |d^T grad| INSIDE lambda: 4 * 0.3 = 1.2).
        llr_lambda=0.0,  # weight of gamma = mean |l(x+d) - l(x) - d^T grad_x l(x)|
        llr_mu=1.2,  # weight of mean |d^T grad_x l(x)|
        llr_eps=8.0,  # L-inf radius of the search for d, 0..255 scale like the attacks
        llr_steps=10,  # inner Adam steps of the search for d
        llr_adam_lr=0.1,  # inner Adam learning rate, on a [0, 1] image scale as DeepMind's
        llr_eps_warmup_steps=500,  # eps grows linearly from 0 over the first global steps
        llr_xent_weight=2.0,  # weight of loss_xent (the cross-entropy) in LLR training
    )
    aux_loss_weight = getattr(model_config, "aux_loss_weight", None)
    if aux_loss_weight is not None:
        hparams.add_hparam("aux_loss_weight", float(aux_loss_weight))
    return hparams
