"""``train.py``: trains a model with clean, adversarial or ALP training (original flags)."""

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

flags.DEFINE_integer("max_steps", -1, "Number of steps to stop at (-1: no limit).")
flags.DEFINE_string("output_dir", None,
                    "Training directory where checkpoints and summaries are saved; a restart "
                    "with the same directory resumes from its latest checkpoint.")
flags.DEFINE_integer("ps_tasks", 0,
                     "Number of parameter servers. TF1 parameter-server training does not exist "
                     "in this port: only 0 is accepted (use --strategy=multi_worker).")
flags.DEFINE_integer("task", 0,
                     "Task ID (TF1). With --strategy=multi_worker it must agree with TF_CONFIG's "
                     "task index; otherwise only 0 is accepted.")
flags.DEFINE_integer("num_summary_images", 3, "Number of images to display in TensorBoard.")
flags.DEFINE_integer("save_summaries_steps", 100,
                     "The frequency with which summaries are saved, in steps.")
flags.DEFINE_integer("save_summaries_secs", None,
                     "The frequency with which summaries are saved, in seconds (takes "
                     "precedence over --save_summaries_steps when set).")
flags.DEFINE_integer("save_model_steps", 500,
                     "The frequency with which the model is saved, in steps.")
flags.DEFINE_string("hparams", "", "Hyper parameters, e.g. 'batch_size=64,train_lp_weight=0.5'.")
flags.DEFINE_integer("replicas_to_aggregate", 1,
                     "Number of gradients to collect before param updates, as the original's "
                     "SyncReplicasOptimizer: one update averages the gradients of N batches "
                     "(each replica in sync runs N/replicas successive batches of batch_size), "
                     "global_step advances once per update, the learning rate is multiplied by "
                     "N and the steps per epoch divided by it. 1: the replicas in sync; "
                     "otherwise a multiple of them.")
flags.DEFINE_integer("worker_replicas", 1,
                     "Number of worker replicas (TF1 SyncReplicasOptimizer). With "
                     "--strategy=multi_worker it must agree with TF_CONFIG; otherwise only 1.")
flags.DEFINE_float("moving_average_decay", 0.9999,
                   "The decay to use for the moving average (<= 0: no moving average).")
flags.DEFINE_string("finetune_checkpoint_path", None,
                    "Checkpoint (or directory: its latest checkpoint) to initialise from when "
                    "--output_dir has no checkpoint yet. If None then no fine tuning is done.")
flags.DEFINE_string("finetune_exclude_pretrained_scopes", "",
                    "Comma-separated variable scopes to exclude when loading the checkpoint "
                    "for fine tuning.")
flags.DEFINE_string("finetune_trainable_scopes", None,
                    "If set, comma-separated variable scopes of the trainable variables.")
flags.DEFINE_string("ensemble_sources", "",
                    "Ensemble adversarial training (Tramer et al.): comma-separated "
                    "MODEL:CHECKPOINT static source models (registered names, TF1 checkpoint "
                    "prefixes or directories; one scope may repeat, e.g. two inception_v3 "
                    "checkpoints). Each batch's adversarial examples come from a source drawn "
                    "uniformly among the model being trained and these, which stay frozen, run "
                    "in inference mode and are not saved.")
flags.DEFINE_integer("seed", 0, "Seed of model initialisation and attack randomness.")
distribution.define_flags()
define_model_and_data_flags()
flags.DEFINE_bool("sync_batch_norm", False,
                  "Normalise with the statistics of the global batch (all replicas) instead of "
                  "each replica's own, as the original did.")
flags.DEFINE_bool("jit_compile", False,
                  "Compile the training step (attack and update) with XLA; TPUs always do.")


def main(argv: Sequence[str]) -> None:
    del argv
    from adversarial_logit_pairing import training

    # Cheap checks first: a multi-worker start-up waits for the whole cluster. Those that
    # depend on the replicas run again in train() once the strategy exists.
    config = config_from_flags(training.TrainConfig)
    strategy = strategy_from_flags(lambda _: training.validate(config))
    training.train(config, strategy)


def run() -> None:
    """Console-script entry point (``alp-train``)."""
    run_program(main, "train.py")


if __name__ == "__main__":
    run()
