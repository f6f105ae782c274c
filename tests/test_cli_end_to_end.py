"""train.py and eval.py run as programs, with the original command lines, on tiny data."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.data_builders import write_tiny_imagenet_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *flags, check=True, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *flags],
                          capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _event_tags(directory):
    """{tag: kind of value} of the summaries under ``directory`` (TF1's simple_value/image)."""
    tags = {}
    for path in tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update((value.tag, value.WhichOneof("value")) for value in event.summary.value)
    return tags


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet_tfrecords(str(path), num_train=48, num_val=24, image_size=32, seed=1)
    return str(path)


COMMON = ["--dataset=tiny_imagenet", "--model_name=resnet_v2_tiny", "--dataset_image_size=32"]


@pytest.mark.slow
def test_train_then_eval_clean_and_adversarial(tmp_path, data_dir):
    out = str(tmp_path / "train")
    _run("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
         "--hparams=batch_size=8,train_adv_method=pgdll_16_2_2,train_lp_weight=0.5",
         "--max_steps=3", "--save_model_steps=2", "--save_summaries_steps=1")
    names = {name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(out))}
    assert "resnet_v2_tiny/block1/unit_1/bottleneck_v2/conv1/BatchNorm/moving_mean" in names
    assert "resnet_v2_tiny/logits/weights/ExponentialMovingAverage" in names
    assert tf.train.latest_checkpoint(out).endswith("model.ckpt-3")
    # The original's TF1 summaries: float32 scalars, one PNG per image (default 3 shown).
    scalars = ["loss_xent", "loss_lp", "loss_wd", "total_loss", "learning_rate", "current_epoch"]
    images = [f"{name}/image/{i}" for name in ("images", "adv_images") for i in range(3)]
    assert _event_tags(out) == {**dict.fromkeys(scalars, "simple_value"),
                                **dict.fromkeys(images, "image")}

    # Continuous mode, once: summaries under train_dir/eval_name.
    _run("eval.py", f"--train_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
         "--hparams=eval_batch_size=8", "--eval_once", "--eval_name=clean_eval")
    assert _event_tags(os.path.join(out, "clean_eval")) == {
        "Eval/Accuracy": "simple_value", "Eval/Top5": "simple_value"}

    # One checkpoint, adversarial, appending the original output line.
    results = tmp_path / "results.csv"
    proc = _run("eval.py", f"--checkpoint_path={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--hparams=eval_batch_size=8", "--adv_method=pgd_16_2_2",
                "--eval_name=pgd", f"--output_file={results}", "--num_examples=16",
                f"--predictions_file={tmp_path / 'pred.npz'}")
    name, accuracy, top5 = results.read_text().strip().split(",")
    assert name == "pgd" and 0.0 <= float(accuracy) <= float(top5) <= 1.0
    assert len(accuracy.split(".")[1]) == 3
    assert "16 examples" in proc.stderr
    predictions = np.load(tmp_path / "pred.npz")
    assert predictions["logits"].shape == (16, 200)
    np.testing.assert_array_equal(predictions["predictions"], predictions["logits"].argmax(-1))
    assert float(accuracy) == pytest.approx(
        np.mean(predictions["predictions"] == predictions["labels"]), abs=5e-4 + 1e-9)


@pytest.mark.slow
def test_eval_on_a_split_smaller_than_requested_reports_the_count(tmp_path, data_dir):
    out = str(tmp_path / "train")
    _run("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
         "--hparams=batch_size=8", "--max_steps=1", "--moving_average_decay=-1")
    proc = _run("eval.py", f"--checkpoint_path={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--hparams=eval_batch_size=8", "--moving_average_decay=-1")
    # The validation file holds 24 records although Tiny ImageNet promises 10,000.
    assert "24 examples" in proc.stderr
    # Asked for more than the file holds: a clean end, with the count actually evaluated.
    results = tmp_path / "results.csv"
    proc = _run("eval.py", f"--checkpoint_path={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--hparams=eval_batch_size=8", "--moving_average_decay=-1",
                "--num_examples=40", f"--output_file={results}")
    assert "The split ended after 24 examples (3 batches), fewer than the 40 requested" in (
        proc.stderr)
    assert "24 examples" in proc.stderr and results.read_text().count("\n") == 1


@pytest.mark.slow
def test_mirrored_xla_training_and_mirrored_eval_run_from_the_command_line(tmp_path, data_dir):
    out = str(tmp_path / "train")
    dump = tmp_path / "xla_dump"
    # XLA writes the HLO of every module it compiles here: the evidence that it ran.
    proc = _run("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--strategy=mirrored", "--cpu_devices=2", "--jit_compile",
                "--hparams=batch_size=4,train_adv_method=pgdll_16_2_2,train_lp_weight=0.5",
                "--max_steps=2", "--save_model_steps=2", "--save_summaries_steps=0",
                env={"XLA_FLAGS": f"--xla_dump_to={dump}"})
    assert tf.train.latest_checkpoint(out).endswith("model.ckpt-2")
    assert "2 replicas" in proc.stderr, proc.stderr[-3000:]
    # Each replica's attack, forward and backward pass is one compiled module.
    dumped = sorted(os.listdir(dump)) if dump.exists() else []
    assert any("forward_backward" in name and name.endswith("after_optimizations.txt")
               for name in dumped), dumped[:20]
    results = tmp_path / "results.csv"
    proc = _run("eval.py", f"--checkpoint_path={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--strategy=mirrored", "--cpu_devices=2",
                "--hparams=eval_batch_size=8", "--adv_method=pgd_16_2_2", "--eval_name=pgd",
                f"--output_file={results}")
    name, accuracy, top5 = results.read_text().strip().split(",")
    assert name == "pgd" and 0.0 <= float(accuracy) <= float(top5) <= 1.0
    assert "24 examples" in proc.stderr
