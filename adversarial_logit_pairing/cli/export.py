"""``export.py``: a checkpoint to a TF2 SavedModel and a TF-Hub model (no original counterpart)."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging

from adversarial_logit_pairing.cli import config_from_flags, run_program

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint_path", None,
                    "Checkpoint to export: a prefix, or a directory (its latest checkpoint).")
flags.DEFINE_string("export_dir", None,
                    "Directory receiving the SavedModel; written under a temporary name and "
                    "renamed when complete.")
flags.DEFINE_string("model_name", "resnet_v2_50", "Name of the model.")
flags.DEFINE_string("dataset", None,
                    'Dataset whose class count the model has: "tiny_imagenet" (200) or '
                    '"imagenet" (the model\'s: 1001 with a background class, else 1000). '
                    'Default: --num_classes, else the checkpoint\'s.')
flags.DEFINE_integer("num_classes", None,
                     "Number of classes of the logits (default: from --dataset, else read "
                     "from the bias of the checkpoint's classification head).")
flags.DEFINE_float("moving_average_decay", 0.9999,
                   "As eval.py: > 0 exports the moving-average shadows, <= 0 (e.g. -1) the "
                   "plain variables (released checkpoints have no shadows).")
flags.DEFINE_string("trainable_scopes", None,
                    "As eval.py: accepted, without effect on what is restored (with "
                    "--moving_average_decay > 0 every model variable is read from its shadow).")
flags.DEFINE_integer("image_size", None,
                     "Fix the height and width of the serving signature's images (default: "
                     "any size; the models were trained at --dataset_image_size, 64).")
flags.DEFINE_enum("format", "both", ["saved_model", "hub", "both"],
                  "saved_model: the serving_default signature (images -> logits, "
                  "probabilities); hub: TF Hub's reusable SavedModel API (hub.load, "
                  "hub.KerasLayer); both: one directory with the two.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --export_dir.")


def main(argv: Sequence[str]) -> None:
    del argv
    from adversarial_logit_pairing import export

    config = config_from_flags(export.ExportConfig, export_format=FLAGS.format)
    logging.set_verbosity(logging.INFO)
    export.export(config)


def run() -> None:
    """Console-script entry point (``alp-export``)."""
    run_program(main, "export.py")


if __name__ == "__main__":
    run()
