"""Tiny models for the strong-attack tests (builders, no tests), whose answers are known."""

import numpy as np
import tensorflow as tf


class LinearModel(tf.Module):
    """``z = W . flat(x) + b``: the minimal L-inf distance from x to the y/t boundary is
    ``|z_y - z_t| / ||w_y - w_t||_1`` (while the box is not reached)."""

    def __init__(self, shape=(4, 4, 3), num_classes=5, seed=0, quantize=None, bias_scale=1.0):
        rng = np.random.default_rng(seed)
        self.size = int(np.prod(shape))
        self.w = rng.normal(0, 1, (self.size, num_classes)).astype(np.float32)
        # A larger bias spreads the classes: larger minimal perturbations.
        self.b = rng.normal(0, bias_scale, num_classes).astype(np.float32)
        self.quantize = quantize
        self.traces = 0

    def __call__(self, x):
        self.traces += 1
        if self.quantize:
            # Input quantisation: tf.round has no gradient, so every gradient attack sees zero.
            x = tf.round(x * self.quantize) / self.quantize
        return tf.reshape(x, [tf.shape(x)[0], -1]) @ self.w + self.b

    def minimal_distance(self, x):
        """The analytic minimal L-inf perturbation changing the prediction, per image."""
        flat = np.asarray(x).reshape(len(x), -1)
        z = flat @ self.w + self.b
        y = z.argmax(1)
        out = []
        for n in range(len(x)):
            out.append(min(
                abs(z[n, y[n]] - z[n, t]) / np.abs(self.w[:, y[n]] - self.w[:, t]).sum()
                for t in range(z.shape[1]) if t != y[n]))
        return np.array(out)


class TwoLayerNet(tf.Module):
    """A small non-linear classifier (flatten, tanh layer, linear layer)."""

    def __init__(self, shape=(8, 8, 3), num_classes=5, hidden=16, scale=1.5, seed=0):
        rng = np.random.default_rng(seed)
        size = int(np.prod(shape))
        # A larger scale saturates more tanh units: a more non-linear loss surface.
        self.w1 = tf.constant(rng.normal(0, scale / np.sqrt(size), (size, hidden)), tf.float32)
        self.w2 = tf.constant(rng.normal(0, 1.0, (hidden, num_classes)), tf.float32)
        self.traces = 0

    def __call__(self, x):
        self.traces += 1
        return tf.nn.tanh(tf.reshape(x, [tf.shape(x)[0], -1]) @ self.w1) @ self.w2


def images(n, shape=(8, 8, 3), seed=1, low=-1.0, high=1.0):
    return np.random.default_rng(seed).uniform(low, high, (n,) + tuple(shape)).astype(np.float32)


def predictions(model, x):
    return model(tf.constant(x)).numpy().argmax(1)
