"""Inception v3 checkpoints both ways: TF-Slim-written ones evaluated by us, ours read by Slim.

The reference is TF-Slim's ``nets.inception_v3`` (1001 classes, ``inception_v3_arg_scope``)
in one TF1 graph, fed by the adv_imagenet_models evaluation preprocessing written out with
TF1's public ops in that same graph: decode, ``tf.image.central_crop(0.875)`` of each side,
``tf.compat.v1.image.resize_bilinear`` to 299x299 (align_corners False), ``(x - 0.5) * 2``.

1. Slim -> us: the graph's variables get random values with spread logits and are saved by a
   ``tf.compat.v1.train.Saver`` in the released checkpoints' layout (plain names, a
   ``global_step``, no moving-average shadows); ``eval.py`` (the program) with
   ``--moving_average_decay=-1`` on ImageNet shards of the same JPEGs must reproduce Slim's
   logits and its top-1/top-5 line.
2. us -> Slim: ``checkpoints.save`` of our model's variables (other values) restored by a
   Saver over Slim's variables, in the same graph: nothing missing, the same logits.

JPEGs are written without chroma subsampling, so the pipeline's crop-window decoding gives
the same pixels as the reference's full decode.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints
from adversarial_logit_pairing.checkpoints import variable_name
from adversarial_logit_pairing.models import create_model
from tests import data_builders, slim_reference
from tests.program_runs import run_program
from tests.test_model_preprocessing import encode_jpeg_444
from tests.test_models_inception_v3 import calibrated_values

pytestmark = pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning")

v1 = tf.compat.v1
SIZE = 299
NUM_CLASSES = 1001
# Non-square photos with odd and even sides: the per-side 0.875 crop truncates differently.
SHAPES = ((320, 401), (357, 270), (301, 333), (250, 330))
LOGITS_SCOPE = "InceptionV3/Logits/Conv2d_1c_1x1"


def slim_eval_image(jpeg: tf.Tensor) -> tf.Tensor:
    """adv_imagenet_models' evaluation image from JPEG bytes, with TF1's public ops."""
    image = tf.image.convert_image_dtype(tf.io.decode_jpeg(jpeg, channels=3), tf.float32)
    image = tf.image.central_crop(image, central_fraction=0.875)
    image = v1.image.resize_bilinear(image[tf.newaxis], [SIZE, SIZE], align_corners=False)[0]
    return (image - 0.5) * 2.0


def _spread_logits(values: dict, features: np.ndarray, gain: float = 10.0) -> dict:
    """Values whose logits are ``gain * (f - mean f)`` where ``f`` are the images' logits.

    A random Inception gives nearly the same logits to every image; centring them over the
    images (through the biases) and amplifying the rest gives each image its own top-1 class.
    """
    values = dict(values)
    weights, biases = LOGITS_SCOPE + "/weights", LOGITS_SCOPE + "/biases"
    values[weights] = (gain * values[weights]).astype(np.float32)
    values[biases] = (-gain * (features - values[biases]).mean(axis=0)).astype(np.float32)
    return values


def _labels(logits: np.ndarray) -> np.ndarray:
    """Labels in 1..1000, distinct: top-1 for images 0 and 2, 2nd-best for 1, else not top-5."""
    order = np.argsort(-logits, axis=1)
    labels = [order[0, 0], order[1, 1], order[2, 0], order[3, 500]]
    assert 0 not in labels and len(set(labels)) == len(labels)
    return np.array(labels, np.int64)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Both checkpoints, the ImageNet shards, Slim's logits for each and ours for ours."""
    root = tmp_path_factory.mktemp("inception_checkpoints")
    rng = np.random.default_rng(14)
    jpegs = [encode_jpeg_444(data_builders.synthetic_photo(h, w, rng)) for h, w in SHAPES]
    images = tf.stack([slim_eval_image(tf.constant(j)) for j in jpegs]).numpy()

    # Values: random, batch norms calibrated on these images (as the model test does).
    model = create_model("inception_v3", NUM_CLASSES)
    shapes = {name: tuple(v.shape.as_list()) for name, v in model.variables_by_name.items()}
    values = slim_reference.random_variable_values(shapes, seed=14)
    values = calibrated_values(model, values, images, seed=14)
    values = _spread_logits(values, model(tf.constant(images), is_training=False).numpy())
    # Ours: the same network with every value moved by up to 20%, saved by checkpoints.save.
    ours_values = {name: (value * rng.uniform(0.8, 1.2, value.shape)).astype(np.float32)
                   for name, value in values.items()}
    for name, variable in model.variables_by_name.items():
        variable.assign(ours_values[name])
    ours_logits = model(tf.constant(images), is_training=False).numpy()
    step = tf.Variable(3, dtype=tf.int64, name="global_step")
    ours_prefix = checkpoints.save({**model.variables_by_name, "global_step": step},
                                   str(root / "ours"), step=3)

    slim_prefix = str(root / "slim" / "adv_inception_v3.ckpt")  # the release's file name
    with tf.Graph().as_default():
        inputs = tf.stack([slim_eval_image(tf.constant(j)) for j in jpegs])
        logits, _, variables = slim_reference.build_network(
            "inception_v3", NUM_CLASSES, inputs, is_training=False)
        global_step = v1.train.get_or_create_global_step()
        by_name = {variable_name(v): v for v in variables}
        with v1.Session() as session:
            slim_reference.set_values(session, variables, values)
            session.run(global_step.assign(12345))
            v1.train.Saver({**by_name, "global_step": global_step}).save(
                session, slim_prefix, write_meta_graph=False, write_state=False)
            slim_logits, slim_inputs = session.run([logits, inputs])
            # A fresh Saver over Slim's model variables only, as a Slim user would restore.
            session.run(v1.variables_initializer(variables))
            v1.train.Saver(by_name).restore(session, ours_prefix)
            slim_logits_of_ours = session.run(logits)

    labels = _labels(slim_logits)
    data_dir = str(root / "imagenet")
    records = [data_builders.imagenet_example(j, int(label), filename=f"photo_{i}.JPEG")
               for i, (j, label) in enumerate(zip(jpegs, labels))]
    data_builders.write_imagenet_shards(data_dir, "validation", [records[:2], records[2:]])
    return dict(root=root, images=images, slim_inputs=slim_inputs, labels=labels,
                slim_prefix=slim_prefix, slim_logits=slim_logits, data_dir=data_dir,
                ours_prefix=ours_prefix, ours_logits=ours_logits,
                slim_logits_of_ours=slim_logits_of_ours, slim_names=set(by_name))


