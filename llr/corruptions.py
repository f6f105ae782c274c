"""Common corruptions (Hendrycks & Dietterich's ImageNet-C) at a chosen severity.

The challenge's ``common_corruptions`` attack corrupted each image with 17 ImageNet-C
corruptions at severity 1 and kept, per image, the corruption with the largest wrong-class
logit. Ten of them are implemented here with ImageNet-C's parameters, written in numpy and
TensorFlow (no imagenet-c, PIL, scikit-image or OpenCV dependency at run time: JPEG goes
through TF's libjpeg, as PIL's does, and ``pixelate``'s box resizes are TF's area resize,
close to PIL's BOX filter but not bit-equal);
the blurs that need OpenCV or Wand
(defocus, glass, motion, zoom), fog, frost, snow, spatter and elastic are not.

Like the challenge, images go through uint8 (``floor(x * 255)``) before corrupting.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from adversarial_logit_pairing.errors import ConfigError

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Severity 1..5 parameters of ImageNet-C.
_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_NOISE = (60, 25, 12, 5, 3)
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
_SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)
_GAUSSIAN_BLUR = (1, 2, 3, 4, 6)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _GAUSSIAN_NOISE[severity - 1]
    x = _unit(x)
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1)


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _SHOT_NOISE[severity - 1]
    return np.clip(rng.poisson(_unit(x) * c) / c, 0, 1)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on a fraction of the values (each channel on its own), half each."""
    amount = _IMPULSE_NOISE[severity - 1]
    x = _unit(x)
    flipped = rng.random(x.shape) < amount
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return x


def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _SPECKLE_NOISE[severity - 1]
    x = _unit(x)
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    # scipy.ndimage.gaussian_filter's kernel (what skimage's gaussian uses): radius 4 sigma.
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian blur of each channel, edges extended ('nearest')."""
    del rng
    kernel = _gaussian_kernel(_GAUSSIAN_BLUR[severity - 1])
    radius = len(kernel) // 2
    x = _unit(x)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="edge")
        length = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + length), axis=axis)
                for i, w in enumerate(kernel))
    return np.clip(x, 0, 1)


def _hsv_channel(x: np.ndarray, channel: int, scale: float, shift: float) -> np.ndarray:
    hsv = tf.image.rgb_to_hsv(_unit(x)).numpy()
    hsv[..., channel] = np.clip(hsv[..., channel] * scale + shift, 0, 1)
    return np.clip(tf.image.hsv_to_rgb(hsv).numpy(), 0, 1)


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    return _hsv_channel(x, 2, 1.0, _BRIGHTNESS[severity - 1])


def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    scale, shift = _SATURATE[severity - 1]
    return _hsv_channel(x, 1, scale, shift)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    c = _CONTRAST[severity - 1]
    x = _unit(x)
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1)


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    encoded = tf.io.encode_jpeg(x, quality=_JPEG_QUALITY[severity - 1])
    return _unit(tf.io.decode_jpeg(encoded, channels=3).numpy())


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to ``c`` times the size, box-upsample back."""
    del rng
    c = _PIXELATE[severity - 1]
    height, width = x.shape[:2]
    small = tf.image.resize(x, (max(1, int(height * c)), max(1, int(width * c))), method="area")
    small = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)  # PIL keeps uint8
    restored = tf.image.resize(small, (height, width), method="area")
    return _unit(tf.clip_by_value(tf.round(restored), 0, 255).numpy().astype(np.uint8))


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
}


def check_names(names, severity: int = 1) -> list[str]:
    """Validates corruption names and the severity; returns the names as a list.

    Raises:
      ConfigError: an unknown name or a severity outside 1..5.
    """
    names = list(names)
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown or not names:
        raise ConfigError(f"unknown corruption(s) {unknown or names}: choose from "
                          f"{', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ConfigError(f"corruption severity must be 1..5, got {severity}")
    return names


def corrupt(images: np.ndarray, name: str, severity: int = 1, seed: int = 0) -> np.ndarray:
    """Applies one corruption to float images [N,H,W,3] in [0,1]; returns float32 in [0,1].

    Raises:
      ConfigError: an unknown name or severity.
    """
    check_names([name], severity)
    rng = np.random.default_rng(seed)
    quantised = (np.clip(np.asarray(images), 0, 1) * 255).astype(np.uint8)
    return np.stack([CORRUPTIONS[name](image, severity, rng) for image in quantised]
                    ).astype(np.float32)


def worst_corruption(model_fn, images: np.ndarray, labels: np.ndarray, names,
                     severity: int = 1, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Per image, the corruption with the largest wrong-class logit (the challenge's choice).

    Returns:
      The chosen corrupted images [N,H,W,3] and the name of each image's corruption.
    """
    names = check_names(names, severity)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    best = best_wrong = chosen = None
    for index, name in enumerate(names):
        candidate = corrupt(images, name, severity, seed + index)
        logits = np.asarray(model_fn(candidate))
        # Largest logit of a class other than the true one.
        masked = logits.copy()
        masked[rows, labels] = -np.inf
        wrong = masked.max(axis=1)
        if best is None:
            best, best_wrong, chosen = candidate, wrong, np.zeros(len(labels), np.int64)
            continue
        better = wrong > best_wrong
        best = np.where(better[:, None, None, None], candidate, best)
        best_wrong = np.where(better, wrong, best_wrong)
        chosen = np.where(better, index, chosen)
    return best, [names[i] for i in chosen]
