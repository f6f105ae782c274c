"""AdvProp: auxiliary batch norms in the training step, checkpoints, evaluation, fine-tuning.

One AdvProp training step (``training.make_train_step`` on ``training.build_train_state``, as
``train.py`` runs it) of resnet_v2_tiny (fused batch norm) and of a small EfficientNet from the
same code (tensorflow/tpu's non-fused batch norm) at 16x16 is checked against references
built outside the AdvProp code: copies of the network without twins, one holding the main
batch norms' values and one the auxiliary ones', run in the modes the paper prescribes, and
the loss computed in numpy. The twins start with values different from the main batch norms
so that every mix-up shows.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import (
    adversarial_attack,
    advprop,
    checkpoints,
    evaluation,
    export,
    model_lib,
    training,
)
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.models import efficientnet, get_model_config, register_model
from tests.data_builders import write_tiny_imagenet_tfrecords

NUM_CLASSES = 200  # tiny_imagenet, so that training.validate gives the plan of these runs
SIZE, BATCH = 16, 4
BOUNDS = (-1.0, 1.0)
ATTACK = "pgd_16_4_2"
HPARAMS = (f"batch_size={BATCH},train_adv_method={ATTACK},train_lp_weight=0.5,advprop=true,"
           "label_smoothing=0.1,weight_decay=0.001,optimizer=momentum,learning_rate=0.1")
EMA = "/ExponentialMovingAverage"
TINY_EFFICIENTNET = "efficientnet_tiny_test"


def _register_tiny_efficientnet():
    """EfficientNet's code at width 0.25, depth 0.1 (7 blocks), 16 px, no dropout/drop-connect
    (so that a training pass is deterministic)."""
    config = dataclasses.replace(get_model_config("efficientnet_b0_ap"), name=TINY_EFFICIENTNET,
                                 default_image_size=SIZE)
    spec = efficientnet.EfficientNetSpec(0.25, 0.1, 0.0)

    def build(config, num_classes, seed=None, compute_dtype=tf.float32):
        return efficientnet.EfficientNet(spec, config.scope, num_classes, config, seed,
                                         compute_dtype, drop_connect_rate=0.0)

    register_model(build, config)


_register_tiny_efficientnet()


def _hparams(text=HPARAMS):
    return model_lib.default_hparams().parse(text)


def _state(model_name, hparams_text=HPARAMS, ema=0.99, seed=0):
    return training.build_train_state(tf.distribute.get_strategy(), model_name, NUM_CLASSES,
                                      _hparams(hparams_text), examples_per_epoch=100,
                                      moving_average_decay=ema, seed=seed)


def _aux_names(names):
    return [name for name in names if f"/{advprop.AUX_SCOPE}/" in name]


def _main_name(aux_name):
    return aux_name.replace(f"/{advprop.AUX_SCOPE}/", "/")


def _make_twins_differ(model):
    """Moves each twin away from its main batch norm (the values stay well-conditioned)."""
    for _, twin in advprop.batch_norm_pairs(model):
        for name, variable in twin.variables_by_name.items():
            kind = name.rsplit("/", 1)[1]
            shift = {"gamma": 0.5, "beta": 0.3, "moving_mean": 0.2, "moving_variance": 1.0}[kind]
            variable.assign(variable + shift)


def _copy_of(model_name, values):
    """The network without twins, holding ``values`` (TF1 name -> array) in its variables."""
    model = model_lib.get_model(model_name, NUM_CLASSES)
    for name, variable in model.variables_by_name.items():
        variable.assign(values[name])
    return model


def _xent(one_hot, logits, smoothing):
    one_hot = one_hot * (1 - smoothing) + smoothing / one_hot.shape[-1]
    z = logits - logits.max(axis=1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.mean(-(one_hot * log_softmax).sum(axis=1)))


@pytest.fixture(scope="module")
def one_step():
    """One AdvProp step of resnet_v2_tiny; the values before and after it, its outputs, the
    inputs."""
    model_name = "resnet_v2_tiny"
    tf.random.set_seed(0)
    state = _state(model_name)
    model = state.model
    _make_twins_differ(model)
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(-1, 1, (BATCH, SIZE, SIZE, 3)), tf.float32)
    labels = tf.constant(rng.integers(0, NUM_CLASSES, BATCH), tf.int64)
    before = {name: v.numpy() for name, v in model.variables_by_name.items()}
    trainable = [model_lib.variable_name(v) for v in state.trainable]
    step = training.make_train_step(
        tf.distribute.get_strategy(), model, state.trainable, state.optimizer, state.ema,
        state.global_step, _hparams(), NUM_CLASSES, BOUNDS, seed=7, num_summary_images=BATCH)
    outputs = {k: v.numpy() for k, v in step(images, labels).items()}
    after = {name: v.numpy() for name, v in model.variables_by_name.items()}
    return dict(model_name=model_name, before=before, after=after, outputs=outputs,
                images=images, labels=labels, trainable=trainable)


def _main_and_aux_values(values):
    """(values of the network with the main BNs, values with the auxiliary BNs as main)."""
    main = {name: v for name, v in values.items() if f"/{advprop.AUX_SCOPE}/" not in name}
    aux = dict(main)
    aux.update({_main_name(name): values[name] for name in _aux_names(values)})
    return main, aux


def test_the_attack_runs_through_the_auxiliary_batch_norms(one_step):
    """The step's adversarial batch is PGD (same seed) against the network whose batch norms
    hold the auxiliary values, in inference mode; not the one with the main values."""
    main_values, aux_values = _main_and_aux_values(one_step["before"])
    # The step's attack seed: (seed, global step) with one replica.
    seed = tf.constant([7, 0], tf.int64)
    made = {}
    for which, values in (("aux", aux_values), ("main", main_values)):
        reference = _copy_of(one_step["model_name"], values)
        attack = tf.function(adversarial_attack.generate_adversarial_examples)
        made[which] = attack(one_step["images"], BOUNDS, reference.inference, ATTACK,
                             seed=seed).numpy()
    adv = one_step["outputs"]["adv_images"]
    np.testing.assert_allclose(adv, made["aux"], atol=1e-5)
    assert np.abs(adv - made["main"]).max() > 0.05


def test_each_batch_norm_set_moves_only_with_its_own_half(one_step):
    """Main moving statistics follow the clean batch alone, auxiliary ones the adversarial
    batch alone: as two separate training-mode passes of the plain network."""
    main_values, aux_values = _main_and_aux_values(one_step["before"])
    clean_ref = _copy_of(one_step["model_name"], main_values)
    clean_ref(one_step["images"], is_training=True)
    adv_ref = _copy_of(one_step["model_name"], aux_values)
    adv_ref(tf.constant(one_step["outputs"]["adv_images"]), is_training=True)
    after = one_step["after"]
    statistics = [n for n in clean_ref.variables_by_name if n.endswith(("moving_mean",
                                                                         "moving_variance"))]
    assert len(statistics) >= 20
    for name in statistics:
        aux_name = name.rsplit("/", 1)[0] + f"/{advprop.AUX_SCOPE}/" + name.rsplit("/", 1)[1]
        # Both moved in this step...
        assert not np.allclose(after[name], one_step["before"][name], rtol=0, atol=1e-6), name
        assert not np.allclose(after[aux_name], one_step["before"][aux_name], rtol=0,
                               atol=1e-6), aux_name
        # ...each with its own half.
        np.testing.assert_allclose(after[name], clean_ref.variables_by_name[name].numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(after[aux_name], adv_ref.variables_by_name[name].numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=aux_name)


def test_non_fused_batch_norms_route_through_their_twins_in_both_modes():
    """tensorflow/tpu's non-fused batch norm (EfficientNet): inside the block, inference uses
    the twins' statistics and a training pass moves the twins' statistics, not the main ones."""
    model = model_lib.get_model(TINY_EFFICIENTNET, NUM_CLASSES, seed=0)
    assert advprop.add_auxiliary_batch_norms(model) == 2 + 3 * 7 - 1  # stem, head, blocks
    _make_twins_differ(model)
    before = {name: v.numpy() for name, v in model.variables_by_name.items()}
    main_values, aux_values = _main_and_aux_values(before)
    images = tf.random.stateless_uniform([BATCH, SIZE, SIZE, 3], [3, 4], -1, 1)
    with advprop.auxiliary_batch_norms(model):
        inferred = model(images, is_training=False).numpy()
        model(images, is_training=True)
    np.testing.assert_allclose(
        inferred, _copy_of(TINY_EFFICIENTNET, aux_values)(images, is_training=False).numpy(),
        rtol=1e-5, atol=1e-6)
    reference = _copy_of(TINY_EFFICIENTNET, aux_values)
    reference(images, is_training=True)
    for name, variable in model.variables_by_name.items():
        if not name.endswith("moving_variance"):
            continue
        if f"/{advprop.AUX_SCOPE}/" in name:
            np.testing.assert_allclose(
                variable.numpy(), reference.variables_by_name[_main_name(name)].numpy(),
                rtol=1e-5, err_msg=name)
            assert not np.allclose(variable.numpy(), before[name]), name
        else:
            np.testing.assert_array_equal(variable.numpy(), main_values[name], err_msg=name)


def test_the_loss_is_the_clean_loss_plus_the_adversarial_loss(one_step):
    """total = xent(clean, main BNs) + xent(adversarial, auxiliary BNs) (each a batch mean,
    label smoothing 0.1) + 0.5 * mean((clean - adversarial logits)^2) + 0.001 * sum(v^2) / 2
    over every trainable variable, twins' gamma and beta included; computed in numpy."""
    before = one_step["before"]
    main_values, aux_values = _main_and_aux_values(before)
    clean = _copy_of(one_step["model_name"], main_values)(
        one_step["images"], is_training=True).numpy().astype(np.float64)
    adversarial = _copy_of(one_step["model_name"], aux_values)(
        tf.constant(one_step["outputs"]["adv_images"]), is_training=True).numpy().astype(
        np.float64)
    one_hot = np.eye(NUM_CLASSES)[one_step["labels"].numpy()]
    xent = _xent(one_hot, clean, 0.1) + _xent(one_hot, adversarial, 0.1)
    pairing = 0.5 * np.mean((clean - adversarial) ** 2)
    assert _aux_names(one_step["trainable"])
    decay = 0.001 * sum(0.5 * np.sum(before[name].astype(np.float64) ** 2)
                        for name in one_step["trainable"])
    outputs = one_step["outputs"]
    np.testing.assert_allclose(outputs["loss_xent"], xent, rtol=1e-5)
    np.testing.assert_allclose(outputs["loss_lp"], pairing, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(outputs["loss_wd"], decay, rtol=1e-5)
    np.testing.assert_allclose(outputs["total_loss"], xent + pairing + decay, rtol=1e-5)


def _save_training_checkpoint(directory, state):
    return checkpoints.save(state.checkpoint_variables(), str(directory), 1)


def test_evaluation_and_export_never_read_the_auxiliary_batch_norms(tmp_path):
    """A training checkpoint holds the twins (and their shadows) and a restart resumes them;
    eval.py's Evaluator and export read only the main variables: with the twins set to NaN
    they give the same logits as from a checkpoint without any twin."""
    state = _state("resnet_v2_tiny")
    _make_twins_differ(state.model)
    for name, variable in state.model.variables_by_name.items():
        if name.endswith("moving_mean"):
            variable.assign(variable + 0.1)  # main statistics away from their init
        if f"/{advprop.AUX_SCOPE}/" in name:
            variable.assign(tf.fill(variable.shape, np.nan))
            state.ema.shadow(name).assign(tf.fill(variable.shape, np.nan))
    with_twins = _save_training_checkpoint(tmp_path / "train", state)
    stored = tf.train.load_checkpoint(with_twins).get_variable_to_shape_map()
    twins = _aux_names(state.model.variables_by_name)
    assert len(twins) == 4 * 10  # 10 batch norms x (gamma, beta, moving mean and variance)
    assert set(twins) | {name + EMA for name in twins} <= set(stored)
    # The same checkpoint without the twins, written by TF1.
    reader = tf.train.load_checkpoint(with_twins)
    without_twins = _write_tf1_checkpoint(
        str(tmp_path / "plain/model.ckpt"),
        {name: reader.get_tensor(name) for name in stored if "/aux/" not in name})
    # Evaluation (clean, with the shadows as eval.py's default) and export.
    data_dir = str(tmp_path / "data")
    write_tiny_imagenet_tfrecords(data_dir, num_train=0, num_val=8, image_size=SIZE)
    config = evaluation.EvalConfig(
        model_name="resnet_v2_tiny", dataset="tiny_imagenet", dataset_image_size=SIZE,
        tiny_imagenet_data_dir=data_dir, hparams="eval_batch_size=4", moving_average_decay=0.99,
        num_examples=8)
    evaluator = evaluation.Evaluator(config)
    logits = []
    for prefix in (with_twins, without_twins):
        config.predictions_file = str(tmp_path / f"predictions{len(logits)}.npz")
        evaluator.evaluate(prefix)
        logits.append(np.load(config.predictions_file)["logits"])
    assert not _aux_names(evaluator.model.variables_by_name)
    assert np.isfinite(logits[0]).all()
    np.testing.assert_array_equal(logits[0], logits[1])
    images = tf.random.stateless_uniform([BATCH, SIZE, SIZE, 3], [1, 2], -1, 1)
    for decay in (0.99, -1):
        exported = [export.restore_model(prefix, "resnet_v2_tiny", NUM_CLASSES, decay)(
            images, is_training=False).numpy() for prefix in (with_twins, without_twins)]
        assert np.isfinite(exported[0]).all()
        np.testing.assert_array_equal(exported[0], exported[1])
    # A restart resumes the twins with the rest of the training state.
    resumed = _state("resnet_v2_tiny", seed=3)
    config = training.TrainConfig(output_dir=str(tmp_path / "train"),
                                  model_name="resnet_v2_tiny", dataset="tiny_imagenet",
                                  hparams=HPARAMS, moving_average_decay=0.99)
    assert training.restore_or_finetune(resumed, config, training.validate(config)) == with_twins
    for name, variable in resumed.model.variables_by_name.items():
        np.testing.assert_array_equal(variable.numpy(),
                                      state.model.variables_by_name[name].numpy())
        np.testing.assert_array_equal(resumed.ema.shadow(name).numpy(),
                                      state.ema.shadow(name).numpy())


def _write_tf1_checkpoint(prefix, values):
    """A TF1 Saver checkpoint of ``values`` (name -> array), as the released ones are."""
    with tf.Graph().as_default():
        variables = [tf.compat.v1.get_variable(name, initializer=tf.constant(value))
                     for name, value in values.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            return saver.save(session, prefix)


def _released_values(with_twins):
    """Values of a released-like checkpoint: every batch-norm variable away from its init."""
    rng = np.random.default_rng(5)
    model = model_lib.get_model("resnet_v2_tiny", NUM_CLASSES, seed=11)
    if with_twins:
        advprop.add_auxiliary_batch_norms(model)
    values = {}
    for name, variable in model.variables_by_name.items():
        value = variable.numpy()
        if name.endswith(("gamma", "beta", "moving_mean", "moving_variance")):
            value = value + rng.uniform(0.1, 0.5, value.shape).astype(np.float32)
        values[name] = value
    return values


def _finetune(tmp_path, source_prefix):
    state = _state("resnet_v2_tiny", seed=2)
    config = training.TrainConfig(output_dir=str(tmp_path / "run"), model_name="resnet_v2_tiny",
                                  dataset="tiny_imagenet", hparams=HPARAMS,
                                  moving_average_decay=0.99,
                                  finetune_checkpoint_path=source_prefix)
    assert training.restore_or_finetune(state, config, training.validate(config)) is None
    return state


def test_finetuning_from_a_checkpoint_without_twins_copies_the_main_batch_norms(tmp_path):
    values = _released_values(with_twins=False)
    state = _finetune(tmp_path, _write_tf1_checkpoint(str(tmp_path / "released/model.ckpt"),
                                                      values))
    model_values = state.model.variables_by_name
    aux = _aux_names(model_values)
    assert len(aux) == 40
    for name in aux:
        expected = values[_main_name(name)]
        np.testing.assert_array_equal(model_values[name].numpy(), expected, err_msg=name)
        np.testing.assert_array_equal(state.ema.shadow(name).numpy(), expected, err_msg=name)
    for name, value in values.items():
        np.testing.assert_array_equal(model_values[name].numpy(), value, err_msg=name)


def test_finetuning_from_a_checkpoint_with_twins_reads_them(tmp_path):
    values = _released_values(with_twins=True)
    for name in _aux_names(values):
        values[name] = values[name] + 1.0  # the checkpoint's twins differ from its main BNs
    state = _finetune(tmp_path, _write_tf1_checkpoint(str(tmp_path / "advprop/model.ckpt"),
                                                      values))
    for name, variable in state.model.variables_by_name.items():
        np.testing.assert_array_equal(variable.numpy(), values[name], err_msg=name)


def test_advprop_needs_an_attack_and_batch_norms():
    config = training.TrainConfig(output_dir="/tmp/unused", model_name="resnet_v2_tiny",
                                  dataset="tiny_imagenet",
                                  hparams="advprop=true,train_adv_method=clean")
    with pytest.raises(ConfigError, match="advprop=true .*needs an attack"):
        training.validate(config)
    # Each BN set sees only its own half: no mixed batch, no auxiliary-head loss.
    for model_name, hparams in (
            ("resnet_v2_tiny", "advprop=true,train_adv_method=pgd_2_1_3,train_adv_fraction=0.5"),
            ("inception_v3", "advprop=true,train_adv_method=pgd_2_1_3")):
        config = training.TrainConfig(output_dir="/tmp/unused", model_name=model_name,
                                      dataset="tiny_imagenet", hparams=hparams)
        with pytest.raises(ConfigError, match="'advprop': not combined"):
            training.validate(config)
    config = training.TrainConfig(output_dir="/tmp/unused", model_name="inception_v3",
                                  dataset="tiny_imagenet",
                                  hparams="advprop=true,train_adv_method=pgd_2_1_3,"
                                          "aux_loss_weight=0")
    training.validate(config)
    model = model_lib.get_model("resnet_v2_tiny", NUM_CLASSES)
    advprop.add_auxiliary_batch_norms(model)
    with pytest.raises(ConfigError, match="already has auxiliary"):
        advprop.add_auxiliary_batch_norms(model)
