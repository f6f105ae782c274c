"""Released tensorflow/tpu EfficientNet checkpoints (TF1, by name) evaluated by eval.py.

A checkpoint is written as tensorflow/tpu's training wrote it: ``tf.compat.v1`` variables with
the released names in a ``tf.Graph``, every ``/ExponentialMovingAverage`` shadow (holding OTHER
values than the plain variable), RMSProp's ``/RMSProp`` and ``/RMSProp_1`` slots and
``global_step``, saved by ``tf.compat.v1.train.Saver`` into ``efficientnet-b0/model.ckpt``.

The reference is independent of the library: tf_keras' ``EfficientNetB0`` holding the same
values mapped by name (helpers of ``tests/test_models_efficientnet.py``), fed the released
evaluation preprocessing computed here by hand: the ``int(224 / (224 + 32) * min(h, w))``
centre crop decoded from the JPEG (``decode_and_crop_jpeg``, as the release did, so both sides
see the same decoded pixels), TF1 ``resize_bicubic``, then ``(x - mean) / std`` on the 0..255
scale (standard) or ``x * 2 / 255 - 1`` (AdvProp). Stored labels are 1..1000.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation
from adversarial_logit_pairing.checkpoints import EMA_SUFFIX
from adversarial_logit_pairing.errors import CheckpointError
from adversarial_logit_pairing.models import create_model
from tests import data_builders
from tests.program_runs import run_program
from tests.test_models_efficientnet import Pair, _make_pair, _random_values

tf_keras = pytest.importorskip("tf_keras")
v1 = tf.compat.v1

SIZE = 224
BATCH = 2
# Non-square photos, larger and smaller than the crop, so the crop offsets and sides vary.
PHOTO_SHAPES = ((180, 250), (300, 230), (231, 197), (256, 341))
MEAN_RGB = 255 * np.array([0.485, 0.456, 0.406], np.float32)
STDDEV_RGB = 255 * np.array([0.229, 0.224, 0.225], np.float32)
KINDS = {"advprop": "efficientnet_b0_ap", "standard": "efficientnet_b0"}
RELEASED_STEP = 218_949


@dataclasses.dataclass
class Released:
    """One written checkpoint and the reference's logits from each of its value sets."""

    model_name: str
    prefix: str
    values: dict[str, dict[str, np.ndarray]]  # 'plain' / 'shadow' -> name -> value
    logits: dict[str, np.ndarray]  # 'plain' / 'shadow' -> reference logits [4, 1000]


def write_released_checkpoint(prefix: str, plain: dict[str, np.ndarray],
                              shadows: dict[str, np.ndarray], step: int,
                              optimizer_slots: bool = True) -> None:
    """Writes a checkpoint as tensorflow/tpu's TF1 training did, with ``tf.compat.v1.train.Saver``.

    Every variable gets its ``/ExponentialMovingAverage`` shadow, batch-norm moving statistics
    included (tensorflow/tpu averages the trainable variables and the moving statistics); with
    ``optimizer_slots`` the trainable ones get RMSProp's slots, ``/RMSProp`` (mean square,
    starting at 1) and ``/RMSProp_1`` (momentum). The TF1 names are spelled out here rather
    than made by TF1's EMA and optimizer, whose graph construction is ten times slower.
    """
    tensors = {"global_step": np.int64(step)}
    for name, value in plain.items():
        tensors[name] = value
        tensors[f"{name}/ExponentialMovingAverage"] = shadows[name]
        if optimizer_slots and not name.endswith(("/moving_mean", "/moving_variance")):
            tensors[f"{name}/RMSProp"] = np.ones_like(value)
            tensors[f"{name}/RMSProp_1"] = np.zeros_like(value)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with tf.Graph().as_default():
        feeds, variables = {}, []
        for name, value in tensors.items():
            initial = v1.placeholder(tf.as_dtype(value.dtype), value.shape)
            feeds[initial] = value
            variables.append(v1.Variable(initial, name=name))
        with v1.Session() as session:
            session.run(v1.global_variables_initializer(), feeds)
            v1.train.Saver(variables).save(session, prefix, write_meta_graph=False)


