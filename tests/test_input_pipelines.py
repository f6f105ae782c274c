"""The ImageNet and Tiny ImageNet input pipelines: shapes, ranges, crops, decoding, bad data."""

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.datasets import dataset_factory
from adversarial_logit_pairing.errors import ConfigError, DataError, MissingDataError
from tests import data_builders


def checkerboard(height, width, cell=2):
    """Black/white cells: the sharpest edges, where bicubic resizing overshoots most."""
    y, x = np.mgrid[0:height, 0:width]
    board = (((y // cell) + (x // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


def to_model_units(pixels):
    return (np.asarray(pixels, np.float64) / 255.0 - 0.5) * 2.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny"))
    data_builders.write_tiny_imagenet_tfrecords(directory, num_train=6, num_val=5,
                                                image_size=16, num_classes=200, seed=1)
    return directory


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("imagenet"))
    rng = np.random.default_rng(2)
    for split in ("train", "validation"):
        shards = []
        for shard in range(2):
            records = []
            for i in range(3):
                label = 1 + 3 * shard + i
                image = (checkerboard(24, 32) if i == 0
                         else data_builders.synthetic_photo(24, 32, rng))
                boxes = [(0.1, 0.2, 0.7, 0.9)] if i == 1 else []
                records.append(data_builders.imagenet_example(
                    data_builders.encode_jpeg(image), label, boxes))
            shards.append(records)
        data_builders.write_imagenet_shards(directory, split, shards)
    return directory


def collect(dataset, num_batches):
    images, labels = [], []
    for batch_images, batch_labels in dataset.take(num_batches):
        images.append(batch_images.numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
@pytest.mark.parametrize("is_training", [True, False])
def test_batches_are_static_float_images_in_bounds_with_int64_labels(
        name, is_training, tiny_dir, imagenet_dir):
    data_dir = tiny_dir if name == "tiny_imagenet" else imagenet_dir
    split = "train" if is_training else "validation"
    dataset, examples, num_classes, bounds = dataset_factory.get_dataset(
        name, split, batch_size=2, image_size=20, is_training=is_training, data_dir=data_dir)
    assert dataset.element_spec[0] == tf.TensorSpec([2, 20, 20, 3], tf.float32)
    assert dataset.element_spec[1] == tf.TensorSpec([2], tf.int64)
    assert bounds == (-1.0, 1.0)
    if name == "tiny_imagenet":
        assert (num_classes, examples) == (200, 100000 if is_training else 10000)
    else:
        assert (num_classes, examples) == (1001, 1281167 if is_training else 50000)
    images, labels = collect(dataset, 2)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert np.all((labels >= 0) & (labels < num_classes))
    if name == "imagenet":
        assert np.all(labels >= 1)  # 0 is the background class, never stored


def test_checkerboard_hits_the_bounds_after_resize_without_exceeding_them(imagenet_dir):
    dataset, *_ = dataset_factory.get_dataset("imagenet", "validation", 1, 15, False,
                                              imagenet_dir)
    images, labels = collect(dataset, 6)
    board = images[labels == 1][0]  # the first record of shard 0 is a checkerboard
    assert board.min() == -1.0 and board.max() == 1.0


def _write_eval_record(directory, image_bytes):
    os.makedirs(directory, exist_ok=True)
    data_builders.write_imagenet_shards(
        directory, "validation", [[data_builders.imagenet_example(image_bytes, 7)]])


@pytest.mark.parametrize("height, width", [(40, 64), (64, 40)])
def test_imagenet_eval_keeps_the_centre_crop_with_offsets_rounded_up(tmp_path, height, width):
    # Each pixel encodes its position, so the output tells which region survived.
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 3, y * 3, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    crop = int(0.875 * min(height, width))  # 35
    top, left = ((height - crop) + 1) // 2, ((width - crop) + 1) // 2  # odd gaps round up
    expected = to_model_units(image[top:top + crop, left:left + crop])
    for encoding, tolerance in (("png", 1e-6), ("jpeg", 0.05)):
        directory = str(tmp_path / encoding)
        data = (data_builders.encode_png(image) if encoding == "png"
                else data_builders.encode_jpeg(image, quality=100))
        _write_eval_record(directory, data)
        # Output size = crop size: the TF1 bicubic resize is then the identity.
        dataset, *_ = dataset_factory.get_dataset("imagenet", "validation", 1, crop, False,
                                                  directory)
        output = next(iter(dataset))[0][0].numpy()
        np.testing.assert_allclose(output, expected, atol=tolerance, err_msg=encoding)


def tf1_bicubic_reference(image, size):
    """TF1 resize_bicubic in numpy: no half-pixel centres, Keys kernel a=-0.75, edge clamp."""
    def weights(t):
        a = -0.75
        d = np.abs(np.array([1 + t, t, 1 - t, 2 - t]))
        return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)

    def along(axis_length):
        matrix = np.zeros((size, axis_length))
        for i in range(size):
            source = i * axis_length / size
            base = int(np.floor(source))
            for offset, w in zip(range(-1, 3), weights(source - base)):
                matrix[i, min(max(base + offset, 0), axis_length - 1)] += w
        return matrix

    rows, cols = along(image.shape[0]), along(image.shape[1])
    return np.einsum("ij,jkc,lk->ilc", rows, image, cols)


def test_tiny_eval_resize_is_tf1_bicubic(tmp_path):
    image = data_builders.synthetic_photo(16, 12, np.random.default_rng(3))
    image[4:8, 4:8] = 255  # a sharp square: where the two bicubic kernels differ most
    data_builders.write_records(str(tmp_path / "validation.tfrecord"), [
        data_builders.tiny_imagenet_example(data_builders.encode_png(image), 5)])
    dataset, *_ = dataset_factory.get_dataset("tiny_imagenet", "validation", 1, 24, False,
                                              str(tmp_path))
    output = next(iter(dataset))[0][0].numpy()
    reference = np.clip((tf1_bicubic_reference(image / 255.0, 24) - 0.5) * 2, -1, 1)
    # TF looks kernel weights up in a 1024-entry table, hence the small tolerance.
    np.testing.assert_allclose(output, reference, atol=5e-3)


@pytest.mark.parametrize("name", ["tiny_imagenet", "imagenet"])
def test_training_crops_change_between_epochs_while_eval_passes_repeat(
        name, tiny_dir, imagenet_dir):
    data_dir = tiny_dir if name == "tiny_imagenet" else imagenet_dir
    train, *_ = dataset_factory.get_dataset(name, "train", 6, 16, True, data_dir)
    # About 24 epochs of 6 records, one label per record. The shuffle buffer spans epochs, so
    # a record's count is binomial: with 8 batches some record had fewer than 3 copies about
    # once in 20 runs; with 24, about once in 10^7.
    images, labels = collect(train, 24)
    for label in np.unique(labels):
        copies = images[labels == label]
        assert len(copies) >= 3
        # Two draws may coincide (the whole-image fallback with the same flip); all of them
        # coinciding over the epochs would mean the crop is not random.
        distinct = {tuple(np.round(copy, 2).ravel()) for copy in copies}
        assert len(distinct) >= 2, f"record {label}"

    evaluation, *_ = dataset_factory.get_dataset(name, "validation", 1, 16, False, data_dir)
    pass_one, pass_two = collect(evaluation, 100), collect(evaluation, 100)
    np.testing.assert_array_equal(pass_one[0], pass_two[0])
    np.testing.assert_array_equal(pass_one[1], pass_two[1])


def test_png_cmyk_and_greyscale_records_decode_to_rgb(tmp_path):
    colour = np.array([200, 40, 90], np.uint8)
    image = np.tile(colour, (24, 24, 1))
    grey_bytes, grey_rgb = data_builders.encode_greyscale_jpeg(image)
    sources = [
        (data_builders.encode_png(image), colour),
        (data_builders.encode_cmyk_jpeg(image), colour),
        (grey_bytes, grey_rgb[0, 0]),
    ]
    records = [data_builders.imagenet_example(data, label + 1)
               for label, (data, _) in enumerate(sources)]
    data_builders.write_imagenet_shards(str(tmp_path / "imagenet"), "validation", [records])
    data_builders.write_imagenet_shards(str(tmp_path / "imagenet"), "train", [records])
    data_builders.write_records(str(tmp_path / "validation.tfrecord"), [
        data_builders.tiny_imagenet_example(data, label) for label, (data, _) in
        enumerate(sources)])
    pipelines = [
        ("imagenet", "validation", False, str(tmp_path / "imagenet"), 1),
        ("imagenet", "train", True, str(tmp_path / "imagenet"), 1),
        ("tiny_imagenet", "validation", False, str(tmp_path), 0),
    ]
    for name, split, is_training, data_dir, first_label in pipelines:
        dataset, *_ = dataset_factory.get_dataset(name, split, 3, 8, is_training, data_dir)
        images, labels = collect(dataset, 1)
        for image_out, label in zip(images, labels):
            expected = to_model_units(sources[label - first_label][1])
            np.testing.assert_allclose(image_out.mean(axis=(0, 1)), expected, atol=0.04,
                                       err_msg=f"{name} {split} source {label}")


@pytest.mark.parametrize("name, data_dir, split, message", [
    ("tiny_imagenet", None, "train", "--tiny_imagenet_data_dir is not set"),
    ("tiny_imagenet", "{missing}", "train", "--tiny_imagenet_data_dir={missing}: no such"),
    ("tiny_imagenet", "{empty}", "validation",
     "--tiny_imagenet_data_dir={empty}: no file validation.tfrecord"),
    ("imagenet", None, "validation", "--imagenet_data_dir is not set"),
    ("imagenet", "{empty}", "train", "--imagenet_data_dir={empty}: no files matching train-*"),
])
def test_missing_data_names_the_flag_and_the_path(tmp_path, name, data_dir, split, message):
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path)}
    # A temporary file of a running conversion must not count as a shard.
    (tmp_path / ".train-00000-of-00001.tmp-1234").write_bytes(b"")
    with pytest.raises(MissingDataError) as info:
        dataset_factory.get_dataset(name, split, 2, 8, False,
                                    data_dir.format(**paths) if data_dir else None)
    assert message.format(**paths) in str(info.value)


