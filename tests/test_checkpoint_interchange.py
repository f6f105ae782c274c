"""Interchange with the original: TF1 checkpoints written by TF-Slim in, ours out to TF-Slim.

TF-Slim's own ``resnet_v2_50`` (``tests/slim_reference.py`` and ``tf_slim`` in
``tf.compat.v1`` graph mode) is the reference on one side, ``train.py`` and ``eval.py`` run as
programs on the other. Images are the eval pipeline's own output, fed to both.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, model_lib, training
from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import CheckpointError
from tests import data_builders, slim_reference
from tests.program_runs import run_concurrently

MODEL = "resnet_v2_50"
EMA = checkpoints.EMA_SUFFIX
NUM_IMAGES = 4
v1 = tf.compat.v1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`layer.apply` is deprecated:UserWarning"),
]


def _eval_flags(predictions_file, *flags):
    """eval.py on the whole (4-image) validation split, writing --predictions_file."""
    return ("eval.py", [f"--model_name={MODEL}", f"--hparams=eval_batch_size={NUM_IMAGES}",
                        f"--predictions_file={predictions_file}", *flags])


def _predictions(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _eval_images(dataset, data_dir, image_size):
    """The eval pipeline's first batch: (images, labels) as numpy."""
    data, _, _, _ = dataset_factory.get_dataset(dataset, "validation", NUM_IMAGES, image_size,
                                                is_training=False, data_dir=data_dir)
    images, labels = next(iter(data))
    return images.numpy(), labels.numpy()


def _checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _slim_logits_from_checkpoint(prefix, num_classes, images, moving_average_decay=None):
    """TF-Slim's resnet_v2_50 restored the TF1 way; returns (logits, names read).

    Plain: a Saver over Slim's model variables by name. With ``moving_average_decay``: the
    Saver of ``ExponentialMovingAverage.variables_to_restore(model variables)``, which maps
    ``<name>/ExponentialMovingAverage`` to each variable, as the original eval.py did.
    """
    with tf.Graph().as_default():
        inputs = v1.placeholder(tf.float32, images.shape)
        with slim_reference.tf_slim.arg_scope(slim_reference.slim_resnet_v2.resnet_arg_scope()):
            net, _ = slim_reference.slim_resnet_v2.resnet_v2_50(inputs, num_classes,
                                                               is_training=False)
        logits = tf.squeeze(net, [1, 2])
        model_variables = slim_reference.tf_slim.get_model_variables()
        if moving_average_decay:
            averages = v1.train.ExponentialMovingAverage(moving_average_decay)
            var_list = averages.variables_to_restore(model_variables)
        else:
            var_list = {v.op.name: v for v in model_variables}
        saver = v1.train.Saver(var_list)
        with v1.Session() as session:
            saver.restore(session, prefix)
            return session.run(logits, {inputs: images}), set(var_list)


# ---- Data and Slim-written checkpoints --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Training split of class patterns; validation: two photos, two patterns, spread labels."""
    path = str(tmp_path_factory.mktemp("tiny_imagenet"))
    data_builders.write_tiny_imagenet_tfrecords(path, num_train=8, num_val=0, image_size=64,
                                                seed=3)
    rng = np.random.default_rng(3)
    images = [data_builders.synthetic_photo(64, 64, rng) for _ in range(2)]
    images += [data_builders.class_pattern_image(label, 200, 64, rng) for label in (113, 170)]
    data_builders.write_records(os.path.join(path, "validation.tfrecord"), [
        data_builders.tiny_imagenet_example(data_builders.encode_jpeg(image), label)
        for image, label in zip(images, (3, 57, 113, 170))])
    return path


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """Validation shard of photo-like JPEGs of assorted (non-square) sizes, labels 1..1000."""
    path = str(tmp_path_factory.mktemp("imagenet"))
    rng = np.random.default_rng(4)
    records = []
    for height, width, label in ((80, 60, 1), (64, 96, 417), (90, 90, 999), (70, 85, 1000)):
        image = data_builders.synthetic_photo(height, width, rng)
        records.append(data_builders.imagenet_example(data_builders.encode_jpeg(image), label))
    data_builders.write_imagenet_shards(path, "validation", [records])
    return path


