"""``eval.py``: clean and adversarial accuracy of checkpoints (original flags)."""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from adversarial_logit_pairing import distribution
from adversarial_logit_pairing.cli import (
    config_from_flags,
    define_model_and_data_flags,
    run_program,
    strategy_from_flags,
)

FLAGS = flags.FLAGS

flags.DEFINE_string("train_dir", None,
                    "Training directory. If specified then this program runs in continuous "
                    "evaluation mode.")
flags.DEFINE_string("checkpoint_path", None,
                    "Path to the checkpoint (or a directory: its latest). If specified then "
                    "this program evaluates only this checkpoint one time.")
flags.DEFINE_string("output_file", None,
                    "File to append 'eval_name,accuracy,top5' to (one line per evaluated "
                    "checkpoint).")
flags.DEFINE_string("eval_name", "default", "Name for eval subdirectory.")
flags.DEFINE_string("adv_method", "clean",
                    "Method which is used to generate adversarial examples.")
flags.DEFINE_string("hparams", "", "Hyper parameters (only eval_batch_size matters here).")
flags.DEFINE_string("split_name", "validation", "Name of the split: train or validation.")
flags.DEFINE_float("moving_average_decay", 0.9999,
                   "> 0: evaluate the moving-average shadows; <= 0 (e.g. -1): the plain "
                   "variables (released checkpoints have no shadows).")
flags.DEFINE_integer("eval_interval_secs", 120,
                     "The frequency, in seconds, with which evaluation is run.")
flags.DEFINE_integer("num_examples", -1,
                     "If positive - maximum number of example to use for evaluation.")
flags.DEFINE_bool("eval_once", False, "If true then evaluate model only once.")
flags.DEFINE_string("trainable_scopes", None,
                    "Accepted as in the original (the --finetune_trainable_scopes of a "
                    "fine-tuning run) and, as there, without effect on what is restored: with "
                    "--moving_average_decay > 0 every model variable, batch-norm statistics "
                    "included, is read from its moving-average shadow.")
flags.DEFINE_string("predictions_file", None,
                    "Optional .npz file receiving the per-example labels, logits and "
                    "predictions of the (last) evaluated checkpoint.")
flags.DEFINE_float("timeout_secs", None,
                   "Continuous mode: stop when no new checkpoint appeared for this long "
                   "(default: wait forever, as the original).")
distribution.define_flags()
define_model_and_data_flags()


def main(argv: Sequence[str]) -> None:
    del argv
    from adversarial_logit_pairing import evaluation

    strategy = strategy_from_flags(
        lambda dist: evaluation.refuse_multi_worker(dist.strategy == "multi_worker"))
    evaluation.run(config_from_flags(evaluation.EvalConfig), strategy)


def run() -> None:
    """Console-script entry point (``alp-eval``)."""
    run_program(main, "eval.py")


if __name__ == "__main__":
    run()
