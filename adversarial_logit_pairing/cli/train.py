"""``train.py``: trains a model with clean, adversarial or ALP training (original flags)."""

from __future__ import annotations

from typing import Sequence

from absl import flags, logging

from adversarial_logit_pairing.cli import run_program
from adversarial_logit_pairing.errors import ConfigError

FLAGS = flags.FLAGS

flags.DEFINE_integer("max_steps", -1, "Number of steps to stop at (-1: no limit).")
flags.DEFINE_string("output_dir", None,
                    "Training directory where checkpoints and summaries are saved; a restart "
                    "with the same directory resumes from its latest checkpoint.")
flags.DEFINE_integer("ps_tasks", 0,
                     "Number of parameter servers. TF1 parameter-server training does not exist "
                     "in this port: only 0 is accepted.")
flags.DEFINE_integer("task", 0, "Task ID for running distributed training (only 0 here).")
flags.DEFINE_string("master", "", "TensorFlow master (TF1 sessions); only '' is accepted.")
flags.DEFINE_string("model_name", "resnet_v2_50", "Name of the model.")
flags.DEFINE_string("dataset", "imagenet", 'Dataset: "tiny_imagenet" or "imagenet".')
flags.DEFINE_integer("dataset_image_size", 64, "Size of the images in the dataset.")
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
                     "Number of gradients to collect before param updates: scales the learning "
                     "rate and divides the steps per epoch, as in the original.")
flags.DEFINE_integer("worker_replicas", 1,
                     "Number of worker replicas (TF1 SyncReplicasOptimizer); only 1 here.")
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
flags.DEFINE_string("imagenet_data_dir", None,
                    "Directory with the TF-Slim ImageNet TFRecords (train-*, validation-*).")
flags.DEFINE_string("tiny_imagenet_data_dir", None,
                    "Directory with train.tfrecord and validation.tfrecord of Tiny ImageNet.")
flags.DEFINE_integer("seed", 0, "Seed of model initialisation and attack randomness.")


def check_distribution_flags(ps_tasks: int, task: int, master: str, worker_replicas: int) -> None:
    """Rejects the TF1 distribution settings this port cannot honour, saying why."""
    if ps_tasks or task or master or worker_replicas > 1:
        raise ConfigError(
            f"--ps_tasks={ps_tasks} --task={task} --master={master!r} "
            f"--worker_replicas={worker_replicas}: TF1 parameter-server / SyncReplicas "
            "training does not exist in TensorFlow 2; run with the defaults (one process). "
            "Multi-device training through tf.distribute is tracked separately."
        )


def main(argv: Sequence[str]) -> None:
    del argv
    from adversarial_logit_pairing import training

    check_distribution_flags(FLAGS.ps_tasks, FLAGS.task, FLAGS.master, FLAGS.worker_replicas)
    config = training.TrainConfig(
        output_dir=FLAGS.output_dir,
        max_steps=FLAGS.max_steps,
        model_name=FLAGS.model_name,
        dataset=FLAGS.dataset,
        dataset_image_size=FLAGS.dataset_image_size,
        num_summary_images=FLAGS.num_summary_images,
        save_summaries_steps=FLAGS.save_summaries_steps,
        save_summaries_secs=FLAGS.save_summaries_secs,
        save_model_steps=FLAGS.save_model_steps,
        hparams=FLAGS.hparams,
        replicas_to_aggregate=FLAGS.replicas_to_aggregate,
        moving_average_decay=FLAGS.moving_average_decay,
        finetune_checkpoint_path=FLAGS.finetune_checkpoint_path,
        finetune_exclude_pretrained_scopes=FLAGS.finetune_exclude_pretrained_scopes,
        finetune_trainable_scopes=FLAGS.finetune_trainable_scopes,
        imagenet_data_dir=FLAGS.imagenet_data_dir,
        tiny_imagenet_data_dir=FLAGS.tiny_imagenet_data_dir,
        seed=FLAGS.seed,
    )
    logging.set_verbosity(logging.INFO)
    training.train(config)


def run() -> None:
    """Console-script entry point (``alp-train``)."""
    run_program(main, "train.py")


if __name__ == "__main__":
    run()