def _spread_logits(values, logits, gain=10.0):
    """Values whose logits are ``gain * (f - mean f)`` for the images that gave ``logits``.

    A random 50-layer network gives nearly the same logits to every image (same top-1 class
    everywhere); subtracting the images' mean through the logits biases and amplifying the
    rest makes the top-1 class differ between images, so comparing it means something.
    """
    values = dict(values)
    weights, biases = f"{MODEL}/logits/weights", f"{MODEL}/logits/biases"
    features = logits - values[biases]
    values[weights] = (gain * values[weights]).astype(np.float32)
    values[biases] = (-gain * features.mean(axis=0)).astype(np.float32)
    return values


@pytest.fixture(scope="module")
def slim_checkpoints(tmp_path_factory, tiny_dir, imagenet_dir):
    """num_classes -> Slim run: a Saver-written checkpoint and Slim's logits on eval images."""
    made = {}
    for num_classes, dataset, data_dir in ((200, "tiny_imagenet", tiny_dir),
                                           (1001, "imagenet", imagenet_dir)):
        images, labels = _eval_images(dataset, data_dir, 64)
        shapes = slim_reference.slim_variable_shapes(MODEL, num_classes)
        values = slim_reference.random_variable_values(shapes, seed=num_classes)
        first = slim_reference.run_slim_resnet_v2(MODEL, num_classes, images,
                                                  is_training=False, values=values)
        values = _spread_logits(values, first.logits)
        directory = tmp_path_factory.mktemp(f"slim_{num_classes}")
        prefix = str(directory / "model.ckpt")
        run = slim_reference.run_slim_resnet_v2(MODEL, num_classes, images, is_training=False,
                                                values=values, save_path=prefix)
        made[num_classes] = dict(prefix=prefix, directory=str(directory), values=values,
                                 logits=run.logits, labels=labels, dataset=dataset,
                                 data_dir=data_dir, image_size=64)
    return made


def _data_flags(case):
    return [f"--dataset={case['dataset']}", f"--{case['dataset']}_data_dir={case['data_dir']}",
            f"--dataset_image_size={case['image_size']}"]


# ---- The program runs that need only the Slim-written checkpoints ----------------------------

@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, tiny_dir, slim_checkpoints, unfitting_checkpoints) -> dict:
    """All at once: eval.py on the Slim-written and the unfitting checkpoints, one after the
    other in one process (``in_one_process``), beside the two train.py runs of section 2.

    Three processes keep both cores busy and spare four TensorFlow start-ups; the train.py runs
    and the evaluations of their checkpoints (``trained_predictions``) are true program starts.
    """
    out = tmp_path_factory.mktemp("first_runs")
    runs = {}
    slim_predictions = {}
    for num_classes, case in slim_checkpoints.items():
        # The state file Saver writes makes the directory resolve to its checkpoint; use the
        # directory for one case and the prefix for the other.
        checkpoint = case["directory"] if num_classes == 200 else case["prefix"]
        slim_predictions[num_classes] = out / f"{num_classes}.npz"
        runs[("slim", num_classes)] = _eval_flags(slim_predictions[num_classes],
                                                  f"--checkpoint_path={checkpoint}",
                                                  "--moving_average_decay=-1",
                                                  *_data_flags(case))
    for kind, (checkpoint, _) in unfitting_checkpoints.items():
        runs[("unfitting", kind)] = ("eval.py", [
            f"--checkpoint_path={checkpoint}", f"--model_name={MODEL}",
            "--moving_average_decay=-1", f"--hparams=eval_batch_size={NUM_IMAGES}",
            *_data_flags(slim_checkpoints[200])])
    train_dirs, train_runs = _train_runs(tmp_path_factory, tiny_dir, slim_checkpoints)
    runs.update({("train", name): run for name, run in train_runs.items()})
    results = run_concurrently(runs, str(out), check=False, in_one_process=["eval.py"])
    for key, run in results.items():
        if key[0] != "unfitting" and run.returncode != 0:
            raise AssertionError(f"{runs[key][0]} {key} failed ({run.returncode}):\n"
                                 f"{run.stderr[-4000:]}")
    return {"slim_predictions": slim_predictions, "train_dirs": train_dirs,
            "unfitting": {kind: run for (group, kind), run in results.items()
                          if group == "unfitting"}}


# ---- 1. Slim -> us ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slim_checkpoint_predictions(first_runs):
    """num_classes -> eval.py's predictions for the Slim-written checkpoint."""
    return {num_classes: _predictions(path)
            for num_classes, path in first_runs["slim_predictions"].items()}


