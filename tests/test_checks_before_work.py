"""Every flag check runs before any work: a bad command line fails in seconds, not after data.

The data directory named here does not exist, so a check that ran only after the input
pipeline was set up would lose to a ``MissingDataError`` (a ``DataError``), and one that ran
after the first TFRecord was opened could not be reached at all: the error must be the flag's
``ConfigError``. Training must not even create its output directory.
"""

from __future__ import annotations

import os

import pytest

from adversarial_logit_pairing import evaluation, training
from adversarial_logit_pairing.errors import ConfigError
from tests.program_runs import run_concurrently

MODEL = "resnet_v2_tiny"


def _train_config(tmp_path, **overrides) -> training.TrainConfig:
    values = dict(output_dir=str(tmp_path / "run"), model_name=MODEL, dataset="tiny_imagenet",
                  dataset_image_size=32, tiny_imagenet_data_dir=str(tmp_path / "no_data"),
                  hparams="batch_size=8,train_adv_method=pgdll_16_2_1,train_lp_weight=0.5",
                  max_steps=1)
    values.update(overrides)
    return training.TrainConfig(**values)


@pytest.mark.parametrize("overrides, culprit", [
    (dict(hparams="batch_size=7,train_adv_method=clean,train_lp_weight=0.5"),
     "even batch_size, got 7"),
    (dict(hparams="train_adv_method=fgsm_16"), "fgsm_16"),
    (dict(hparams="batch_sise=8"), "batch_sise"),
    (dict(hparams="lr_schedule=cosine"), "cosine"),
    (dict(hparams="lr_num_epochs_per_decay=0.00001"), "lr_num_epochs_per_decay"),
    (dict(hparams="optimizer=sgd"), "sgd"),
    (dict(replicas_to_aggregate=0), "--replicas_to_aggregate=0"),
    (dict(finetune_trainable_scopes="resnet_v2_50/logits"), "matches no variable"),
    (dict(model_name="resnet_v2_9"), "resnet_v2_9"),
    (dict(dataset="cifar10"), "--dataset=cifar10"),
    (dict(compute_dtype="float64"), "compute_dtype"),
])
def test_a_bad_training_flag_fails_before_any_data_or_output(tmp_path, overrides, culprit):
    config = _train_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=culprit):
        training.train(config)
    assert not os.path.exists(config.output_dir)


@pytest.mark.parametrize("overrides, culprit", [
    (dict(split_name="test"), "--split_name=test"),
    (dict(adv_method="pgd_16_2"), "pgd_16_2"),
    (dict(num_examples=3), "--num_examples=3 is smaller than one batch"),
    (dict(model_name="resnet_v2_9"), "resnet_v2_9"),
])
def test_a_bad_evaluation_flag_fails_before_any_data_or_checkpoint(tmp_path, overrides,
                                                                   culprit):
    # Neither the checkpoint nor the data exist: the flag error must come first.
    values = dict(checkpoint_path=str(tmp_path / "no_checkpoint"), model_name=MODEL,
                  dataset="tiny_imagenet", dataset_image_size=32, hparams="eval_batch_size=8",
                  tiny_imagenet_data_dir=str(tmp_path / "no_data"))
    config = evaluation.EvalConfig(**{**values, **overrides})
    with pytest.raises(ConfigError, match=culprit):
        evaluation.run(config)
    with pytest.raises(ConfigError, match=culprit):
        evaluation.Evaluator(config)


@pytest.mark.slow
def test_flags_that_do_not_fit_two_replicas_fail_before_any_data(tmp_path):
    """The combinations only several replicas make wrong, from the command line (2 CPUs)."""
    common = ["--strategy=mirrored", "--cpu_devices=2", f"--model_name={MODEL}",
              "--dataset=tiny_imagenet", f"--tiny_imagenet_data_dir={tmp_path / 'no_data'}"]
    train = ["train.py", f"--output_dir={tmp_path / 'run'}", *common]
    runs = {
        "--sync_batch_norm needs --strategy=tpu": (
            train[0], [*train[1:], "--jit_compile", "--sync_batch_norm"]),
        "--compute_dtype=float16 (loss scaling) runs on one device": (
            train[0], [*train[1:], "--compute_dtype=float16"]),
        "--replicas_to_aggregate=3: must be 1 or a multiple of the 2 replicas": (
            train[0], [*train[1:], "--replicas_to_aggregate=3"]),
        "eval_batch_size=7 must be a multiple of the 2 replicas": (
            "eval.py", [f"--checkpoint_path={tmp_path / 'no_checkpoint'}", *common,
                        "--hparams=eval_batch_size=7"]),
    }
    results = run_concurrently(runs, str(tmp_path / "logs"), check=False)
    for culprit, run in results.items():
        errors = [line for line in run.stderr.splitlines() if ": error: " in line]
        assert run.returncode != 0 and errors, run.stderr[-2000:]
        assert culprit in errors[0], errors
    assert not os.path.exists(tmp_path / "run")
