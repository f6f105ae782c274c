"""Tests for the hparams string: TF1 HParams parsing, types, errors and the defaults."""

import pytest

from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import HParams, default_hparams

# The table of defaults in SPEC.md section 1 (the original model_lib.default_hparams).
SPEC_DEFAULTS = {
    "batch_size": 32,
    "eval_batch_size": 50,
    "weight_decay": 0.0001,
    "label_smoothing": 0.1,
    "train_adv_method": "clean",
    "train_lp_weight": 0.0,
    "optimizer": "rms",
    "momentum": 0.9,
    "rmsprop_decay": 0.9,
    "rmsprop_epsilon": 1.0,
    "lr_schedule": "exp_decay",
    "learning_rate": 0.045,
    "lr_decay_factor": 0.94,
    "lr_num_epochs_per_decay": 2.0,
    "lr_list": [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 0.1, 0.01, 0.001, 0.0001],
    "lr_decay_epochs": [1, 2, 3, 4, 5, 30, 60, 80, 90],
    # Not in the original: the EfficientNet recipe's additions, all off by default.
    "lr_warmup_epochs": 0.0,
    "augment": "none",
    "randaugment_num_layers": 2,
    "randaugment_magnitude": 10.0,
    "drop_connect_rate": -1.0,
    "advprop": False,  # not in the original: AdvProp's auxiliary batch norms (off)
}


# This project's additions: the local linearity regulariser, off (llr_lambda=0) by default.
LLR_DEFAULTS = {"llr_lambda": 0.0, "llr_mu": 1.2, "llr_eps": 8.0, "llr_steps": 10,
                "llr_adam_lr": 0.1, "llr_eps_warmup_steps": 500, "llr_xent_weight": 2.0}


def test_default_hparams_match_the_original_table():
    values = default_hparams().values()
    # Later additions (e.g. the mixed batch's) keep the original names and values.
    assert {name: values[name] for name in SPEC_DEFAULTS} == SPEC_DEFAULTS
    for name, value in SPEC_DEFAULTS.items():
        assert type(values[name]) is type(value), name
    assert all(type(e) is int for e in values["lr_decay_epochs"])
    assert all(type(e) is float for e in values["lr_list"])


def test_parse_casts_each_value_to_its_default_type():
    hp = default_hparams().parse(
        "batch_size=64, learning_rate=1,weight_decay=1e-3,train_adv_method=pgdll_16_2_10,"
        "lr_list=[1, 0.5,2e-1],lr_decay_epochs=[5,10],train_lp_weight=0.5"
    )
    assert hp.batch_size == 64 and type(hp.batch_size) is int
    assert hp.learning_rate == 1.0 and type(hp.learning_rate) is float
    assert hp.weight_decay == 0.001
    assert hp.train_adv_method == "pgdll_16_2_10"
    assert hp.lr_list == [1.0, 0.5, 0.2] and all(type(e) is float for e in hp.lr_list)
    assert hp.lr_decay_epochs == [5, 10] and all(type(e) is int for e in hp.lr_decay_epochs)
    assert hp.train_lp_weight == 0.5
    assert hp.eval_batch_size == 50  # untouched


def test_parse_returns_self_and_empty_string_changes_nothing():
    hp = default_hparams()
    assert hp.parse("") is hp
    assert hp.parse("   ") is hp
    assert hp.values() == default_hparams().values()
    assert hp.parse("batch_size=8,") is hp  # a trailing comma is allowed, as in TF1
    assert hp.batch_size == 8


def test_parse_rejects_a_float_for_an_int_hparam_naming_it():
    with pytest.raises(ConfigError, match=r"hparam 'batch_size': expected int, got '1\.5'"):
        default_hparams().parse("batch_size=1.5")


def test_parse_rejects_text_for_a_float_hparam():
    with pytest.raises(ConfigError, match=r"hparam 'learning_rate': expected float, got 'fast'"):
        default_hparams().parse("learning_rate=fast")