@pytest.mark.parametrize("num_classes", [200, 1001], ids=["tiny_imagenet_200", "imagenet_1001"])
def test_eval_py_reproduces_slim_logits_from_a_slim_written_checkpoint(
        slim_checkpoints, slim_checkpoint_predictions, num_classes):
    case = slim_checkpoints[num_classes]
    ours = slim_checkpoint_predictions[num_classes]
    np.testing.assert_array_equal(ours["labels"], case["labels"])
    assert ours["logits"].shape == (NUM_IMAGES, num_classes)
    np.testing.assert_array_equal(ours["predictions"], np.argmax(case["logits"], axis=-1))
    np.testing.assert_allclose(ours["logits"], case["logits"], rtol=0, atol=1e-4)
    # Images get different top-1 classes, so equal predictions are not an accident.
    assert len(set(ours["predictions"].tolist())) > 1
    # Batch-norm statistics far from a fresh network's 0 and 1, so they are really read.
    stored = _checkpoint_values(case["prefix"])
    means = np.concatenate([v for k, v in stored.items() if k.endswith("moving_mean")])
    variances = np.concatenate([v for k, v in stored.items() if k.endswith("moving_variance")])
    assert np.abs(means).mean() > 0.3 and np.abs(variances - 1).mean() > 0.3


# ---- 2. us -> Slim ----------------------------------------------------------------------------

FINETUNE_FLAGS = [
    f"--finetune_exclude_pretrained_scopes={MODEL}/logits",
    f"--finetune_trainable_scopes={MODEL}/logits,{MODEL}/postnorm",
]


def _train_runs(tmp_path_factory, tiny_dir, slim_checkpoints) -> tuple[dict, dict]:
    """Output directories and runs of two train.py runs (2 steps of resnet_v2_50, 32x32).

    "ema": the moving average on, starting from the 200-class Slim values (a fresh network's
    moving statistics make inference-mode logits explode through 50 layers), given under
    plain and shadow names as a checkpoint trained with the moving average holds them.
    "finetune": the README's fine-tuning from the 1001-class Slim checkpoint; it has no
    shadows, so the moving average is off.
    """
    source = {}
    for name, value in slim_checkpoints[200]["values"].items():
        source[name] = tf.Variable(value)
        source[name + EMA] = tf.Variable(value)
    source_dir = str(tmp_path_factory.mktemp("source"))
    checkpoints.save(source, source_dir, step=0)
    common = [f"--model_name={MODEL}", "--dataset=tiny_imagenet",
              f"--tiny_imagenet_data_dir={tiny_dir}", "--dataset_image_size=32",
              "--max_steps=2", "--save_summaries_steps=0"]
    out = {name: str(tmp_path_factory.mktemp(name)) for name in ("ema", "finetune")}
    return out, {
        "ema": ("train.py", [
            f"--output_dir={out['ema']}", *common, "--hparams=batch_size=2,learning_rate=0.001",
            "--moving_average_decay=0.9999", "--save_model_steps=100",
            f"--finetune_checkpoint_path={source_dir}"]),
        "finetune": ("train.py", [
            f"--output_dir={out['finetune']}", *common, "--hparams=batch_size=2",
            "--moving_average_decay=-1", "--save_model_steps=1",
            f"--finetune_checkpoint_path={slim_checkpoints[1001]['directory']}",
            *FINETUNE_FLAGS]),
    }


@pytest.fixture(scope="module")
def train_runs(first_runs):
    """"ema" and "finetune" -> the output directory of that train.py run."""
    return first_runs["train_dirs"]


@pytest.fixture(scope="module")
def trained_run(train_runs):
    return train_runs["ema"]


@pytest.fixture(scope="module")
def trained_predictions(tmp_path_factory, tiny_dir, trained_run):
    """moving_average_decay -> eval.py's predictions for the train.py checkpoint."""
    out = tmp_path_factory.mktemp("trained_eval")
    runs = {decay: _eval_flags(out / f"{decay}.npz", f"--checkpoint_path={trained_run}",
                               f"--moving_average_decay={decay}", "--dataset=tiny_imagenet",
                               f"--tiny_imagenet_data_dir={tiny_dir}",
                               "--dataset_image_size=32")
            for decay in (-1.0, 0.9999)}
    run_concurrently(runs, str(out))
    return {decay: _predictions(out / f"{decay}.npz") for decay in runs}


