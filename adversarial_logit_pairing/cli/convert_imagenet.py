"""Converts raw ImageNet folders into TF-Slim TFRecord shards (train-*, validation-*).

Replaces TF-Slim's TF1-only build_imagenet_data.py. Example::

  alp-convert-imagenet --train_dir=ILSVRC2012/train --validation_dir=ILSVRC2012/val \
      --validation_labels_file=imagenet_2012_validation_synset_labels.txt \
      --labels_file=imagenet_lsvrc_2015_synsets.txt \
      --imagenet_metadata_file=imagenet_metadata.txt \
      --bounding_box_dir=ILSVRC2012/bbox_train --output_dir=imagenet_tfrecord

The record layout is described in adversarial_logit_pairing/datasets/imagenet_conversion.py.
"""


from absl import flags

from adversarial_logit_pairing.cli import run_converter
from adversarial_logit_pairing.datasets import imagenet_conversion

flags.DEFINE_string("train_dir", None, "Training images: <train_dir>/<wnid>/*.JPEG")
flags.DEFINE_string("validation_dir", None, "Validation images, one flat folder")
flags.DEFINE_string("validation_labels_file", None,
                    "One wnid per line; line i labels ILSVRC2012_val_<i>.JPEG "
                    "(TF-Slim's imagenet_2012_validation_synset_labels.txt)")
flags.DEFINE_string("labels_file", None,
                    "The 1000 challenge wnids, one per line; label = line number "
                    "(TF-Slim's imagenet_lsvrc_2015_synsets.txt)")
flags.DEFINE_string("imagenet_metadata_file", None,
                    "Optional lines wnid<TAB>text for image/class/text")
flags.DEFINE_string("bounding_box_dir", None,
                    "Optional ImageNet bounding-box XML folder (<dir>/<wnid>/*.xml or "
                    "<dir>/*.xml)")
flags.DEFINE_string("output_dir", None, "Output directory for the shards")
flags.DEFINE_integer("train_shards", 1024, "Number of training shards")
flags.DEFINE_integer("validation_shards", 128, "Number of validation shards")
flags.DEFINE_integer("num_threads", 8, "Threads converting images in parallel")


def run() -> None:
    """Console-script entry point (alp-convert-imagenet)."""
    run_converter(imagenet_conversion.convert_imagenet, "convert_imagenet.py")


if __name__ == "__main__":
    run()
