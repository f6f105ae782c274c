"""Bad records met while training are fatal and reported with the file and record."""

import os

import numpy as np
import pytest

from adversarial_logit_pairing import training
from adversarial_logit_pairing.errors import DataError
from tests.data_builders import (
    class_pattern_image,
    encode_jpeg,
    imagenet_example,
    tiny_imagenet_example,
    write_imagenet_shards,
    write_records,
)


def _corrupt_jpeg(rng) -> bytes:
    good = encode_jpeg(class_pattern_image(0, 10, 32, rng))
    # A valid header and a cut-off body: is_jpeg says yes, the decoder fails.
    return good[: len(good) // 3]


def _train(tmp_path, dataset, data_flag, data_dir):
    config = training.TrainConfig(
        output_dir=str(tmp_path / "out"), model_name="resnet_v2_tiny", dataset=dataset,
        dataset_image_size=32, hparams="batch_size=4", max_steps=20, save_model_steps=100,
        moving_average_decay=-1, **{data_flag: data_dir},
    )
    return training.train(config)


def test_corrupt_jpeg_in_tiny_imagenet_stops_training_naming_the_record(tmp_path):
    rng = np.random.default_rng(0)
    records = [tiny_imagenet_example(encode_jpeg(class_pattern_image(i % 10, 10, 32, rng)), i % 10)
               for i in range(7)]
    records.insert(5, tiny_imagenet_example(_corrupt_jpeg(rng), 3))
    data_dir = tmp_path / "tiny"
    os.makedirs(data_dir)
    write_records(str(data_dir / "train.tfrecord"), records)
    write_records(str(data_dir / "validation.tfrecord"), records[:4])
    with pytest.raises(DataError, match=r"train\.tfrecord, record 5"):
        _train(tmp_path, "tiny_imagenet", "tiny_imagenet_data_dir", str(data_dir))


def test_corrupt_jpeg_in_an_imagenet_shard_names_the_shard(tmp_path):
    rng = np.random.default_rng(1)
    good = [imagenet_example(encode_jpeg(class_pattern_image(i % 5, 5, 48, rng)), 1 + i % 5)
            for i in range(12)]
    bad_shard = good[6:9] + [imagenet_example(_corrupt_jpeg(rng), 2)] + good[9:]
    write_imagenet_shards(str(tmp_path / "imagenet"), "train", [good[:6], bad_shard])
    with pytest.raises(DataError, match=r"train-00001-of-00002, record 3"):
        _train(tmp_path, "imagenet", "imagenet_data_dir", str(tmp_path / "imagenet"))


def test_truncated_tfrecord_file_stops_training_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    records = [tiny_imagenet_example(encode_jpeg(class_pattern_image(i % 10, 10, 32, rng)), i % 10)
               for i in range(8)]
    data_dir = tmp_path / "tiny"
    os.makedirs(data_dir)
    path = write_records(str(data_dir / "train.tfrecord"), records)
    write_records(str(data_dir / "validation.tfrecord"), records[:4])
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[: len(content) - 100])  # the last record loses its tail
    with pytest.raises(DataError, match=r"train\.tfrecord"):
        _train(tmp_path, "tiny_imagenet", "tiny_imagenet_data_dir", str(data_dir))


def test_corrupt_jpeg_in_the_evaluation_split_names_the_record(tmp_path):
    from adversarial_logit_pairing import evaluation

    rng = np.random.default_rng(3)
    records = [tiny_imagenet_example(encode_jpeg(class_pattern_image(i % 10, 10, 32, rng)), i % 10)
               for i in range(8)]
    data_dir = tmp_path / "tiny"
    os.makedirs(data_dir)
    write_records(str(data_dir / "train.tfrecord"), records)
    write_records(str(data_dir / "validation.tfrecord"),
                  records[:2] + [tiny_imagenet_example(_corrupt_jpeg(rng), 1)] + records[2:])
    trained = _train(tmp_path, "tiny_imagenet", "tiny_imagenet_data_dir", str(data_dir))
    config = evaluation.EvalConfig(
        checkpoint_path=trained.checkpoint_path, model_name="resnet_v2_tiny",
        dataset="tiny_imagenet", dataset_image_size=32, hparams="eval_batch_size=4",
        moving_average_decay=-1, tiny_imagenet_data_dir=str(data_dir),
    )
    with pytest.raises(DataError, match=r"validation\.tfrecord, record 2"):
        evaluation.run(config)