def test_train_py_checkpoint_lists_the_original_names(trained_run):
    prefix = tf.train.latest_checkpoint(trained_run)
    names = {name for name, _ in tf.train.list_variables(prefix)}
    slim_names = set(slim_reference.slim_variable_shapes(MODEL, 200))
    assert slim_names <= names
    assert {name + EMA for name in slim_names} <= names
    assert "global_step" in names
    assert tf.train.load_checkpoint(prefix).get_tensor("global_step") == 2


@pytest.mark.parametrize("decay", [-1.0, 0.9999], ids=["plain_variables", "moving_averages"])
def test_slim_restores_train_py_checkpoint_and_reproduces_eval_py(
        tiny_dir, trained_run, trained_predictions, decay):
    images, labels = _eval_images("tiny_imagenet", tiny_dir, 32)
    prefix = tf.train.latest_checkpoint(trained_run)
    slim_logits, read = _slim_logits_from_checkpoint(
        prefix, 200, images, moving_average_decay=decay if decay > 0 else None)
    ours = trained_predictions[decay]
    np.testing.assert_array_equal(ours["labels"], labels)
    assert np.isfinite(slim_logits).all() and np.abs(slim_logits).max() < 100
    np.testing.assert_array_equal(ours["predictions"], np.argmax(slim_logits, axis=-1))
    np.testing.assert_allclose(ours["logits"], slim_logits, rtol=0, atol=1e-4)
    if decay > 0:
        assert read and all(name.endswith(EMA) for name in read)
        # The shadows really differ from the plain weights after two steps.
        plain, _ = _slim_logits_from_checkpoint(prefix, 200, images)
        assert np.abs(plain - slim_logits).max() > 1e-3
    else:
        assert not any(name.endswith(EMA) for name in read)


# ---- 3. Fine-tuning from a Slim-written 1001-class checkpoint ---------------------------------

TRAINABLE_LEAVES = ("weights", "biases", "gamma", "beta")


def test_finetuning_tiny_imagenet_from_an_imagenet_slim_checkpoint(
        slim_checkpoints, train_runs):
    source = slim_checkpoints[1001]
    out = train_runs["finetune"]
    start = _checkpoint_values(os.path.join(out, "model.ckpt-0"))
    after = _checkpoint_values(os.path.join(out, "model.ckpt-2"))

    # Excluded scope: train.py's fresh initialisation (--seed=0), 200 classes wide.
    fresh = model_lib.get_model(MODEL, 200, seed=0).variables_by_name
    for name in (f"{MODEL}/logits/weights", f"{MODEL}/logits/biases"):
        np.testing.assert_array_equal(start[name], fresh[name].numpy())
    assert start[f"{MODEL}/logits/weights"].shape == (1, 1, 2048, 200)
    # Everything else: the source checkpoint's values, exactly.
    loaded = [name for name in source["values"] if not name.startswith(f"{MODEL}/logits")]
    assert len(loaded) == len(source["values"]) - 2
    for name in loaded:
        np.testing.assert_array_equal(start[name], source["values"][name], err_msg=name)

    # Training moves the trainable scopes only (batch-norm statistics move everywhere, as in
    # the original, whose UPDATE_OPS ran for every layer).
    in_scope = (f"{MODEL}/logits", f"{MODEL}/postnorm")
    for name in loaded + [f"{MODEL}/logits/weights", f"{MODEL}/logits/biases"]:
        if not name.endswith(TRAINABLE_LEAVES):
            continue
        if name.startswith(in_scope):
            assert not np.array_equal(after[name], start[name]), name
        else:
            np.testing.assert_array_equal(after[name], start[name], err_msg=name)
    assert f"{MODEL}/postnorm/gamma/RMSProp" in after
    assert f"{MODEL}/conv1/weights/RMSProp" not in after


