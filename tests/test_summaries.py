"""Event files and result lines as the original's TF1 code wrote them, read back and compared."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import evaluation, summaries
from tests.program_runs import summary_values


def _images(seed: int, n: int) -> np.ndarray:
    # Model units as the original passed them: mostly (-1, 1), and one image all non-negative,
    # which TF1 maps to uint8 another way (largest value to 255 instead of 0 to 128).
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, (n, 5, 7, 3)).astype(np.float32)
    images[0] = np.abs(images[0])
    return images


def _write_with_tf1(directory: str, step: int, scalars: dict, images: dict) -> None:
    """What the original's graph wrote: tf.compat.v1.summary ops and a FileWriter."""
    graph = tf.Graph()
    with graph.as_default():
        scopes: dict[str, dict] = {}
        for tag, value in scalars.items():
            scope, _, name = tag.rpartition("/")
            scopes.setdefault(scope, {})[name] = value
        for scope, values in scopes.items():  # e.g. the original's tf.name_scope('Eval')
            with tf.compat.v1.name_scope(scope) if scope else contextlib.nullcontext():
                for name, value in values.items():
                    tf.compat.v1.summary.scalar(name, tf.constant(value))
        for name, (pixels, max_outputs) in images.items():
            tf.compat.v1.summary.image(name, tf.constant(pixels), max_outputs=max_outputs)
        merged = tf.compat.v1.summary.merge_all()
        with tf.compat.v1.Session() as session:
            writer = tf.compat.v1.summary.FileWriter(directory)
            writer.add_summary(session.run(merged), step)
            writer.close()


def _write_with_port(directory: str, step: int, scalars: dict, images: dict) -> None:
    writer = tf.summary.create_file_writer(directory)
    with writer.as_default():
        for tag, value in scalars.items():
            summaries.scalar(tag, value, step)
        for name, (pixels, max_outputs) in images.items():
            summaries.image(name, pixels, step, max_outputs=max_outputs)
    writer.close()


def test_scalars_and_images_read_back_as_tf1_wrote_them(tmp_path):
    scalars = {"loss_xent": np.float32(5.3), "total_loss": np.float32(5.71),
               "current_epoch": np.float64(1 / 3), "Eval/Accuracy": np.float32(0.0025),
               "Eval/Top5": np.float64(0.0125)}
    images = {"images": (_images(0, 4), 3), "adv_images": (_images(1, 1), 3),
              "one": (_images(2, 2), 1)}
    _write_with_tf1(str(tmp_path / "tf1"), 7, scalars, images)
    _write_with_port(str(tmp_path / "port"), 7, scalars, images)
    ours, theirs = summary_values(str(tmp_path / "port")), summary_values(str(tmp_path / "tf1"))

    def tags_and_kinds(events):
        return sorted((step, tag, kind) for step, tag, kind, _ in events)

    assert tags_and_kinds(ours) == tags_and_kinds(theirs)
    tags = {tag for _, tag, _, _ in ours}
    # TF1's names: one tag per image, '/image' alone when max_outputs is 1, at most max_outputs.
    assert {"images/image/0", "images/image/1", "images/image/2", "adv_images/image/0",
            "one/image", "Eval/Accuracy", "Eval/Top5"} <= tags
    assert "images/image/3" not in tags and "adv_images/image" not in tags
    theirs_by_tag = {tag: payload for _, tag, _, payload in theirs}
    for _, tag, kind, payload in ours:
        expected = theirs_by_tag[tag]
        if kind == "simple_value":
            assert payload == expected
            continue
        assert kind == "image"
        assert (payload.height, payload.width, payload.colorspace) == (
            expected.height, expected.width, expected.colorspace) == (5, 7, 3)
        np.testing.assert_array_equal(tf.io.decode_png(payload.encoded_image_string).numpy(),
                                      tf.io.decode_png(expected.encoded_image_string).numpy())