def released_inputs(jpegs: list[bytes], shapes, advprop: bool) -> np.ndarray:
    """The released evaluation preprocessing of each JPEG, as the network's input."""
    images = []
    for data, (height, width) in zip(jpegs, shapes):
        crop = int(SIZE / (SIZE + 32) * min(height, width))
        window = [((height - crop) + 1) // 2, ((width - crop) + 1) // 2, crop, crop]
        decoded = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        resized = v1.image.resize_bicubic(decoded[tf.newaxis], [SIZE, SIZE])[0].numpy()
        # The release did not clip; our pipeline does (for the attacks). Smooth photos never
        # overshoot, so the two agree here.
        assert resized.min() >= 0.0 and resized.max() <= 255.0
        images.append(resized * 2 / 255 - 1 if advprop else (resized - MEAN_RGB) / STDDEV_RGB)
    return np.stack(images).astype(np.float32)


def reference_logits(pair: Pair, values: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """tf_keras' EfficientNetB0 holding ``values`` (by our names), in inference mode."""
    for name, value in values.items():
        pair.keras_weights[name].assign(value)
    return pair.keras(inputs, training=False).numpy()


def spread_logits(values: dict[str, np.ndarray], logits: np.ndarray,
                  scale: float = 10.0) -> dict[str, np.ndarray]:
    """Values whose logits are ``gain * (f - mean f)`` over the images that gave ``logits``.

    A random network gives nearly the same logits to every image; removing their mean through
    the head's bias and amplifying the rest makes the top-1 class differ between images. The
    gain brings the logits' standard deviation to ``scale``.
    """
    values = dict(values)
    kernel, bias = "efficientnet-b0/head/dense/kernel", "efficientnet-b0/head/dense/bias"
    features = logits - values[bias]
    gain = scale / np.std(features - features.mean(axis=0))
    values[kernel] = (gain * values[kernel]).astype(np.float32)
    values[bias] = (-gain * features.mean(axis=0)).astype(np.float32)
    return values


@pytest.fixture(scope="module")
def photos():
    """JPEG bytes of photo-like images of the sizes ``PHOTO_SHAPES``."""
    rng = np.random.default_rng(13)
    return [data_builders.encode_jpeg(data_builders.synthetic_photo(h, w, rng))
            for h, w in PHOTO_SHAPES]


@pytest.fixture(scope="module")
def released(tmp_path_factory, photos) -> dict[str, Released]:
    """kind -> a released-style checkpoint of efficientnet_b0(_ap) and its reference logits."""
    pair = _make_pair("b0", tf_keras.applications.EfficientNetB0, seed=0)
    made = {}
    for index, (kind, model_name) in enumerate(KINDS.items()):
        inputs = released_inputs(photos, PHOTO_SHAPES, advprop=kind == "advprop")
        values, logits = {}, {}
        for source, seed in (("plain", 10 + index), ("shadow", 20 + index)):
            raw = _random_values(pair.ours, SIZE, seed)
            values[source] = spread_logits(raw, reference_logits(pair, raw, inputs))
            logits[source] = reference_logits(pair, values[source], inputs)
        # Written in one place, then unpacked as efficientnet-b0/ in another: the
        # ``checkpoint`` state file the Saver wrote names the first place, which is gone.
        directory = tmp_path_factory.mktemp(f"{kind}_release")
        written = str(directory / "training_run" / "model.ckpt")
        write_released_checkpoint(written, values["plain"], values["shadow"], RELEASED_STEP)
        os.rename(os.path.dirname(written), directory / "efficientnet-b0")
        prefix = str(directory / "efficientnet-b0" / "model.ckpt")
        made[kind] = Released(model_name, prefix, values, logits)
    return made


@pytest.fixture(scope="module")
def labels(released) -> list[int]:
    """Stored labels 1..1000: two hit the reference's shadow predictions, plus both ends."""
    return [int(np.argmax(released["advprop"].logits["shadow"][0])) + 1,
            int(np.argmax(released["standard"].logits["shadow"][1])) + 1, 1, 1000]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, photos, labels) -> str:
    path = str(tmp_path_factory.mktemp("imagenet"))
    data_builders.write_imagenet_shards(path, "validation", [[
        data_builders.imagenet_example(data, label) for data, label in zip(photos, labels)]])
    return path


def _eval_flags(data_dir: str, model_name: str, predictions_file: str) -> dict:
    return dict(model_name=model_name, dataset="imagenet", imagenet_data_dir=data_dir,
                dataset_image_size=SIZE, hparams=f"eval_batch_size={BATCH}",
                num_examples=len(PHOTO_SHAPES), predictions_file=predictions_file)


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _check_reproduces(predictions: dict, reference: np.ndarray, other: np.ndarray,
                      labels: list[int]) -> float:
    """Eval's logits are the reference's; returns the reference's accuracy on labels - 1."""
    expected = np.argmax(reference, axis=-1)
    np.testing.assert_array_equal(predictions["labels"], np.array(labels) - 1)
    np.testing.assert_array_equal(predictions["predictions"], expected)
    # Float32 round-off of two preprocessing orders (0..1 vs 0..255 scale, normalisation in the
    # model) grows through 16 random blocks to about 1e-5 of the logits' range (measured:
    # at most 5e-4 on logits up to 56).
    np.testing.assert_allclose(predictions["logits"], reference, rtol=0, atol=3e-3)
    assert len(set(expected.tolist())) > 1  # equal top-1 classes are no accident
    # The other value set gives other top-1 classes: reading the wrong one would show.
    assert np.any(np.argmax(other, axis=-1) != expected)
    return float(np.mean(expected == np.array(labels) - 1))


def test_eval_py_reads_the_shadows_of_a_released_directory_by_default(
        released, data_dir, labels, tmp_path):
    case = released["standard"]
    # The archive's state file names where training wrote it, gone since: the directory
    # still resolves to its only checkpoint.
    unpacked = os.path.dirname(case.prefix)
    state = tf.train.get_checkpoint_state(unpacked)
    assert "training_run" in state.model_checkpoint_path
    assert checkpoints.resolve_checkpoint(unpacked, "--checkpoint_path") == case.prefix
    flags = _eval_flags(data_dir, case.model_name, str(tmp_path / "predictions.npz"))
    output = tmp_path / "results.csv"
    run_program("eval.py", f"--checkpoint_path={unpacked}", f"--output_file={output}",
                *(f"--{name}={value}" for name, value in flags.items()))
    accuracy = _check_reproduces(_load(flags["predictions_file"]), case.logits["shadow"],
                                 case.logits["plain"], labels)
    assert accuracy > 0
    assert output.read_text().split(",")[1] == f"{accuracy:.3f}"


@pytest.mark.parametrize("source", ["shadow", "plain"])
def test_evaluation_reproduces_an_advprop_prefix_from_shadows_or_plain_values(
        released, data_dir, labels, tmp_path, source):
    case = released["advprop"]
    config = evaluation.EvalConfig(
        checkpoint_path=case.prefix, moving_average_decay=0.9999 if source == "shadow" else -1,
        **_eval_flags(data_dir, case.model_name, str(tmp_path / "predictions.npz")))
    (result,) = evaluation.run(config)
    other = "plain" if source == "shadow" else "shadow"
    accuracy = _check_reproduces(_load(config.predictions_file), case.logits[source],
                                 case.logits[other], labels)
    assert (result.accuracy, result.num_examples) == (pytest.approx(accuracy), 4)
    assert result.global_step == RELEASED_STEP


def test_restore_logs_the_checkpoint_entries_it_ignores(released, caplog):
    prefix = released["advprop"].prefix
    stored = checkpoints.variable_shapes(prefix)
    model = create_model("efficientnet_b0_ap", 1000)
    assignments = evaluation.restore_assignments(model, 0.9999)
    with caplog.at_level(logging.INFO, logger="absl"):
        checkpoints.restore(assignments, prefix)
    lines = [r.getMessage() for r in caplog.records if "Ignored" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    slots = [n for n in stored if n.endswith(("/RMSProp", "/RMSProp_1"))]
    trainable = [n for n in model.variables_by_name if not n.endswith(("_mean", "_variance"))]
    assert len(slots) == 2 * len(trainable)
    # Everything but the variables read and their plain counterparts: slots and global_step,
    # the first few by name.
    assert f"Ignored {len(slots) + 1} entries of {prefix}" in lines[0]
    listed = lines[0].split(": ", 1)[1].split(" (and ")[0].split("; ")
    assert 0 < len(listed) <= 3 and set(listed) <= set(slots) | {"global_step"}
    assert f"(and {len(slots) + 1 - len(listed)} more)" in lines[0]
    np.testing.assert_array_equal(
        model.variables_by_name["efficientnet-b0/head/dense/bias"].numpy(),
        released["advprop"].values["shadow"]["efficientnet-b0/head/dense/bias"])


def _fresh_checkpoint(directory: str, model_name: str, num_classes: int) -> str:
    """A checkpoint of another model's variables (plain and shadows) at their initial values."""
    values = {name: v.numpy() for name, v in
              create_model(model_name, num_classes).variables_by_name.items()}
    prefix = os.path.join(directory, "model.ckpt")
    write_released_checkpoint(prefix, values, values, step=1, optimizer_slots=False)
    return prefix


@pytest.mark.parametrize("model_name,num_classes,scope", [
    ("efficientnet_b1", 1000, "efficientnet-b1"), ("resnet_v2_tiny", 1001, "resnet_v2_tiny")])
def test_a_checkpoint_of_another_size_or_family_is_refused_naming_variables(
        data_dir, tmp_path, model_name, num_classes, scope):
    prefix = _fresh_checkpoint(str(tmp_path), model_name, num_classes)
    config = evaluation.EvalConfig(checkpoint_path=prefix, **_eval_flags(
        data_dir, "efficientnet_b0_ap", str(tmp_path / "predictions.npz")))
    with pytest.raises(CheckpointError) as raised:
        evaluation.run(config)
    message = str(raised.value)
    assert f"efficientnet-b0/stem/conv2d/kernel{EMA_SUFFIX} [3, 3, 3, 32]" in message
    assert f"checkpoint scopes: {scope}" in message and "check --model_name" in message
    assert not os.path.exists(config.predictions_file)
