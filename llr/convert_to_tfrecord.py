"""``python -m llr.convert_to_tfrecord``: bird-or-bicycle folders to one TFRecord per split.

Reads ``<data_dir>/<split>/{bicycle,bird}/*.jpg`` and writes ``<output_dir>/<split>.tfrecord``
(features in :mod:`llr.data`), which ``python -m llr.evaluate --data_dir=<output_dir>`` reads
like the folders. Every image is decoded once, so a broken file stops the conversion with its
name.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging

from adversarial_logit_pairing.cli import run_program
from adversarial_logit_pairing.errors import ConfigError
from llr import data

FLAGS = flags.FLAGS

flags.DEFINE_string("data_dir", None, "Directory with <split>/{bicycle,bird}/*.jpg.")
flags.DEFINE_string("output_dir", None, "Directory to write <split>.tfrecord files into.")
flags.DEFINE_list("splits", ["train", "test"], "Splits to convert (train, test, extras).")
flags.DEFINE_integer("shuffle_seed", 0,
                     "Seed of the record order (so that the first records mix both classes); "
                     "-1 keeps the sorted order, bicycles first.")


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    if not FLAGS.data_dir or not FLAGS.output_dir:
        raise ConfigError("--data_dir and --output_dir are required")
    if not FLAGS.splits:
        raise ConfigError("--splits is empty")
    seed = None if FLAGS.shuffle_seed < 0 else FLAGS.shuffle_seed
    for split in FLAGS.splits:
        # Check every split before writing any, so a typo does not leave half the work done.
        data.list_examples(FLAGS.data_dir, split)
    for split in FLAGS.splits:
        output = data.tfrecord_path(FLAGS.output_dir, split)
        count = data.write_tfrecord(FLAGS.data_dir, split, output, shuffle_seed=seed)
        logging.info("Wrote %d examples of %s to %s", count, split, output)
        print(f"{split}: {count} examples -> {output}")


def run() -> None:
    """Console-script entry point (``llr-convert``)."""
    run_program(main, "llr-convert")


if __name__ == "__main__":
    run()
