"""Builders of small, real data sets for the tests: raw image folders and TFRecord files.

Everything is written with real codecs (tf.io.encode_jpeg/encode_png, Pillow for CMYK and
greyscale JPEGs) and real TFRecord writers. The record layouts are spelled out here
independently of the library's converters, so tests can compare the two.

``write_tiny_imagenet_tfrecords`` is also used by the end-to-end training tests: its images
carry a class-dependent colour and stripe pattern, so a small model can learn something.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# ---- Images ---------------------------------------------------------------------------------

def synthetic_photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [height, width, 3] with smooth gradients and a little noise, like a photo.

    Smooth content keeps JPEG errors small, so decoded pixels can be compared with the
    source within a few grey levels.
    """
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    a, b, c = rng.uniform(0.2, 1.0, size=(3, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 1, 3))
    image = 0.5 + 0.25 * np.sin(2 * np.pi * (a * x + b * y) + phase) + 0.2 * (c - 0.6) * (x - y)
    image = image * 255 + rng.normal(0, 2.0, size=(height, width, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def class_pattern_image(label: int, num_classes: int, size: int,
                        rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: a class-specific colour and stripe orientation, plus noise."""
    hue = label / max(num_classes, 1)
    colour = 0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    angle = np.pi * ((label * 0.618034) % 1.0)
    frequency = 2 + label % 5
    y, x = np.mgrid[0:size, 0:size] / size
    shift = rng.uniform(0, 1)
    stripes = np.sin(2 * np.pi * (frequency * (x * np.cos(angle) + y * np.sin(angle)) + shift))
    image = colour[None, None, :] + 0.2 * stripes[:, :, None]
    image = image + rng.normal(0, 0.05, size=(size, size, 3))
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """RGB JPEG bytes (TensorFlow's encoder)."""
    return tf.io.encode_jpeg(image, format="rgb", quality=quality).numpy()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes (TensorFlow's encoder)."""
    return tf.io.encode_png(image).numpy()


def encode_cmyk_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """A CMYK JPEG of an RGB image, as found among ImageNet's files (Pillow writes it)."""
    from PIL import Image  # test-only dependency

    buffer = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def encode_greyscale_jpeg(image: np.ndarray, quality: int = 95) -> tuple[bytes, np.ndarray]:
    """A one-component JPEG of an RGB image, and the RGB image it should decode to."""
    from PIL import Image  # test-only dependency

    grey = Image.fromarray(image).convert("L")
    buffer = io.BytesIO()
    grey.save(buffer, "JPEG", quality=quality)
    expected = np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)
    return buffer.getvalue(), expected


def wnid(index: int) -> str:
    """A made-up WordNet id, 'n' and 8 digits like real ones."""
    return f"n{index + 1:08d}"


# ---- Records ----------------------------------------------------------------------------------

def _bytes(value: bytes | str) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _example(features: dict[str, tf.train.Feature]) -> bytes:
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def tiny_imagenet_example(image_bytes: bytes, label: int, image_format: str = "jpeg",
                          class_wnid: str | None = None,
                          box: tuple[int, int, int, int] = (0, 0, 63, 63)) -> bytes:
    """A serialized record in the Tiny ImageNet converter's layout."""
    return _example({
        "image/encoded": _bytes(image_bytes),
        "image/format": _bytes(image_format),
        "label/wnid": _bytes(class_wnid or wnid(label)),
        "label/tiny_imagenet": _ints([label]),
        "bbox/xmin": _ints([box[0]]),
        "bbox/ymin": _ints([box[1]]),
        "bbox/xmax": _ints([box[2]]),
        "bbox/ymax": _ints([box[3]]),
    })


def imagenet_example(image_bytes: bytes, label: int,
                     boxes: Sequence[tuple[float, float, float, float]] = (),
                     filename: str = "image.JPEG") -> bytes:
    """A serialized record in TF-Slim's ImageNet layout; boxes are (xmin, ymin, xmax, ymax)."""
    return _example({
        "image/encoded": _bytes(image_bytes),
        "image/format": _bytes("JPEG"),
        "image/filename": _bytes(filename),
        "image/class/label": _ints([label]),
        "image/object/bbox/xmin": _floats([b[0] for b in boxes]),
        "image/object/bbox/ymin": _floats([b[1] for b in boxes]),
        "image/object/bbox/xmax": _floats([b[2] for b in boxes]),
        "image/object/bbox/ymax": _floats([b[3] for b in boxes]),
        "image/object/bbox/label": _ints([label] * len(boxes)),
    })


def write_records(path: str, records: Sequence[bytes]) -> str:
    """Writes serialized records into one TFRecord file; returns its path."""
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


def write_imagenet_shards(directory: str, split: str,
                          shards: Sequence[Sequence[bytes]]) -> list[str]:
    """Writes ``split-0000i-of-0000n`` shards with the given records; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    return [write_records(os.path.join(directory, f"{split}-{i:05d}-of-{len(shards):05d}"),
                          records) for i, records in enumerate(shards)]


def write_tiny_imagenet_tfrecords(directory: str, num_train: int, num_val: int,
                                  image_size: int = 64, num_classes: int = 200,
                                  seed: int = 0) -> None:
    """Writes ``train.tfrecord`` and ``validation.tfrecord`` of learnable synthetic classes.

    Labels cycle through 0..num_classes-1; every image is a JPEG of
    :func:`class_pattern_image`, so the class is visible in colour and stripe direction.
    """
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train.tfrecord", num_train), ("validation.tfrecord", num_val)):
        labels = rng.permutation(np.arange(count) % num_classes)
        records = []
        for label in labels:
            image = class_pattern_image(int(label), num_classes, image_size, rng)
            records.append(tiny_imagenet_example(
                encode_jpeg(image), int(label),
                box=(0, 0, image_size - 1, image_size - 1)))
        write_records(os.path.join(directory, name), records)


# ---- Raw folders ------------------------------------------------------------------------------

@dataclasses.dataclass
class RawImage:
    """A source image written by a raw-folder builder, with what a converter should record."""

    path: str
    rgb: np.ndarray  # the pixels a decoder should produce (within JPEG tolerance)
    data: bytes  # the file's bytes
    wnid: str | None = None
    box: tuple | None = None  # Tiny: int pixels; ImageNet: list of relative boxes
    exact: bool = False  # decoded pixels equal rgb exactly (PNG)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_raw_tiny_imagenet(root: str, num_classes: int = 3, train_per_class: int = 3,
                            num_val: int = 4, num_test: int = 2, image_size: int = 16,
                            seed: int = 0) -> dict[str, list[RawImage]]:
    """Writes a Tiny ImageNet folder (wnids.txt, train/, val/, test/) and returns its content.

    The second training image of class 0 and the last validation image are PNGs with a
    '.png' name; all others are JPEGs named '.JPEG' as in the real data set.

    Returns:
      {'wnids': ..., 'train': [...], 'validation': [...], 'test': [...]} where the splits
      are lists of RawImage.
    """
    rng = np.random.default_rng(seed)
    wnids = [wnid(100 + i) for i in range(num_classes)]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))

    def make(path_without_ext: str, png: bool, class_wnid: str | None,
             box: tuple | None) -> RawImage:
        rgb = synthetic_photo(image_size, image_size, rng)
        data = encode_png(rgb) if png else encode_jpeg(rgb)
        path = path_without_ext + (".png" if png else ".JPEG")
        _write(path, data)
        return RawImage(path, rgb, data, class_wnid, box, exact=png)

    def random_box() -> tuple[int, int, int, int]:
        x1, y1 = (int(v) for v in rng.integers(0, image_size // 2, size=2))
        x2, y2 = (int(v) for v in rng.integers(image_size // 2, image_size, size=2))
        return (x1, y1, x2, y2)

    train = []
    for c, class_wnid in enumerate(wnids):
        folder = os.path.join(root, "train", class_wnid)
        rows = []
        for i in range(train_per_class):
            image = make(os.path.join(folder, "images", f"{class_wnid}_{i}"),
                         png=(c == 0 and i == 1), class_wnid=class_wnid, box=random_box())
            train.append(image)
            rows.append("\t".join([os.path.basename(image.path)] + [str(v) for v in image.box]))
        with open(os.path.join(folder, f"{class_wnid}_boxes.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")

    validation = []
    rows = []
    for i in range(num_val):
        class_wnid = wnids[i % num_classes]
        image = make(os.path.join(root, "val", "images", f"val_{i}"), png=(i == num_val - 1),
                     class_wnid=class_wnid, box=random_box())
        validation.append(image)
        rows.append("\t".join([os.path.basename(image.path), class_wnid]
                              + [str(v) for v in image.box]))
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")

    test = [make(os.path.join(root, "test", "images", f"test_{i}"), png=False,
                 class_wnid=None, box=None) for i in range(num_test)]
    return {"wnids": wnids, "train": train, "validation": validation, "test": test}


def _box_xml(filename: str, width: int, height: int,
             objects: Sequence[tuple[str, tuple[int, int, int, int]]]) -> str:
    parts = [f"<annotation><folder>x</folder><filename>{filename}</filename>"
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x1, y1, x2, y2) in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "".join(parts)


def write_raw_imagenet(root: str, seed: int = 0) -> dict:
    """Writes a miniature raw ImageNet (train/, val/, label files, bbox XMLs, metadata).

    Content: 4 challenge wnids in ``synsets.txt`` (3 with a train folder), a stray
    non-class folder, 7 training images among which a PNG named '.JPEG' (as ImageNet's
    n02105855_2933.JPEG), a CMYK JPEG and a greyscale JPEG; 3 validation images
    ILSVRC2012_val_0000000{1,2,4}.JPEG labelled by a 5-line file (a subset of the lines).
    Box XMLs state a display size 4x the real one (boxes are relative to it), and
    include a box beyond the border (clipped), a degenerate box and a box of another
    challenge class (both dropped).

    Returns:
      dict with 'synsets', 'texts', 'train' and 'validation' (lists of RawImage whose box is
      the list of expected relative (xmin, ymin, xmax, ymax)), and the paths 'train_dir',
      'validation_dir', 'labels_file', 'validation_labels_file', 'metadata_file',
      'bounding_box_dir'.
    """
    rng = np.random.default_rng(seed)
    synsets = [wnid(500 + i) for i in range(4)]
    texts = {w: f"class {i}, a thing" for i, w in enumerate(synsets)}
    paths = {
        "train_dir": os.path.join(root, "train"),
        "validation_dir": os.path.join(root, "val"),
        "labels_file": os.path.join(root, "synsets.txt"),
        "validation_labels_file": os.path.join(root, "validation_labels.txt"),
        "metadata_file": os.path.join(root, "metadata.txt"),
        "bounding_box_dir": os.path.join(root, "bbox"),
    }
    os.makedirs(root, exist_ok=True)
    with open(paths["labels_file"], "w") as f:
        f.write("\n".join(synsets) + "\n")
    with open(paths["metadata_file"], "w") as f:
        f.write("".join(f"{w}\t{t}\n" for w, t in texts.items()))
        f.write(f"{wnid(999)}\tnot a challenge class\n")

    def image_bytes(kind: str, height: int, width: int) -> tuple[bytes, np.ndarray, bool]:
        rgb = synthetic_photo(height, width, rng)
        if kind == "png":
            return encode_png(rgb), rgb, True
        if kind == "cmyk":
            return encode_cmyk_jpeg(rgb), rgb, False
        if kind == "grey":
            data, expected = encode_greyscale_jpeg(rgb)
            return data, expected, False
        return encode_jpeg(rgb), rgb, False

    def add_boxes(stem: str, folder: str, class_wnid: str, height: int, width: int,
                  kind: int) -> list:
        """Writes the XML of one image; returns the boxes a converter must keep."""
        # The display size is 4x the real one: relative = pixel / display size.
        dw, dh = 4 * width, 4 * height
        objects = [(class_wnid, (dw // 4, dh // 4, dw // 2, dh // 2))]
        expected = [(0.25, 0.25, 0.5, 0.5)]
        if kind == 1:  # beyond the border, given as max/min swapped: clipped and ordered
            objects.append((class_wnid, (dw + 10, dh // 2, dw // 2, -5)))
            expected.append((0.5, 0.0, 1.0, 0.5))
            objects.append((class_wnid, (dw // 2, 3, dw // 2, dh)))  # empty: dropped
            other = synsets[(synsets.index(class_wnid) + 1) % len(synsets)]
            objects.append((other, (0, 0, dw, dh)))  # another challenge class: dropped
            objects.append(("Scottish_deerhound", (0, 0, dw, dh)))  # not a wnid: kept
            expected.append((0.0, 0.0, 1.0, 1.0))
        xml = _box_xml(stem, dw, dh, objects)
        _write(os.path.join(paths["bounding_box_dir"], folder, stem + ".xml"), xml.encode())
        return expected

    train = []
    kinds = {(0, 1): "png", (1, 0): "cmyk", (2, 1): "grey"}
    for c, class_wnid in enumerate(synsets[:3]):
        count = 3 if c == 0 else 2
        for i in range(count):
            height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
            data, expected, exact = image_bytes(kinds.get((c, i), "jpeg"), height, width)
            stem = f"{class_wnid}_{i + 1}"
            path = os.path.join(paths["train_dir"], class_wnid, stem + ".JPEG")
            _write(path, data)
            boxes = (add_boxes(stem, class_wnid, class_wnid, height, width, i)
                     if i < 2 else [])
            train.append(RawImage(path, expected, data, class_wnid, boxes, exact))
    _write(os.path.join(paths["train_dir"], "n99999999", "n99999999_1.JPEG"),
           encode_jpeg(synthetic_photo(8, 8, rng)))

    validation_wnids = [synsets[3], synsets[0], synsets[1], synsets[2], synsets[3]]
    with open(paths["validation_labels_file"], "w") as f:
        f.write("\n".join(validation_wnids) + "\n")
    validation = []
    for number in (1, 2, 4):
        height, width = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        data, expected, exact = image_bytes("jpeg", height, width)
        stem = f"ILSVRC2012_val_{number:08d}"
        path = os.path.join(paths["validation_dir"], stem + ".JPEG")
        _write(path, data)
        class_wnid = validation_wnids[number - 1]
        boxes = add_boxes(stem, "", class_wnid, height, width, 0) if number == 2 else []
        validation.append(RawImage(path, expected, data, class_wnid, boxes, exact))
    return {"synsets": synsets, "texts": texts, "train": train, "validation": validation,
            **paths}
