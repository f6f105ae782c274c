"""Converts the Tiny ImageNet folder into TFRecord files.

Usage (the original command line)::

  python tiny_imagenet_converter/converter.py --input_dir=tiny-imagenet-200 \
      --output_dir=tiny_imagenet_tfrecord [--imagenet_synsets_path=imagenet_lsvrc_2015_synsets.txt]

or, once the package is installed, ``alp-convert-tiny-imagenet`` with the same flags.

Writes ``train.tfrecord`` (shuffled), ``validation.tfrecord`` and ``test.tfrecord``; the
layout is described in adversarial_logit_pairing/datasets/tiny_imagenet_conversion.py.
"""

import os
import sys

if __package__ in (None, ""):
    # Run as a script: make the repository root importable without installing the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from adversarial_logit_pairing.cli import run_converter  # noqa: E402
from adversarial_logit_pairing.datasets import tiny_imagenet_conversion  # noqa: E402

flags.DEFINE_string("input_dir", "", "Input directory (the unpacked tiny-imagenet-200 folder)")
flags.DEFINE_string("output_dir", "", "Output directory")
flags.DEFINE_string("imagenet_synsets_path", "",
                    "Optional path to imagenet_lsvrc_2015_synsets.txt; adds label/imagenet")


def run() -> None:
    """Console-script entry point (alp-convert-tiny-imagenet)."""
    run_converter(tiny_imagenet_conversion.convert_tiny_imagenet, "converter.py")


if __name__ == "__main__":
    run()
