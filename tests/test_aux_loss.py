"""The auxiliary head in training (``aux_loss_weight``) and in the step-LL attacks' loss."""

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import adversarial_attack, training
from adversarial_logit_pairing.errors import ConfigError
from adversarial_logit_pairing.hparams import default_hparams
from adversarial_logit_pairing.models import get_model_config, inception_v3
from tests.linear_classifiers import (
    LinearClassifier,
    hand_step_ll,
    one_train_step,
    smoothed_xent,
)

NUM_CLASSES = 5
SHAPE = (4, 4, 3)
EPS_8 = 8 * 2.0 / 255


def test_the_registry_gives_inception_its_aux_loss_weight_and_other_models_none(tmp_path):
    inception = get_model_config("inception_v3")
    assert inception.aux_loss_weight == 0.4
    assert callable(getattr(inception_v3.InceptionV3, "logits_and_aux", None))
    assert default_hparams(inception).aux_loss_weight == 0.4
    assert "aux_loss_weight" not in default_hparams(get_model_config("resnet_v2_50"))

    def validate(model_name, hparams):
        return training.validate(training.TrainConfig(
            str(tmp_path), model_name=model_name, dataset="tiny_imagenet", hparams=hparams))

    assert validate("inception_v3", "aux_loss_weight=0.25").hparams.aux_loss_weight == 0.25
    with pytest.raises(ConfigError, match="unknown hparam 'aux_loss_weight'"):
        validate("resnet_v2_tiny", "aux_loss_weight=0.4")
    with pytest.raises(ConfigError, match="aux_loss_weight=-0.5 must be >= 0"):
        validate("inception_v3", "aux_loss_weight=-0.5")


def test_step_ll_loss_of_a_model_with_an_aux_head_adds_its_registered_weight():
    """eval.py's call: ``model.inference`` of a model whose config has aux_loss_weight 0.4."""
    model = LinearClassifier(SHAPE, NUM_CLASSES, aux_loss_weight=0.4, seed=3)
    x = np.random.default_rng(1).uniform(-1, 1, (8,) + SHAPE).astype(np.float32)
    adv = adversarial_attack.generate_adversarial_examples(
        tf.constant(x), (-1.0, 1.0), model.inference, "stepll_8").numpy()
    expected = hand_step_ll(model, x, EPS_8, aux_weight=0.4)
    np.testing.assert_allclose(adv, expected, atol=1e-6)
    # The auxiliary head changes the step here: the test tells the two losses apart.
    assert np.mean(expected != hand_step_ll(model, x, EPS_8)) > 0.05


def test_training_loss_adds_the_weighted_aux_cross_entropy():
    """train.py's ALP step with stepll_8 and aux_loss_weight=0.25: loss_aux is 0.25 x the
    label-smoothed cross-entropy of the auxiliary logits of [clean; adversarial], by hand from
    the weights before the step; the attack keeps the registered 0.4 (an attack description
    means the same in training and evaluation)."""
    model = LinearClassifier(SHAPE, NUM_CLASSES, aux_loss_weight=0.4, seed=3)
    hp = default_hparams(model.config).parse(
        "batch_size=4,train_adv_method=stepll_8,aux_loss_weight=0.25,weight_decay=0.0,"
        "lr_schedule=fixed,learning_rate=0.01")
    x = np.random.default_rng(2).uniform(-1, 1, (4,) + SHAPE).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    adv = hand_step_ll(model, x, EPS_8, aux_weight=0.4)
    logits, aux = model.numpy_heads(np.concatenate([x, adv]))
    both = np.concatenate([labels, labels])
    expected_xent = smoothed_xent(logits, both).mean()
    expected_aux = 0.25 * smoothed_xent(aux, both).mean()
    aux_before = model.w_aux.numpy().copy()

    outputs = one_train_step(model, hp, x, labels, NUM_CLASSES)
    np.testing.assert_allclose(outputs["adv_images"].numpy(), adv, atol=1e-6)
    assert float(outputs["loss_xent"]) == pytest.approx(expected_xent, rel=1e-5)
    assert float(outputs["loss_aux"]) == pytest.approx(expected_aux, rel=1e-5)
    assert float(outputs["total_loss"]) == pytest.approx(expected_xent + expected_aux, rel=1e-5)
    assert not np.allclose(model.w_aux.numpy(), aux_before)  # the aux head is trained
    assert "loss_aux" in training.SCALAR_OUTPUTS  # written to TensorBoard with the others