def test_reference_preprocessing_is_the_same_in_graph_and_eagerly(case):
    np.testing.assert_allclose(case["slim_inputs"], case["images"], atol=1e-6, rtol=0)


@pytest.mark.slow  # runs eval.py
def test_eval_py_reproduces_slim_logits_and_top1_from_a_slim_written_checkpoint(case):
    reference, labels = case["slim_logits"], case["labels"]
    stored = dict(tf.train.list_variables(case["slim_prefix"]))
    assert "global_step" in stored and len(stored) == 388 + 1
    assert not any(name.endswith(checkpoints.EMA_SUFFIX) for name in stored)
    predictions_file = str(case["root"] / "predictions.npz")
    output_file = str(case["root"] / "eval.csv")
    run_program("eval.py", f"--checkpoint_path={case['slim_prefix']}",
                "--model_name=inception_v3", "--dataset=imagenet",
                f"--imagenet_data_dir={case['data_dir']}", f"--dataset_image_size={SIZE}",
                "--moving_average_decay=-1", "--hparams=eval_batch_size=2",
                "--eval_name=adv_inception_v3", f"--predictions_file={predictions_file}",
                f"--output_file={output_file}")
    with np.load(predictions_file) as data:
        ours = {key: data[key] for key in data.files}
    # Evaluation interleaves the shards; the (distinct) labels say which image is which.
    order = [int(np.flatnonzero(labels == label)[0]) for label in ours["labels"]]
    assert sorted(order) == [0, 1, 2, 3]
    reference = reference[order]
    assert ours["logits"].shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(ours["logits"], reference, atol=1e-4 * np.abs(reference).max(),
                               rtol=0)
    np.testing.assert_array_equal(ours["predictions"], reference.argmax(axis=1))
    # Not a degenerate comparison: the images' top-1 classes differ, two of them are right.
    assert len(set(reference.argmax(axis=1).tolist())) > 1
    top1 = np.mean(reference.argmax(axis=1) == labels[order])
    top5 = np.mean([label in row for label, row in
                    zip(labels[order], np.argsort(-reference, axis=1)[:, :5])])
    assert (top1, top5) == (0.5, 0.75)
    with open(output_file) as f:
        assert f.read() == f"adv_inception_v3,{top1:.3f},{top5:.3f}\n"


def test_slim_restores_a_checkpoint_written_by_us(case):
    stored = dict(tf.train.list_variables(case["ours_prefix"]))
    # Exactly Slim's variables plus the step: the Saver's restore found every one of them.
    assert set(stored) == case["slim_names"] | {"global_step"}
    reference = case["slim_logits_of_ours"]
    np.testing.assert_allclose(reference, case["ours_logits"],
                               atol=1e-4 * np.abs(reference).max(), rtol=0)
    assert len(set(reference.argmax(axis=1).tolist())) > 1
    # The values are ours, not the Slim-written checkpoint's.
    assert np.abs(reference - case["slim_logits"]).max() > 0.1 * np.abs(reference).max()