def test_parse_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown hparam 'bach_size' \(known: batch_size, "):
        default_hparams().parse("bach_size=3")


@pytest.mark.parametrize("text", ["batch_size", "=3", "batch_size=3,,eval_batch_size=2"])
def test_parse_rejects_a_malformed_pair(text):
    with pytest.raises(ConfigError, match="malformed pair"):
        default_hparams().parse(text)


def test_parse_rejects_a_repeated_name():
    with pytest.raises(ConfigError, match="'batch_size' is given more than once"):
        default_hparams().parse("batch_size=3,batch_size=4")


def test_parse_rejects_non_integers_in_an_int_list():
    with pytest.raises(ConfigError, match=r"hparam 'lr_decay_epochs': expected a list of int"):
        default_hparams().parse("lr_decay_epochs=[1,2.5]")


def test_parse_rejects_a_scalar_for_a_list_and_a_list_for_a_scalar():
    with pytest.raises(ConfigError, match="hparam 'lr_list': expected a list of float"):
        default_hparams().parse("lr_list=0.1")
    with pytest.raises(ConfigError, match="hparam 'batch_size': expected int, got '\\[1\\]'"):
        default_hparams().parse("batch_size=[1]")


def test_parse_rejects_unbalanced_brackets():
    with pytest.raises(ConfigError, match="unbalanced"):
        default_hparams().parse("lr_list=[1,2")


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("False", False), ("TRUE", True), ("1", True), ("0", False)],
)
def test_parse_reads_booleans_case_insensitively(text, expected):
    hp = HParams(flag=not expected)
    assert hp.parse(f"flag={text}").flag is expected


def test_parse_rejects_a_non_boolean_for_a_bool_hparam():
    with pytest.raises(ConfigError, match="hparam 'flag': expected bool, got 'yes please'"):
        HParams(flag=False).parse("flag=yes please")


@pytest.mark.parametrize(
    "text, message",
    [
        ("optimizer=sgd", "hparam 'optimizer': expected one of rms, momentum, adam, got 'sgd'"),
        ("lr_schedule=cosine", "hparam 'lr_schedule': expected one of exp_decay, step, fixed"),
    ],
)
def test_parse_rejects_unknown_optimizer_and_schedule(text, message):
    with pytest.raises(ConfigError, match=message):
        default_hparams().parse(text)


def test_parse_step_schedule_needs_one_more_rate_than_boundaries():
    hp = default_hparams().parse("lr_schedule=step,lr_list=[0.1,0.01],lr_decay_epochs=[3]")
    assert hp.lr_list == [0.1, 0.01] and hp.lr_decay_epochs == [3]
    with pytest.raises(ConfigError, match="lr_list needs one more value than lr_decay_epochs"):
        default_hparams().parse("lr_schedule=step,lr_list=[0.1,0.01]")


def test_parse_step_schedule_rejects_decreasing_boundaries():
    with pytest.raises(ConfigError, match="lr_decay_epochs.*must not decrease"):
        default_hparams().parse("lr_schedule=step,lr_list=[1,2,3],lr_decay_epochs=[5,2]")


def test_failed_parse_leaves_the_hparams_unchanged():
    hp = default_hparams()
    with pytest.raises(ConfigError):
        hp.parse("batch_size=64,optimizer=sgd")
    assert hp.values() == default_hparams().values()


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError):
        default_hparams().parse("batch_size=x")


def test_set_hparam_casts_like_tf1():
    hp = default_hparams()
    hp.set_hparam("learning_rate", 1)  # int -> float is allowed
    assert hp.learning_rate == 1.0 and type(hp.learning_rate) is float
    hp.batch_size = 16  # attribute assignment goes through set_hparam
    assert hp.batch_size == 16
    for name, value in [("batch_size", 1.5), ("batch_size", True), ("learning_rate", "0.1"),
                        ("train_adv_method", 3), ("lr_decay_epochs", [1.5]),
                        ("lr_list", 0.1), ("optimizer", "sgd")]:
        with pytest.raises(ConfigError, match=f"hparam '{name}'"):
            hp.set_hparam(name, value)
    with pytest.raises(ConfigError, match="unknown hparam 'nope'"):
        hp.set_hparam("nope", 1)


def test_values_is_a_copy_and_repr_names_every_hparam():
    hp = default_hparams()
    values = hp.values()
    values["lr_list"].append(5.0)
    values["batch_size"] = 1
    assert hp.values() == default_hparams().values()
    text = str(hp)
    assert text.startswith("HParams(") and all(f"{name}=" in text for name in SPEC_DEFAULTS)
    assert "train_adv_method='clean'" in repr(hp)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no hparam 'missing'"):
        _ = default_hparams().missing
