"""A linear classifier with the registered models' interface, whose answers numpy can give.

``make_train_step`` and the attacks see it as they see ``inception_v3``: ``model(x,
is_training)``, ``model.inference``, ``model.config`` (a real ``ModelConfig``) and, with an
``aux_loss_weight``, ``logits_and_aux`` (a second linear head). It has no batch norm and no
dropout, so its training-mode logits are its inference-mode logits, and tracing it is cheap.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.models import get_model_config


class LinearClassifier(tf.Module):
    def __init__(self, shape, num_classes, aux_loss_weight=None, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        size = int(np.prod(shape))
        self.w = tf.Variable(rng.normal(0, 1, (size, num_classes)).astype(np.float32),
                             name="linear/weights")
        self.b = tf.Variable(rng.normal(0, 1, num_classes).astype(np.float32),
                             name="linear/biases")
        self.w_aux = None
        if aux_loss_weight is not None:
            self.w_aux = tf.Variable(rng.normal(0, 1, (size, num_classes)).astype(np.float32),
                                     name="aux/weights")
        self.config = dataclasses.replace(get_model_config("resnet_v2_tiny"), name="linear",
                                          aux_loss_weight=aux_loss_weight)

    @property
    def trainable_variables(self):
        return tuple(v for v in (self.w, self.b, self.w_aux) if v is not None)

    def _flat(self, x):
        return tf.reshape(x, [tf.shape(x)[0], -1])

    def __call__(self, x, is_training):
        return self._flat(x) @ self.w + self.b

    def logits_and_aux(self, x, is_training):
        return self(x, is_training), self._flat(x) @ self.w_aux

    def inference(self, x):
        return self(x, is_training=False)

    def numpy_heads(self, x):
        """(logits, aux logits or None) in float64, from the current weights."""
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        z = flat @ self.w.numpy().astype(np.float64) + self.b.numpy()
        aux = None if self.w_aux is None else flat @ self.w_aux.numpy().astype(np.float64)
        return z, aux


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def smoothed_one_hot(labels, num_classes, smoothing=0.1):
    y = np.full((len(labels), num_classes), smoothing / num_classes)
    y[np.arange(len(labels)), labels] += 1 - smoothing
    return y


def smoothed_xent(logits, labels, smoothing=0.1):
    """Per-example softmax cross-entropy of smoothed one-hot labels, in float64."""
    z = np.asarray(logits, np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return -(smoothed_one_hot(labels, z.shape[1], smoothing) * log_p).sum(1)


def hand_gradient(model, x, aux_weight=0.0):
    """d/dx of Step-LL's loss ``CE(z) + aux_weight * CE(z_aux)`` per example, with ``y`` the
    smoothed one-hot least-likely class of ``z``: for linear heads ``(softmax(z) - y) @ W.T``."""
    z, aux = model.numpy_heads(x)
    y = smoothed_one_hot(z.argmin(axis=1), z.shape[1])
    grad = (softmax(z) - y) @ model.w.numpy().T
    if aux_weight:
        grad = grad + aux_weight * (softmax(aux) - y) @ model.w_aux.numpy().T
    return grad.reshape(np.shape(x))


def hand_step_ll(model, x, eps, aux_weight=0.0, bounds=(-1.0, 1.0)):
    """Step-LL by hand: ``clip(x - eps * sign(hand_gradient))``."""
    return np.clip(x - eps * np.sign(hand_gradient(model, x, aux_weight)), *bounds)


def one_train_step(model, hparams, images, labels, num_classes):
    """The outputs of one step of ``training.make_train_step`` (no strategy, no moving average,
    the hparams' optimizer, learning rate 0.01), with the step's adversarial images."""
    from adversarial_logit_pairing import model_lib, training

    trainable = list(model.trainable_variables)
    optimizer = model_lib.get_optimizer(hparams, 0.01)
    optimizer.build(trainable)
    step = training.make_train_step(tf.distribute.get_strategy(), model, trainable, optimizer,
                                    None, tf.Variable(0, dtype=tf.int64), hparams, num_classes,
                                    (-1.0, 1.0), num_summary_images=len(labels))
    return step(tf.constant(images), tf.constant(labels, tf.int64))
