"""The Tiny ImageNet converter: record contents, shuffling, and its errors on bad input."""

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing.datasets.tiny_imagenet_conversion import convert_tiny_imagenet
from adversarial_logit_pairing.errors import DataError, MissingDataError
from tests import data_builders


def read_examples(path):
    """Every record of a TFRecord file as a dict feature name -> list of values."""
    examples = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        example = tf.train.Example.FromString(record)
        features = {}
        for key, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            features[key] = list(getattr(feature, kind).value)
        examples.append(features)
    return examples


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tiny_raw"))
    manifest = data_builders.write_raw_tiny_imagenet(root)
    synsets = os.path.join(root, "synsets.txt")
    # The ImageNet label of a wnid is its line number in the synsets file.
    imagenet_wnids = ["n77777777"] + list(reversed(manifest["wnids"])) + ["n88888888"]
    with open(synsets, "w") as f:
        f.write("\n".join(imagenet_wnids) + "\n")
    manifest["root"] = root
    manifest["synsets_path"] = synsets
    manifest["imagenet_label"] = {w: imagenet_wnids.index(w) + 1 for w in manifest["wnids"]}
    return manifest


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("tiny_out"))
    counts = convert_tiny_imagenet(raw["root"], output, raw["synsets_path"])
    return output, counts


def test_every_record_matches_its_source_file(raw, converted):
    output, counts = converted
    assert sorted(os.listdir(output)) == ["test.tfrecord", "train.tfrecord",
                                          "validation.tfrecord"]
    for split, file_name in (("train", "train.tfrecord"),
                             ("validation", "validation.tfrecord")):
        examples = read_examples(os.path.join(output, file_name))
        sources = {image.data: image for image in raw[split]}
        assert counts[split] == len(examples) == len(raw[split])
        assert {bytes(e["image/encoded"][0]) for e in examples} == set(sources)
        for example in examples:
            source = sources[bytes(example["image/encoded"][0])]
            expected_format = b"png" if source.path.endswith(".png") else b"jpeg"
            assert example == {
                "image/encoded": [source.data],
                "image/format": [expected_format],
                "label/wnid": [source.wnid.encode()],
                "label/tiny_imagenet": [raw["wnids"].index(source.wnid)],
                "label/imagenet": [raw["imagenet_label"][source.wnid]],
                "bbox/xmin": [source.box[0]],
                "bbox/ymin": [source.box[1]],
                "bbox/xmax": [source.box[2]],
                "bbox/ymax": [source.box[3]],
            }
    test_examples = read_examples(os.path.join(output, "test.tfrecord"))
    assert test_examples == [{"image/encoded": [image.data], "image/format": [b"jpeg"]}
                             for image in raw["test"]]


def test_validation_keeps_file_order_and_png_is_marked(raw, converted):
    output, _ = converted
    examples = read_examples(os.path.join(output, "validation.tfrecord"))
    assert [e["image/encoded"][0] for e in examples] == [i.data for i in raw["validation"]]
    assert examples[-1]["image/format"] == [b"png"]


def test_train_records_are_shuffled_with_a_fixed_seed(raw, converted, tmp_path):
    output, _ = converted
    order = [e["image/encoded"][0] for e in read_examples(os.path.join(output, "train.tfrecord"))]
    assert order != [image.data for image in raw["train"]]  # not the annotation order
    again = str(tmp_path / "again")
    convert_tiny_imagenet(raw["root"], again, raw["synsets_path"])
    with open(os.path.join(output, "train.tfrecord"), "rb") as a, \
            open(os.path.join(again, "train.tfrecord"), "rb") as b:
        assert a.read() == b.read()


def test_without_synsets_file_records_have_no_imagenet_label(raw, tmp_path):
    convert_tiny_imagenet(raw["root"], str(tmp_path))
    examples = read_examples(str(tmp_path / "validation.tfrecord"))
    assert examples and all("label/imagenet" not in e for e in examples)
    assert all("label/tiny_imagenet" in e for e in examples)


# ---- Bad input ---------------------------------------------------------------------------------

def _remove_wnids(root):
    os.remove(os.path.join(root, "wnids.txt"))
    return os.path.join(root, "wnids.txt"), None


def _remove_boxes_file(root):
    path = os.path.join(root, "train", data_builders.wnid(101), f"{data_builders.wnid(101)}"
                        "_boxes.txt")
    os.remove(path)
    return path, None


def _remove_listed_image(root):
    os.remove(os.path.join(root, "val", "images", "val_1.JPEG"))
    return os.path.join(root, "val", "val_annotations.txt"), 2


def _corrupt_image(root):
    # A validation image: by then train.tfrecord has been written under its temporary name.
    path = os.path.join(root, "val", "images", "val_2.JPEG")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:40] + b"\x00garbage" * 20)
    return path, 3


def _bad_coordinate(root):
    class_wnid = data_builders.wnid(100)
    path = os.path.join(root, "train", class_wnid, f"{class_wnid}_boxes.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    lines[1] = lines[1].rsplit("\t", 1)[0] + "\tsixty"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, 2


def _unknown_wnid(root):
    path = os.path.join(root, "val", "val_annotations.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    fields = lines[0].split("\t")
    fields[1] = "n12345678"
    lines[0] = "\t".join(fields)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, 1


@pytest.mark.parametrize("break_input, error", [
    (_remove_wnids, MissingDataError),
    (_remove_boxes_file, MissingDataError),
    (_remove_listed_image, MissingDataError),
    (_corrupt_image, DataError),
    (_bad_coordinate, DataError),
    (_unknown_wnid, DataError),
], ids=["missing_wnids", "class_without_boxes_file", "listed_image_missing",
        "undecodable_image", "non_integer_box", "unknown_wnid"])
def test_bad_input_names_file_and_line_and_leaves_no_output(raw, tmp_path, break_input,
                                                            error):
    root = str(tmp_path / "raw")
    shutil.copytree(raw["root"], root)
    path, line = break_input(root)
    output = tmp_path / "out"
    with pytest.raises(error) as info:
        convert_tiny_imagenet(root, str(output))
    message = str(info.value)
    assert path in message
    if line is not None:
        assert f"line {line}" in message
    assert not output.exists() or os.listdir(output) == []


def test_unwritable_output_dir_is_reported_and_nothing_is_written(raw, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    output = str(blocker / "out")
    with pytest.raises(DataError, match="--output_dir"):
        convert_tiny_imagenet(raw["root"], output)
    assert os.listdir(tmp_path) == ["a_file"]


def test_png_record_decodes_to_the_source_pixels(raw, converted):
    output, _ = converted
    examples = read_examples(os.path.join(output, "train.tfrecord"))
    png = next(e for e in examples if e["image/format"] == [b"png"])
    source = next(i for i in raw["train"] if i.data == png["image/encoded"][0])
    decoded = tf.io.decode_image(png["image/encoded"][0], channels=3).numpy()
    np.testing.assert_array_equal(decoded, source.rgb)


def test_existing_empty_output_dir_that_cannot_be_written_is_reported(raw, unwritable_dir):
    with pytest.raises(DataError, match="--output_dir"):
        convert_tiny_imagenet(raw["root"], unwritable_dir)
    assert os.listdir(unwritable_dir) == []