def test_finetuning_with_moving_average_reads_plain_names_of_a_checkpoint_without_shadows(
        slim_checkpoints):
    """The proposed train.py fix: the released checkpoints with the moving average on.

    ``training.finetune_assignments`` asks for the trainable variables' shadows; a checkpoint
    saved without any (like the released ones) fails with a hint, and
    ``checkpoints.plain_names_without_shadows`` maps the request back to the plain names.
    """
    source = slim_checkpoints[1001]
    model = model_lib.get_model(MODEL, 200, seed=0)
    trainable = model_lib.filter_trainable_variables(f"{MODEL}/logits,{MODEL}/postnorm",
                                                     model.trainable_variables)
    assignments = training.finetune_assignments(
        model, source["prefix"], f"{MODEL}/logits",
        {model_lib.variable_name(v) for v in trainable}, use_moving_average=True)
    assert f"{MODEL}/postnorm/gamma{EMA}" in assignments
    with pytest.raises(CheckpointError, match="holds no /ExponentialMovingAverage shadows"):
        checkpoints.restore(assignments, source["prefix"])
    checkpoints.restore(checkpoints.plain_names_without_shadows(assignments, source["prefix"]),
                        source["prefix"])
    for name, variable in model.variables_by_name.items():
        if not name.startswith(f"{MODEL}/logits"):
            np.testing.assert_array_equal(variable.numpy(), source["values"][name])


# ---- 4. Checkpoints that do not fit -------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_v2_101_checkpoint(tmp_path_factory):
    """TF-Slim's resnet_v2_101 graph saved by a Saver without running it (zeros suffice)."""
    prefix = str(tmp_path_factory.mktemp("slim_101") / "model.ckpt")

    def zeros_in_own_collection(getter, *args, **kwargs):
        # Zeros instead of 42M truncated-normal draws; a private collection spares the
        # legacy layers' scan of all global variables (see slim_reference).
        kwargs.update(initializer=v1.zeros_initializer(), regularizer=None,
                      collections=["resnet_v2_101"], trainable=False)
        return getter(*args, **kwargs)

    with tf.Graph().as_default() as graph:
        images = v1.placeholder(tf.float32, [None, 32, 32, 3])
        with v1.variable_scope("", custom_getter=zeros_in_own_collection):
            with slim_reference.tf_slim.arg_scope(
                    slim_reference.slim_resnet_v2.resnet_arg_scope()):
                slim_reference.slim_resnet_v2.resnet_v2_101(images, 1001, is_training=False)
        variables = graph.get_collection("resnet_v2_101")
        saver = v1.train.Saver(variables)
        with v1.Session() as session:
            session.run(v1.variables_initializer(variables))
            saver.save(session, prefix, write_meta_graph=False)
    return prefix


DROPPED = (f"{MODEL}/block3/unit_2/bottleneck_v2/conv2/weights",
           f"{MODEL}/postnorm/moving_variance")


@pytest.fixture(scope="module")
def unfitting_checkpoints(tmp_path_factory, slim_checkpoints, resnet_v2_101_checkpoint):
    """kind -> (checkpoint, strings eval.py's one-line error must contain)."""
    values = _checkpoint_values(slim_checkpoints[200]["prefix"])
    kept = {name: tf.Variable(value) for name, value in values.items() if name not in DROPPED}
    partial = checkpoints.save(kept, str(tmp_path_factory.mktemp("partial")), step=1)
    return {
        "wrong_class_count": (slim_checkpoints[1001]["prefix"], [
            f"{MODEL}/logits/weights: checkpoint [1, 1, 2048, 1001] vs",
            "[1, 1, 2048, 200]", "trained for 1001 classes"]),
        "wrong_model": (resnet_v2_101_checkpoint, [
            f"{MODEL}/conv1/weights [7, 7, 3, 64]", "resnet_v2_101", "check --model_name"]),
        "missing_variables": (partial, [
            f"2 of {len(values)} variables missing", f"{DROPPED[0]} [3, 3, 256, 256]",
            f"{DROPPED[1]} [2048]"]),
    }


@pytest.fixture(scope="module")
def unfitting_runs(first_runs, unfitting_checkpoints):
    """kind -> (eval.py's run, strings its one-line error must contain)."""
    return {kind: (first_runs["unfitting"][kind], expected)
            for kind, (_, expected) in unfitting_checkpoints.items()}


@pytest.mark.parametrize("kind", ["wrong_class_count", "wrong_model", "missing_variables"])
def test_eval_py_rejects_an_unfitting_checkpoint_in_one_line(unfitting_runs, kind):
    run, expected = unfitting_runs[kind]
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.last_line.startswith("eval.py: error: checkpoint "), run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    for text in expected:
        assert text in run.last_line, (text, run.last_line)
