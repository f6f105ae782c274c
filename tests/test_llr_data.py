"""llr.data: the bird-or-bicycle folder reader, the TFRecord converter and their errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from adversarial_logit_pairing.errors import DataError, MissingDataError
from llr import data
from tests.llr_builders import write_photo_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_photo_folder(str(tmp_path_factory.mktemp("bob")))


def _all(data_dir, split="test", image_size=64, **kwargs):
    batches = list(data.iterate_split(data_dir, split, 3, image_size, **kwargs))
    return (np.concatenate([b.images for b in batches]),
            np.concatenate([b.labels for b in batches]),
            [i for b in batches for i in b.image_ids])


def test_folder_reader_labels_bicycle_0_and_bird_1(data_dir):
    images, labels, ids = _all(data_dir, shuffle_seed=None)
    assert ids == [f"bicycle{i:03d}" for i in range(4)] + [f"bird{i:03d}" for i in range(4)]
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1, 1])
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_shuffled_subset_mixes_classes_and_is_reproducible(data_dir):
    _, labels, ids = _all(data_dir, num_examples=4, shuffle_seed=5)
    assert len(ids) == 4
    assert _all(data_dir, num_examples=4, shuffle_seed=5)[2] == ids
    full = _all(data_dir, shuffle_seed=5)[2]
    assert sorted(full) == sorted(_all(data_dir, shuffle_seed=None)[2])


def test_images_match_pillow_decode_and_short_side_resize(data_dir):
    """Pixels agree with an independent Pillow decode (JPEG decoders differ by a few levels)."""
    images, _, ids = _all(data_dir, image_size=64, shuffle_seed=None)
    for image, image_id in zip(images, ids):
        folder = "bicycle" if image_id.startswith("bicycle") else "bird"
        with Image.open(os.path.join(data_dir, "test", folder, image_id + ".jpg")) as pil:
            width, height = pil.size
            scale = 64 / min(width, height)
            size = (max(64, int(width * scale)), max(64, int(height * scale)))
            ref = np.asarray(pil.convert("RGB").resize(size, Image.BILINEAR), np.float32) / 255
        top, left = round((ref.shape[0] - 64) / 2), round((ref.shape[1] - 64) / 2)
        ref = ref[top:top + 64, left:left + 64]
        assert np.abs(image - ref).mean() < 0.01
        assert np.abs(image - ref).max() < 0.06


def test_native_size_images_are_not_resampled(data_dir):
    images, _, ids = _all(data_dir, image_size=96, shuffle_seed=None)
    path = os.path.join(data_dir, "test", "bicycle", ids[0] + ".jpg")
    with open(path, "rb") as f:
        decoded = tf.io.decode_jpeg(f.read()).numpy().astype(np.float32) / 255
    np.testing.assert_allclose(images[0], decoded, atol=1e-6)


def test_tfrecord_conversion_round_trips_images_labels_and_ids(tmp_path, data_dir):
    out = str(tmp_path / "tfrecords")
    count = data.write_tfrecord(data_dir, "test", os.path.join(out, "test.tfrecord"))
    assert count == 8
    assert os.listdir(out) == ["test.tfrecord"]
    assert data.find_split(out, "test") == ("tfrecord", os.path.join(out, "test.tfrecord"))
    from_records = _all(out)
    from_folder = _all(data_dir, shuffle_seed=None)
    order = [from_folder[2].index(i) for i in from_records[2]]
    np.testing.assert_array_equal(from_records[1], from_folder[1][order])
    np.testing.assert_array_equal(from_records[0], from_folder[0][order])
    assert set(from_records[1][:4]) == {0, 1}, "records are shuffled, both classes come early"
    record = next(iter(tf.data.TFRecordDataset(os.path.join(out, "test.tfrecord"))))
    example = tf.train.Example.FromString(record.numpy())
    features = example.features.feature
    assert features["image/format"].bytes_list.value == [b"jpeg"]
    label = features["image/class/label"].int64_list.value[0]
    assert features["image/class/text"].bytes_list.value == [data.CLASS_NAMES[label].encode()]
    image_id = features["image/id"].bytes_list.value[0].decode()
    with open(os.path.join(data_dir, "test", data.CLASS_NAMES[label], image_id + ".jpg"),
              "rb") as f:
        assert features["image/encoded"].bytes_list.value[0] == f.read()


@pytest.mark.slow
def test_convert_command_writes_one_tfrecord_per_split(tmp_path, data_dir):
    out = str(tmp_path / "converted")
    proc = subprocess.run(
        [sys.executable, "-m", "llr.convert_to_tfrecord", f"--data_dir={data_dir}",
         f"--output_dir={out}", "--splits=test"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test: 8 examples -> {os.path.join(out, 'test.tfrecord')}" in proc.stdout
    assert data.count_examples(out, "test") == 8


def test_folder_without_the_two_class_folders_is_a_missing_data_error(tmp_path):
    os.makedirs(tmp_path / "test" / "bird")
    os.makedirs(tmp_path / "test" / "cat")
    with pytest.raises(MissingDataError, match=r"test lacks the class folder\(s\) bicycle/.*"
                                               r"found: bird, cat"):
        list(data.iterate_split(str(tmp_path), "test", 2))
    with pytest.raises(FileNotFoundError, match="split 'train' not found"):
        list(data.iterate_split(str(tmp_path), "train", 2))


def test_empty_class_folder_is_a_data_error(tmp_path, data_dir):
    os.makedirs(tmp_path / "test" / "bicycle")
    os.makedirs(tmp_path / "test" / "bird")
    with pytest.raises(DataError, match=r"bicycle holds no .jpg"):
        data.list_examples(str(tmp_path), "test")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_unreadable_image_is_a_data_error_naming_the_file(tmp_path, data_dir, content):
    root = write_photo_folder(str(tmp_path), per_class=2)
    bad = os.path.join(root, "test", "bird", "broken.jpg")
    if content == "truncated":
        with open(os.path.join(root, "test", "bird", "bird000.jpg"), "rb") as f:
            content = f.read()[:600]
    with open(bad, "wb") as f:
        f.write(content)
    with pytest.raises(DataError, match=rf"^{bad}: (not a JPEG|cannot decode)") as info:
        list(data.iterate_split(root, "test", 2))
    assert "{{" not in str(info.value)
    with pytest.raises(DataError, match=rf"^{bad}"):
        data.write_tfrecord(root, "test", str(tmp_path / "out.tfrecord"))
    assert not os.path.exists(tmp_path / "out.tfrecord")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_bad_tfrecord_image_names_the_record(tmp_path):
    path = str(tmp_path / "test.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        good = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
        writer.write(data.make_tf_example(good, 0, "a"))
        writer.write(data.make_tf_example(b"\xff\xd8\xff garbage", 1, "b"))
    with pytest.raises(DataError, match=r"test.tfrecord, record 1: cannot decode"):
        list(data.iterate_split(str(tmp_path), "test", 1, image_size=8))
