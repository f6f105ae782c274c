"""train.py and eval.py run as programs, with the original command lines, on tiny data.

One train.py run serves the module; runs that do not depend on each other run at the same
time (two processes keep both cores busy).
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from tests.data_builders import write_tiny_imagenet_tfrecords
from tests.program_runs import run_concurrently, run_program, summary_values


def _event_tags(directory):
    """{tag: kind of value} of the summaries under ``directory`` (TF1's simple_value/image)."""
    return {tag: kind for _, tag, kind, _ in summary_values(directory)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet_tfrecords(str(path), num_train=48, num_val=24, image_size=32, seed=1)
    return str(path)


COMMON = ["--dataset=tiny_imagenet", "--model_name=resnet_v2_tiny", "--dataset_image_size=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """Output directory of train.py: 3 steps of ALP, checkpoints 0, 2 and 3, all summaries."""
    out = str(tmp_path_factory.mktemp("train"))
    run_program("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}",
                *COMMON, "--hparams=batch_size=8,train_adv_method=pgdll_16_2_2,"
                "train_lp_weight=0.5", "--max_steps=3", "--save_model_steps=2",
                "--save_summaries_steps=1")
    return out


@pytest.mark.slow
def test_train_then_eval_clean_and_adversarial(tmp_path, data_dir, trained):
    out = trained
    names = {name for name, _ in tf.train.list_variables(tf.train.latest_checkpoint(out))}
    assert "resnet_v2_tiny/block1/unit_1/bottleneck_v2/conv1/BatchNorm/moving_mean" in names
    assert "resnet_v2_tiny/logits/weights/ExponentialMovingAverage" in names
    assert tf.train.latest_checkpoint(out).endswith("model.ckpt-3")
    # The original's TF1 summaries: float32 scalars, one PNG per image (default 3 shown).
    scalars = ["loss_xent", "loss_lp", "loss_wd", "total_loss", "learning_rate", "current_epoch"]
    images = [f"{name}/image/{i}" for name in ("images", "adv_images") for i in range(3)]
    assert _event_tags(out) == {**dict.fromkeys(scalars, "simple_value"),
                                **dict.fromkeys(images, "image")}

    results = tmp_path / "results.csv"
    runs = run_concurrently({
        # Continuous mode, once: summaries under train_dir/eval_name.
        "continuous": ("eval.py", [
            f"--train_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
            "--hparams=eval_batch_size=8", "--eval_once", "--eval_name=clean_eval"]),
        # One checkpoint, adversarial, appending the original output line.
        "adversarial": ("eval.py", [
            f"--checkpoint_path={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
            "--hparams=eval_batch_size=8", "--adv_method=pgd_16_2_2", "--eval_name=pgd",
            f"--output_file={results}", "--num_examples=16",
            f"--predictions_file={tmp_path / 'pred.npz'}"]),
    }, str(tmp_path / "logs"))
    assert _event_tags(os.path.join(out, "clean_eval")) == {
        "Eval/Accuracy": "simple_value", "Eval/Top5": "simple_value"}

    name, accuracy, top5 = results.read_text().strip().split(",")
    assert name == "pgd" and 0.0 <= float(accuracy) <= float(top5) <= 1.0
    assert len(accuracy.split(".")[1]) == 3
    assert "16 examples" in runs["adversarial"].stderr
    predictions = np.load(tmp_path / "pred.npz")
    assert predictions["logits"].shape == (16, 200)
    np.testing.assert_array_equal(predictions["predictions"], predictions["logits"].argmax(-1))
    assert float(accuracy) == pytest.approx(
        np.mean(predictions["predictions"] == predictions["labels"]), abs=5e-4 + 1e-9)


@pytest.mark.slow
def test_eval_on_a_split_smaller_than_requested_reports_the_count(tmp_path, data_dir, trained):
    results = tmp_path / "results.csv"
    flags = [f"--checkpoint_path={trained}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
             "--hparams=eval_batch_size=8", "--moving_average_decay=-1"]
    runs = run_concurrently({
        "all": ("eval.py", flags),
        "more_than_there_is": ("eval.py", [*flags, "--num_examples=40",
                                           f"--output_file={results}"]),
    }, str(tmp_path / "logs"))
    # The validation file holds 24 records although Tiny ImageNet promises 10,000.
    assert "24 examples" in runs["all"].stderr
    # Asked for more than the file holds: a clean end, with the count actually evaluated.
    stderr = runs["more_than_there_is"].stderr
    assert "The split ended after 24 examples (3 batches), fewer than the 40 requested" in stderr
    assert "24 examples" in stderr and results.read_text().count("\n") == 1


@pytest.mark.slow
def test_mirrored_xla_training_and_mirrored_eval_run_from_the_command_line(
        tmp_path, data_dir, trained):
    out = str(tmp_path / "train")
    dump = tmp_path / "xla_dump"
    results = tmp_path / "results.csv"
    # Two true starts at once; the evaluation reads the module's trained checkpoint.
    runs = run_concurrently({
        "train": ("train.py", [
            f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
            "--strategy=mirrored", "--cpu_devices=2", "--jit_compile",
            "--hparams=batch_size=4,train_adv_method=pgdll_16_2_2,train_lp_weight=0.5",
            "--max_steps=2", "--save_model_steps=2", "--save_summaries_steps=0"]),
        "eval": ("eval.py", [
            f"--checkpoint_path={trained}", f"--tiny_imagenet_data_dir={data_dir}", *COMMON,
            "--strategy=mirrored", "--cpu_devices=2", "--hparams=eval_batch_size=8",
            "--adv_method=pgd_16_2_2", "--eval_name=pgd", f"--output_file={results}"]),
    }, str(tmp_path / "logs"), env={"XLA_FLAGS": f"--xla_dump_to={dump}"})
    # XLA writes the HLO of every module it compiles to the dump: the evidence that it ran.
    assert tf.train.latest_checkpoint(out).endswith("model.ckpt-2")
    assert "2 replicas" in runs["train"].stderr, runs["train"].stderr[-3000:]
    # Each replica's attack, forward and backward pass is one compiled module.
    dumped = sorted(os.listdir(dump)) if dump.exists() else []
    assert any("forward_backward" in name and name.endswith("after_optimizations.txt")
               for name in dumped), dumped[:20]
    name, accuracy, top5 = results.read_text().strip().split(",")
    assert name == "pgd" and 0.0 <= float(accuracy) <= float(top5) <= 1.0
    assert "24 examples" in runs["eval"].stderr
