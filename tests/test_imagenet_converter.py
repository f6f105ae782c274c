"""The raw-folder ImageNet converter: TF-Slim record layout, RGB re-encoding, boxes, errors."""

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from adversarial_logit_pairing.datasets.imagenet_conversion import convert_imagenet
from adversarial_logit_pairing.errors import ConfigError, DataError
from tests import data_builders


def read_examples(paths):
    examples = []
    for path in paths:
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            examples.append({key: list(getattr(f, f.WhichOneof("kind")).value)
                             for key, f in example.features.feature.items()})
    return examples


def convert(raw, output, **overrides):
    args = dict(output_dir=output, labels_file=raw["labels_file"], train_dir=raw["train_dir"],
                validation_dir=raw["validation_dir"],
                validation_labels_file=raw["validation_labels_file"],
                bounding_box_dir=raw["bounding_box_dir"],
                imagenet_metadata_file=raw["metadata_file"], train_shards=2,
                validation_shards=2, num_threads=2)
    args.update(overrides)
    return convert_imagenet(**args)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return data_builders.write_raw_imagenet(str(tmp_path_factory.mktemp("imagenet_raw")))


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("imagenet_out"))
    counts = convert(raw, output)
    return output, counts


def test_shards_are_named_like_tf_slim_and_hold_every_image(raw, converted):
    output, counts = converted
    assert sorted(os.listdir(output)) == [
        "train-00000-of-00002", "train-00001-of-00002",
        "validation-00000-of-00002", "validation-00001-of-00002"]
    assert counts == {"train": len(raw["train"]), "validation": len(raw["validation"])}


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_record_has_tf_slim_features_rgb_pixels_and_relative_boxes(raw, converted,
                                                                         split):
    output, _ = converted
    paths = sorted(os.path.join(output, name) for name in os.listdir(output)
                   if name.startswith(split))
    examples = {e["image/filename"][0].decode(): e for e in read_examples(paths)}
    sources = {os.path.basename(image.path): image for image in raw[split]}
    assert set(examples) == set(sources)
    for name, source in sources.items():
        example = examples[name]
        label = raw["synsets"].index(source.wnid) + 1
        height, width = source.rgb.shape[:2]
        assert example["image/format"] == [b"JPEG"]
        assert example["image/colorspace"] == [b"RGB"]
        assert example["image/channels"] == [3]
        assert example["image/height"] == [height]
        assert example["image/width"] == [width]
        assert example["image/class/label"] == [label]
        assert example["image/class/synset"] == [source.wnid.encode()]
        assert example["image/class/text"] == [raw["texts"][source.wnid].encode()]
        boxes = list(zip(*(example[f"image/object/bbox/{k}"]
                           for k in ("xmin", "ymin", "xmax", "ymax"))))
        np.testing.assert_allclose(np.reshape(boxes, (-1, 4)),
                                   np.reshape(source.box, (-1, 4)), atol=1e-6)
        assert example["image/object/bbox/label"] == [label] * len(source.box)

        encoded = example["image/encoded"][0]
        assert tf.io.is_jpeg(encoded)
        assert tf.image.extract_jpeg_shape(encoded).numpy().tolist() == [height, width, 3]
        if source.data[:3] == b"\xff\xd8\xff" and not _needs_reencoding(source.data):
            assert encoded == source.data  # plain RGB JPEGs are kept byte for byte
        # Reference: Pillow's decoding of the source file, in RGB. TF and Pillow decode the
        # same bytes ~1.5 grey levels apart and re-encoding adds ~1; a wrong colour
        # conversion (CMYK, greyscale, channel order) is off by tens.
        reference = np.asarray(Image.open(io.BytesIO(source.data)).convert("RGB"), float)
        decoded = tf.io.decode_jpeg(encoded).numpy().astype(float)
        assert np.abs(decoded - reference).mean() < 4.0, name
        assert np.abs(decoded - source.rgb).mean() < 6.0, name


def _needs_reencoding(data):
    return tf.image.extract_jpeg_shape(data).numpy()[2] != 3


def test_png_cmyk_and_greyscale_sources_were_reencoded(raw, converted):
    output, _ = converted
    paths = [os.path.join(output, n) for n in os.listdir(output) if n.startswith("train")]
    examples = {e["image/filename"][0].decode(): e for e in read_examples(paths)}
    kinds = {}
    for image in raw["train"]:
        if not tf.io.is_jpeg(image.data):
            kinds["png"] = image
        elif tf.image.extract_jpeg_shape(image.data).numpy()[2] == 4:
            kinds["cmyk"] = image
        elif tf.image.extract_jpeg_shape(image.data).numpy()[2] == 1:
            kinds["grey"] = image
    assert sorted(kinds) == ["cmyk", "grey", "png"]
    for image in kinds.values():
        encoded = examples[os.path.basename(image.path)]["image/encoded"][0]
        assert encoded != image.data
        assert tf.image.extract_jpeg_shape(encoded).numpy()[2] == 3


def test_reconversion_writes_identical_shards(raw, converted, tmp_path):
    output, _ = converted
    convert(raw, str(tmp_path), validation_dir=None)
    for name in ("train-00000-of-00002", "train-00001-of-00002"):
        with open(os.path.join(output, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read()


def test_undecodable_image_names_the_file_and_leaves_no_shard(raw, tmp_path):
    root = str(tmp_path / "raw")
    shutil.copytree(os.path.dirname(raw["labels_file"]), root)
    bad = os.path.join(root, "train", raw["synsets"][1], f"{raw['synsets'][1]}_2.JPEG")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"garbage" * 30)
    moved = {key: value.replace(os.path.dirname(raw["labels_file"]), root)
             for key, value in raw.items() if key.endswith(("_dir", "_file"))}
    output = tmp_path / "out"
    with pytest.raises(DataError, match="cannot decode image") as info:
        convert(moved, str(output), validation_dir=None, num_threads=1)
    assert bad in str(info.value)
    assert os.listdir(output) == []


def test_validation_label_line_missing_for_an_image_number_is_reported(raw, tmp_path):
    labels = tmp_path / "short_labels.txt"
    labels.write_text(f"{raw['synsets'][0]}\n{raw['synsets'][1]}\n")  # no line 4
    with pytest.raises(DataError, match="ILSVRC2012_val_00000004.JPEG: image number 4"):
        convert(raw, str(tmp_path / "out"), train_dir=None,
                validation_labels_file=str(labels))
    assert not (tmp_path / "out").exists()


def test_shards_of_another_shard_count_are_refused(raw, converted, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "train-00000-of-00016").write_bytes(b"")
    with pytest.raises(ConfigError, match="train-00000-of-00016"):
        convert(raw, str(output), validation_dir=None)


def test_existing_empty_output_dir_that_cannot_be_written_is_reported(raw, unwritable_dir):
    with pytest.raises(DataError, match="--output_dir=.*cannot write"):
        convert(raw, unwritable_dir)
    assert os.listdir(unwritable_dir) == []