def test_float_images_use_tf1_per_image_scaling(tmp_path):
    # [-1, 1] maps 0 to 128 and the largest magnitude 127 away; [0, 0.5] maps 0.5 to 255.
    pixels = np.zeros((2, 1, 3, 1), np.float32)
    pixels[0, 0, :, 0] = [-1.0, 0.0, 1.0]
    pixels[1, 0, :, 0] = [0.0, 0.1, 0.5]
    _write_with_port(str(tmp_path), 0, {}, {"images": (pixels, 3)})
    decoded = {tag: tf.io.decode_png(payload.encoded_image_string).numpy()[0, :, 0].tolist()
               for _, tag, _, payload in summary_values(str(tmp_path))}
    assert decoded == {"images/image/0": [1, 128, 255], "images/image/1": [0, 51, 255]}


def _tf1_metric_values(correct: np.ndarray, seen: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's Accuracy (tf.metrics.accuracy) and Top5 (recall_at_k) for each count."""
    labels = np.zeros(seen, np.int64)
    graph = tf.Graph()
    with graph.as_default():
        predictions = tf.compat.v1.placeholder(tf.int64, [seen])
        logits = tf.compat.v1.placeholder(tf.float32, [seen, 6])
        accuracy, update_accuracy = tf.compat.v1.metrics.accuracy(labels, predictions)
        top5, update_top5 = tf.compat.v1.metrics.recall_at_k(labels, logits, 5)
        reset = tf.compat.v1.local_variables_initializer()
        with tf.compat.v1.Session() as session:
            accuracies, top5s = [], []
            for k in correct:
                hit = np.arange(seen) < k
                # Class 0 is predicted (and in the top 5) exactly for the first k examples.
                scores = np.tile(np.arange(6, dtype=np.float32), (seen, 1))
                scores[hit, 0] = 10.0
                session.run(reset)
                session.run([update_accuracy, update_top5],
                            {predictions: np.where(hit, 0, 1), logits: scores})
                a, t = session.run([accuracy, top5])
                accuracies.append(a)
                top5s.append(t)
    return np.array(accuracies), np.array(top5s)


def test_output_line_rounds_the_original_float32_accuracy_and_float64_top5(tmp_path):
    seen = 10000  # Tiny ImageNet's validation split
    every = np.arange(seen + 1)
    # float32 and float64 quotients round differently under '%.3f' for these counts...
    differ = [k for k in every
              if f"{np.float32(k) / np.float32(seen):.3f}" != f"{k / seen:.3f}"]
    assert len(differ) == 496
    # ...which the original's own graph decides, with a sample of the others.
    checked = np.array(sorted(set(differ) | set(every[::97].tolist()) | {0, seen}))
    tf1_accuracy, tf1_top5 = _tf1_metric_values(checked, seen)
    assert tf1_accuracy.dtype == np.float32 and tf1_top5.dtype == np.float64

    output = tmp_path / "results.csv"
    for k in checked:
        accuracy, top5 = evaluation.metric_values(int(k), int(k), seen)
        evaluation.append_result_line(str(output), "pgd",
                                      evaluation.EvalResult("ckpt", 1, accuracy, top5, seen))
    expected = [f"pgd,{a:.3f},{t:.3f}" for a, t in zip(tf1_accuracy, tf1_top5)]
    assert output.read_text().splitlines() == expected
    # The float64 accuracy the port wrote before differs from the original's line for each.
    float64_lines = [f"pgd,{k / seen:.3f},{k / seen:.3f}" for k in checked]
    assert sum(a != b for a, b in zip(float64_lines, expected)) == len(differ)
    # The summaries carry the same values.
    assert [evaluation.metric_values(int(k), int(k), seen)[0] for k in checked] == \
        tf1_accuracy.tolist()


def test_every_possible_tiny_imagenet_accuracy_matches_float32_rounding():
    seen = 10000
    expected = [f"{value:.3f}" for value in np.arange(seen + 1, dtype=np.float32) /
                np.float32(seen)]
    ours = [f"{evaluation.metric_values(k, 0, seen)[0]:.3f}" for k in range(seen + 1)]
    assert ours == expected


@pytest.mark.parametrize("tag", ["Eval/Accuracy", "loss_xent"])
def test_scalar_tag_is_written_as_given(tmp_path, tag):
    _write_with_port(str(tmp_path), 3, {tag: 0.5}, {})
    assert summary_values(str(tmp_path)) == [(3, tag, "simple_value", 0.5)]