def test_unknown_dataset_or_split_is_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match="cifar10.*imagenet, tiny_imagenet"):
        dataset_factory.get_dataset("cifar10", "train", 2, 8, True, tiny_dir)
    with pytest.raises(ConfigError, match="'test'.*'train' or 'validation'"):
        dataset_factory.get_dataset("tiny_imagenet", "test", 2, 8, False, tiny_dir)


def test_corrupt_jpeg_raises_and_locate_bad_record_names_shard_and_record(tmp_path):
    rng = np.random.default_rng(4)
    good = [data_builders.encode_jpeg(data_builders.synthetic_photo(16, 16, rng))
            for _ in range(8)]
    corrupt = good[0][:len(good[0]) // 2] + b"\x00" * 64  # a truncated download
    shards = [[data_builders.imagenet_example(g, 1) for g in good[:4]],
              [data_builders.imagenet_example(g, 1) for g in good[4:6]]
              + [data_builders.imagenet_example(corrupt, 1)]
              + [data_builders.imagenet_example(good[6], 1)]]
    data_builders.write_imagenet_shards(str(tmp_path), "train", shards)
    dataset, *_ = dataset_factory.get_dataset("imagenet", "train", 2, 8, True, str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError):
        for _ in dataset.take(20):
            pass
    where = dataset_factory.locate_bad_record("imagenet", "train", str(tmp_path))
    assert where is not None and where.startswith("train-00001-of-00002, record 2: ")
    assert "JPEG" in where


def test_out_of_range_label_is_a_bad_record(tmp_path):
    image = data_builders.encode_jpeg(data_builders.synthetic_photo(8, 8,
                                                                    np.random.default_rng(5)))
    data_builders.write_records(str(tmp_path / "validation.tfrecord"), [
        data_builders.tiny_imagenet_example(image, label) for label in (3, 199, 200, 4)])
    dataset, *_ = dataset_factory.get_dataset("tiny_imagenet", "validation", 1, 8, False,
                                              str(tmp_path))
    with pytest.raises(tf.errors.InvalidArgumentError):
        collect(dataset, 4)
    where = dataset_factory.locate_bad_record("tiny_imagenet", "validation", str(tmp_path))
    assert where == "validation.tfrecord, record 2: label/tiny_imagenet outside [0, 200): 200"


def test_locate_bad_record_returns_none_for_good_data(tiny_dir):
    assert dataset_factory.locate_bad_record("tiny_imagenet", "train", tiny_dir) is None


def test_count_records_counts_what_is_there_and_reports_a_truncated_file(
        tiny_dir, imagenet_dir, tmp_path):
    assert dataset_factory.count_records("tiny_imagenet", "validation", tiny_dir) == 5
    assert dataset_factory.count_records("imagenet", "train", imagenet_dir) == 6
    dataset, *_ = dataset_factory.get_dataset("tiny_imagenet", "validation", 2, 8, False,
                                              tiny_dir)
    assert len(list(dataset)) == 2  # 5 records: two full batches, the fifth is dropped

    with open(os.path.join(tiny_dir, "validation.tfrecord"), "rb") as f:
        data = f.read()
    (tmp_path / "validation.tfrecord").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        dataset_factory.count_records("tiny_imagenet", "validation", str(tmp_path))
    # The pipeline raises DataLossError there; the scan names the cut record.
    where = dataset_factory.locate_bad_record("tiny_imagenet", "validation", str(tmp_path))
    assert where is not None and where.startswith("validation.tfrecord, record 4: ")
