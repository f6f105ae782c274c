"""The training loop: resume, TF1-style moving averages, fine-tuning scopes, NaN stop."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import training
from adversarial_logit_pairing.errors import CheckpointError, ConfigError, TrainingDivergedError
from tests.data_builders import write_tiny_imagenet_tfrecords

MODEL = "resnet_v2_tiny"
SCOPE = "resnet_v2_tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_imagenet")
    write_tiny_imagenet_tfrecords(str(path), num_train=64, num_val=32, image_size=32, seed=0)
    return str(path)


def _config(output_dir, data_dir, **overrides):
    values = dict(
        output_dir=str(output_dir),
        model_name=MODEL,
        dataset="tiny_imagenet",
        dataset_image_size=32,
        tiny_imagenet_data_dir=data_dir,
        hparams="batch_size=8,train_adv_method=pgdll_16_2_1,train_lp_weight=0.5",
        save_summaries_steps=1,
        save_model_steps=1,
        max_steps=2,
        moving_average_decay=0.9999,
    )
    values.update(overrides)
    return training.TrainConfig(**values)


def _values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def test_checkpoint_holds_model_step_optimizer_and_average_names(tmp_path, data_dir):
    result = training.train(_config(tmp_path, data_dir, max_steps=1))
    names = set(_values(result.checkpoint_path))
    weight = f"{SCOPE}/conv1/weights"
    assert {weight, "global_step", f"{weight}/ExponentialMovingAverage",
            f"{weight}/RMSProp", f"{weight}/RMSProp_1"} <= names
    mean = f"{SCOPE}/postnorm/moving_mean"
    assert {mean, mean + "/ExponentialMovingAverage"} <= names
    # BN statistics are averaged but not optimised.
    assert mean + "/RMSProp" not in names


def test_resume_continues_the_global_step_moving_average_and_optimizer_slots(tmp_path, data_dir):
    """Runs one step at a time, resuming each time; checks the TF1 EMA and RMSProp recurrences.

    TF1 RMSProp: ``ms' = d*ms + (1-d)*g^2``, ``mom' = m*mom + lr*g/sqrt(ms' + eps)``,
    ``var' = var - mom'``. The gradient is unknown (random crops, shuffling), so it is recovered
    twice from consecutive checkpoints: ``g^2`` from the ``ms`` slots and ``lr*g/sqrt(ms' +
    eps)`` from the ``mom`` slots. They agree only if each resumed step started from the
    previous checkpoint's slots, not fresh ones (ms=1, mom=0).
    """
    decay, momentum, epsilon, lr = 0.9, 0.9, 1.0, 0.045
    hparams = (f"batch_size=8,train_adv_method=pgdll_16_2_1,train_lp_weight=0.5,"
               f"lr_schedule=fixed,learning_rate={lr},rmsprop_decay={decay},"
               f"momentum={momentum},rmsprop_epsilon={epsilon}")
    weight = f"{SCOPE}/block1/unit_1/bottleneck_v2/conv1/weights"
    history = []
    for max_steps in (1, 2, 3):
        result = training.train(_config(tmp_path, data_dir, max_steps=max_steps, hparams=hparams))
        assert result.global_step == max_steps
        history.append(_values(result.checkpoint_path))
    for step in (2, 3):
        ema_decay = min(0.9999, (1.0 + step) / (10.0 + step))
        previous = history[step - 2][weight + "/ExponentialMovingAverage"]
        expected = ema_decay * previous + (1 - ema_decay) * history[step - 1][weight]
        np.testing.assert_allclose(history[step - 1][weight + "/ExponentialMovingAverage"],
                                   expected, rtol=1e-5, atol=1e-7)
        assert history[step - 1]["global_step"] == step
    for name in (weight, f"{SCOPE}/logits/weights"):
        for before, after in zip(history, history[1:]):
            ms0, mom0 = (before[name + s].astype(np.float64) for s in ("/RMSProp", "/RMSProp_1"))
            ms1, mom1 = (after[name + s].astype(np.float64) for s in ("/RMSProp", "/RMSProp_1"))
            # The checkpointed slots are far from fresh ones, so a reset would show.
            assert np.abs(ms0 - 1.0).max() > 1e-4 and np.abs(mom0).max() > 1e-4
            np.testing.assert_allclose(before[name] - after[name], mom1, atol=1e-6)
            g_squared_from_ms = (ms1 - decay * ms0) / (1 - decay)
            g_squared_from_mom = ((mom1 - momentum * mom0) * np.sqrt(ms1 + epsilon) / lr) ** 2
            np.testing.assert_allclose(g_squared_from_mom.sum(), g_squared_from_ms.sum(),
                                       rtol=0.02, err_msg=name)
    # Nothing to do once max_steps is reached: the step stays.
    assert training.train(_config(tmp_path, data_dir, max_steps=3,
                                  hparams=hparams)).global_step == 3


def test_finetuning_reads_shadows_excludes_and_restricts_scopes(tmp_path, data_dir):
    source = training.train(_config(tmp_path / "source", data_dir, max_steps=2))
    source_values = _values(source.checkpoint_path)
    config = _config(
        tmp_path / "finetune", data_dir, max_steps=0,
        finetune_checkpoint_path=str(tmp_path / "source"),
        finetune_exclude_pretrained_scopes=f"{SCOPE}/logits",
        finetune_trainable_scopes=f"{SCOPE}/logits,{SCOPE}/postnorm",
    )
    start = _values(training.train(config).checkpoint_path)
    ema = "/ExponentialMovingAverage"
    # Excluded: freshly initialised, not the source's values.
    assert not np.allclose(start[f"{SCOPE}/logits/weights"],
                           source_values[f"{SCOPE}/logits/weights"])
    # Trainable and not excluded: the source's moving-average shadow (which differs from the
    # plain value after two steps, so the two reads are told apart).
    assert not np.array_equal(source_values[f"{SCOPE}/postnorm/gamma" + ema],
                              source_values[f"{SCOPE}/postnorm/gamma"])
    np.testing.assert_array_equal(start[f"{SCOPE}/postnorm/gamma"],
                                  source_values[f"{SCOPE}/postnorm/gamma" + ema])
    # Frozen: the source's plain value.
    frozen = f"{SCOPE}/conv1/weights"
    np.testing.assert_array_equal(start[frozen], source_values[frozen])
    # The same for every model variable: excluded ones fresh, trainable ones in the trainable
    # scopes from their shadows, everything else (frozen weights, all moving statistics) plain.
    model_names = [n for n in start if n != "global_step" and not n.endswith(ema)
                   and "/RMSProp" not in n]
    assert len(model_names) > 20
    for name in model_names:
        trainable_kind = name.endswith(("weights", "biases", "gamma", "beta"))
        if name.startswith(f"{SCOPE}/logits/"):
            continue  # excluded: checked above
        if trainable_kind and name.startswith(f"{SCOPE}/postnorm/"):
            np.testing.assert_array_equal(start[name], source_values[name + ema], err_msg=name)
        else:
            np.testing.assert_array_equal(start[name], source_values[name], err_msg=name)
    # Only the trainable scopes get optimizer slots and change under training.
    assert f"{SCOPE}/logits/weights/RMSProp" in start and frozen + "/RMSProp" not in start
    config.max_steps = 2
    after = _values(training.train(config).checkpoint_path)
    assert not np.allclose(after[f"{SCOPE}/logits/weights"], start[f"{SCOPE}/logits/weights"])
    for name in start:
        trainable_kind = name.endswith(("weights", "biases", "gamma", "beta"))
        in_scope = name.startswith((f"{SCOPE}/logits", f"{SCOPE}/postnorm"))
        if trainable_kind and not in_scope:
            np.testing.assert_array_equal(after[name], start[name], err_msg=name)


def test_finetuning_from_an_unfitting_checkpoint_fails_clearly(tmp_path, data_dir):
    source = training.train(_config(tmp_path / "source", data_dir, max_steps=0,
                                    moving_average_decay=-1))
    assert source.global_step == 0
    config = _config(tmp_path / "other", data_dir, max_steps=0, model_name="resnet_v2_50",
                     finetune_checkpoint_path=source.checkpoint_path, moving_average_decay=-1)
    with pytest.raises(CheckpointError, match="resnet_v2_50/conv1/weights"):
        training.train(config)


def test_nan_loss_stops_training_with_an_error(tmp_path, data_dir):
    config = _config(tmp_path, data_dir,
                     hparams="batch_size=8,learning_rate=1e30,optimizer=momentum",
                     max_steps=20, moving_average_decay=-1)
    with pytest.raises(TrainingDivergedError, match="loss is (nan|inf)"):
        training.train(config)


def test_trainable_scopes_that_match_nothing_are_rejected(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, finetune_trainable_scopes="resnet_v2_50/logits")
    with pytest.raises(ConfigError, match="matches no variable"):
        training.train(config)


def test_finetuning_with_moving_average_from_a_checkpoint_without_shadows(tmp_path, data_dir):
    """The released checkpoints have no shadows: fine-tuning with the EMA on reads plain values."""
    source = training.train(_config(tmp_path / "source", data_dir, max_steps=1,
                                     moving_average_decay=-1))
    source_values = _values(source.checkpoint_path)
    config = _config(tmp_path / "finetune", data_dir, max_steps=0,
                     finetune_checkpoint_path=source.checkpoint_path,
                     finetune_trainable_scopes=f"{SCOPE}/logits,{SCOPE}/postnorm")
    start = _values(training.train(config).checkpoint_path)
    gamma = f"{SCOPE}/postnorm/gamma"
    np.testing.assert_array_equal(start[gamma], source_values[gamma])
    np.testing.assert_array_equal(start[gamma + "/ExponentialMovingAverage"], source_values[gamma])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_training_keeps_float32_state_and_eval_agrees(tmp_path, data_dir, dtype):
    from adversarial_logit_pairing import evaluation

    result = training.train(_config(tmp_path, data_dir, max_steps=3, compute_dtype=dtype))
    assert np.isfinite(result.last_losses["total_loss"])
    values = _values(result.checkpoint_path)
    floating = {name: v.dtype for name, v in values.items() if np.issubdtype(v.dtype, np.floating)}
    assert set(floating.values()) == {np.dtype(np.float32)}
    assert ("loss_scale/current" in values) == (dtype == "float16")

    def logits(compute_dtype):
        path = tmp_path / f"pred_{compute_dtype}.npz"
        evaluation.run(evaluation.EvalConfig(
            checkpoint_path=result.checkpoint_path, model_name=MODEL, dataset="tiny_imagenet",
            dataset_image_size=32, hparams="eval_batch_size=8", tiny_imagenet_data_dir=data_dir,
            compute_dtype=compute_dtype, predictions_file=str(path)))
        return np.load(path)["logits"]

    # Three steps leave a model that predicts one or two classes, so top-1 agreement would
    # say nothing: compare the logits with how much they vary from image to image.
    low, reference = logits(dtype), logits("float32")
    variation = reference - reference.mean(axis=0)
    spread = np.sqrt(np.mean(variation**2))
    error = low - reference
    assert low.shape == reference.shape == (32, 200) and spread > 1e-2
    assert np.abs(error).max() > 1e-6  # the evaluation really ran in the low dtype
    # bfloat16 keeps 8 bits of mantissa: about 2% of the spread here (float16: 0.3%).
    assert np.sqrt(np.mean(error**2)) < 0.05 * spread
    assert np.abs(error).max() < 0.25 * spread
