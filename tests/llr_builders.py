"""Builders shared by the llr tests: real photo folders and stand-in TF1 hub modules.

The photos are crops and flips of scikit-learn's two bundled sample photographs (china.jpg, a
temple, for "bicycle"; flower.jpg for "bird"), written as JPEG files in the challenge's
``<split>/{bicycle,bird}/<id>.jpg`` layout. Their classes are arbitrary: the tests check the
pipeline, not the classifier.
"""

import os
import shutil

import numpy as np
import tensorflow as tf
from PIL import Image

from llr import tf1_hub_format

# (top, left, height, width, mirrored) of each crop, in pixels of the 427x640 sample photos.
CROPS = ((0, 0, 200, 200, False), (100, 300, 180, 180, True), (227, 440, 200, 200, False),
         (50, 150, 150, 220, True))


def sample_photos() -> dict:
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    names = [os.path.basename(path) for path in bunch.filenames]
    photos = dict(zip(names, bunch.images))
    return {"bicycle": photos["china.jpg"], "bird": photos["flower.jpg"]}


def write_photo_folder(data_dir: str, split: str = "test", per_class: int = 4,
                       size: int = 96) -> str:
    """Writes ``per_class`` JPEG crops per class; crop 4 is left non-square on purpose."""
    photos = sample_photos()
    for class_name, photo in photos.items():
        folder = os.path.join(data_dir, split, class_name)
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            top, left, height, width, mirrored = CROPS[index % len(CROPS)]
            crop = Image.fromarray(photo[top:top + height, left:left + width])
            if mirrored:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            scale = size / min(height, width)
            crop = crop.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
            crop.save(os.path.join(folder, f"{class_name}{index:03d}.jpg"), "JPEG", quality=90)
    return data_dir


def write_standin_pair(root: str, seed: int = 0, centre_on=None) -> tuple:
    """Stand-in latents and linear modules in the TF1 Hub format under ``root``.

    With ``centre_on`` (a batch of [0,1] images), the linear module's bird bias is shifted so
    that the median bird logit on those images is zero: the stand-in then predicts both
    classes, which makes accuracies informative.
    """
    latents = tf1_hub_format.write_latents_standin(os.path.join(root, "latents"), seed=seed)
    linear = os.path.join(root, "linear")
    tf1_hub_format.write_linear_standin(linear, seed=seed + 1)
    if centre_on is not None:
        from llr import hub_model

        logits = hub_model.load(latents, linear).bird_logit(centre_on).numpy()
        shutil.rmtree(linear)
        tf1_hub_format.write_linear_standin(linear, seed=seed + 1,
                                            bird_logit_offset=-float(np.median(logits)))
    return latents, linear


def load_folder_images(data_dir: str, split: str = "test") -> tuple:
    """All images of a split as float32 [0,1] arrays (Pillow-decoded) and their labels."""
    images, labels = [], []
    for label, class_name in enumerate(("bicycle", "bird")):
        folder = os.path.join(data_dir, split, class_name)
        for name in sorted(os.listdir(folder)):
            with Image.open(os.path.join(folder, name)) as image:
                images.append(np.asarray(image.convert("RGB"), np.float32) / 255.0)
            labels.append(label)
    return images, np.asarray(labels)


def write_decay_rate_probe(export_dir: str, input_shape: tuple, weights: np.ndarray,
                           decay_rate_weights: np.ndarray) -> str:
    """A TF1 Hub module whose output moves with its ``decay_rate`` input.

    Inputs ``inputs`` [N, *input_shape] and ``decay_rate`` (scalar); output [N, 1, 1, K] =
    ``mean over H, W of inputs @ weights + decay_rate * decay_rate_weights``. The real LLR
    modules' outputs do not depend on ``decay_rate``; this one shows which value was fed.
    """
    def build(inputs):
        pooled = tf.reduce_mean(inputs["inputs"], axis=[1, 2], keepdims=True)
        kernel = tf.compat.v1.get_variable(
            "probe/weights", initializer=weights.astype(np.float32)[None, None])
        return (tf.nn.conv2d(pooled, kernel, strides=1, padding="VALID")
                + inputs["decay_rate"] * decay_rate_weights.astype(np.float32))

    return tf1_hub_format.write_tf1_hub_module(
        export_dir, build,
        {"inputs": tf.TensorSpec([None, *input_shape], tf.float32),
         "decay_rate": tf.TensorSpec([], tf.float32)})
