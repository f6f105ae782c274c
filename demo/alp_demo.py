"""Adversarial Logit Pairing at toy scale, end to end, with the project's own programs.

1. Builds a small dataset in the raw Tiny ImageNet folder layout from real images: the
   handwritten digits bundled with scikit-learn (1,797 scans, 10 classes), upscaled to
   32x32 RGB JPEG files, with ``wnids.txt``, per-class ``*_boxes.txt`` and
   ``val/val_annotations.txt``.
2. Converts it with ``tiny_imagenet_converter/converter.py``.
3. Trains six models with ``train.py``, two side by side: on ``resnet_v2_tiny`` a clean model,
   an ALP model (``pgdll`` training attack, logit pairing 0.5), an LLR model (local linearity
   regulariser at the same eps and number of inner steps) and a Step-LL model (Kurakin et
   al.'s mixed batch); on ``efficientnet_tiny`` a clean model and its AdvProp twin (auxiliary
   batch norms, the paper's PGD rule at eps 2).
4. Evaluates them with ``eval.py --eval_once`` on clean inputs, under Step-LL and PGD, and
   under the standard AutoAttack on the true labels (``--strong_attack``, on the first
   ``--strong_examples`` digits), and prints a table and the masking checks' warnings.

Every step is the command a user would type; they are echoed as they run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", os.path.join(REPO, "demo_output"),
                    "Where the raw folder, TFRecords, checkpoints and results go.")
flags.DEFINE_integer("train_steps", 2000, "Training steps of the ResNet runs.")
flags.DEFINE_integer("effnet_train_steps", 1000, "Training steps of the EfficientNet runs "
                     "(eff_clean, eff_advprop), which converge sooner.")
flags.DEFINE_integer("image_size", 32, "Image size of the generated dataset and the model.")
flags.DEFINE_string("train_attack", "pgdll_16_4_3", "ALP model's training attack.")
flags.DEFINE_string("stepll_hparams",
                    "train_adv_method=stepllrand_16,train_adv_fraction=0.5,"
                    "train_adv_loss_weight=0.3",
                    "Step-LL model: Kurakin et al.'s recipe (random eps up to 16, half of each "
                    "batch replaced by its adversarial examples, adversarial loss weight 0.3).")
flags.DEFINE_string("advprop_hparams", "advprop=true,train_adv_method=pgd_2_1_3",
                    "AdvProp model: the paper's attacker rule (PGD, eps 1..4, step 1, eps+1 "
                    "steps) at eps 2, through auxiliary batch norms.")
flags.DEFINE_string("llr_hparams", "llr_lambda=4,llr_eps=16,llr_steps=3,llr_eps_warmup_steps=500",
                    "LLR model's regulariser: DeepMind's CIFAR-10 weights (llr_mu=1.2, "
                    "llr_xent_weight=2 by default) at the ALP attack's eps and number of steps.")
flags.DEFINE_list("eval_attacks", ["stepll_16", "pgd_16_2_10"],
                  "Evaluation attacks: a single step and the paper's PGD (add e.g. pgd_16_1_100 "
                  "for a much longer PGD).")
flags.DEFINE_string("strong_attack", "autoattack_16",
                    "Strong evaluation attack (eval.py --adv_method), '' to skip it: the standard "
                    "AutoAttack at eps 16 (APGD-CE, APGD-T, FAB-T, Square on the true labels).")
flags.DEFINE_integer("strong_examples", 50,
                     "The strong attack runs on the first this many validation digits "
                     "(eval.py --num_examples; -1: all of them).")
flags.DEFINE_list("models", ["clean", "alp", "llr", "stepll", "eff_clean", "eff_advprop"],
                  "Which of the models to train and evaluate.")
flags.DEFINE_string("model_name", "resnet_v2_tiny", "Model of the ResNet runs.")
flags.DEFINE_string("effnet_model_name", "efficientnet_tiny",
                    "Model of the EfficientNet runs (eff_clean, eff_advprop).")
flags.DEFINE_integer("parallel", 2, "Models trained and evaluated side by side (one process "
                     "each): most steps of these small models leave a core idle.")
flags.DEFINE_integer("seed", 0, "Seed of the dataset split and of training.")


def build_raw_folder(root: str, image_size: int, seed: int) -> dict:
    """Writes the digits as a raw Tiny ImageNet folder; returns the split sizes."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # 8x8, ink in [0, 1]
    labels = digits.target
    wnids = [f"n{9000000 + d:08d}" for d in range(10)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    num_val = len(labels) // 5
    val_idx, train_idx = order[:num_val], order[num_val:]

    def encode(index: int) -> bytes:
        picture = tf.image.resize(images[index][..., None], [image_size, image_size],
                                  method="bilinear")
        picture = tf.image.grayscale_to_rgb(1.0 - picture)  # dark ink on white paper
        return tf.io.encode_jpeg(tf.cast(tf.round(picture * 255.0), tf.uint8), quality=95).numpy()

    full_box = f"0\t0\t{image_size - 1}\t{image_size - 1}"
    with open(os.path.join(root, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for class_index, wnid in enumerate(wnids):
        image_dir = os.path.join(root, "train", wnid, "images")
        os.makedirs(image_dir, exist_ok=True)
        lines = []
        for i in train_idx[labels[train_idx] == class_index]:
            name = f"{wnid}_{i}.JPEG"
            with open(os.path.join(image_dir, name), "wb") as f:
                f.write(encode(i))
            lines.append(f"{name}\t{full_box}")
        with open(os.path.join(root, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "test", "images"), exist_ok=True)
    annotations = []
    for i in val_idx:
        name = f"val_{i}.JPEG"
        with open(os.path.join(root, "val", "images", name), "wb") as f:
            f.write(encode(i))
        annotations.append(f"{name}\t{wnids[labels[i]]}\t{full_box}")
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(annotations) + "\n")
    for i in val_idx[:20]:
        with open(os.path.join(root, "test", "images", f"test_{i}.JPEG"), "wb") as f:
            f.write(encode(i))
    return {"train": len(train_idx), "validation": len(val_idx)}


class CommandFailed(Exception):
    """A program of the demo exited non-zero; the message names its log."""


_PRINT_LOCK = threading.Lock()
_FAILED = threading.Event()


def say(text: str) -> None:
    """One line on stdout, whole, whichever model's thread prints it."""
    with _PRINT_LOCK:
        print(text, flush=True)


def run_command(log_name: str, *args: str) -> None:
    """Runs one of the project's programs as a user would, echoing the command; its output
    goes to ``logs/<log_name>.log``."""
    if _FAILED.is_set():  # another model's command failed: start nothing new
        raise CommandFailed("stopped after an earlier failure")
    say("+ python " + " ".join(args))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log_path = os.path.join(FLAGS.work_dir, "logs", f"{log_name}.log")
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, *args], stdout=log, stderr=log, env=env)
    if proc.returncode != 0:
        _FAILED.set()
        raise CommandFailed(f"python {os.path.basename(args[0])} failed with status "
                            f"{proc.returncode}; see {log_path}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model of the table: its registered model and train.py hparams."""

    model_name: str
    hparams: str

    @property
    def training_attack(self) -> str:
        """The attack it trains with, as train.py parses ``hparams`` ('' for none): the
        masking check compares it with the strong one."""
        from adversarial_logit_pairing.hparams import default_hparams

        method = default_hparams().parse(self.hparams).train_adv_method
        return "" if method == "clean" else method


def demo_runs() -> dict[str, Run]:
    """The table's rows, in the order of --models."""
    base = "batch_size=32,eval_batch_size=50,lr_schedule=fixed,learning_rate=0.02"
    runs = {
        "clean": Run(FLAGS.model_name, base),
        "alp": Run(FLAGS.model_name,
                   f"{base},train_adv_method={FLAGS.train_attack},train_lp_weight=0.5"),
        "llr": Run(FLAGS.model_name, f"{base},{FLAGS.llr_hparams}"),
        "stepll": Run(FLAGS.model_name, f"{base},{FLAGS.stepll_hparams}"),
        "eff_clean": Run(FLAGS.effnet_model_name, base),
        "eff_advprop": Run(FLAGS.effnet_model_name, f"{base},{FLAGS.advprop_hparams}"),
    }
    unknown = sorted(set(FLAGS.models) - set(runs))
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {sorted(runs)}")
    return {name: runs[name] for name in FLAGS.models}


def train_and_evaluate(name: str, run: Run, data_flags: list[str], results: str,
                       seconds: dict) -> None:
    """train.py, then eval.py --eval_once under each attack: one model's whole row."""
    work = FLAGS.work_dir
    common = [*data_flags, f"--model_name={run.model_name}"]
    steps = FLAGS.effnet_train_steps if run.model_name == FLAGS.effnet_model_name else (
        FLAGS.train_steps)
    tick = time.time()
    run_command(f"train_{name}", os.path.join(REPO, "train.py"),
                f"--output_dir={work}/train_{name}", *common, f"--hparams={run.hparams}",
                f"--max_steps={steps}", f"--save_model_steps={steps}",
                "--save_summaries_steps=50", "--moving_average_decay=0.99",
                f"--seed={FLAGS.seed}")
    seconds[(name, "training")] = time.time() - tick
    say(f"trained {name} in {seconds[(name, 'training')]:.0f}s")
    strong = [FLAGS.strong_attack] if FLAGS.strong_attack else []
    for attack in ["clean", *FLAGS.eval_attacks, *strong]:
        extra, batch = [], 50
        if attack in strong:
            # The per-attack report and the masking checks, which compare the model's training
            # attack with the strong one.
            extra = [f"--report_file={work}/report_{name}.json",
                     f"--num_examples={FLAGS.strong_examples}"]
            if FLAGS.strong_examples > 0:
                batch = min(batch, FLAGS.strong_examples)
            if run.training_attack:
                extra.append(f"--training_adv_method={run.training_attack}")
        tick = time.time()
        run_command(f"eval_{name}_{attack}", os.path.join(REPO, "eval.py"),
                    f"--train_dir={work}/train_{name}", "--eval_once", *common,
                    f"--hparams=eval_batch_size={batch}", f"--adv_method={attack}",
                    f"--eval_name={name}:{attack}", "--moving_average_decay=0.99",
                    f"--output_file={results}", *extra)
        seconds[(name, attack)] = time.time() - tick


def print_table(runs: dict[str, Run], results: str, seconds: dict) -> None:
    """The accuracy table, the strong attack's per-attack lines and warnings, and the times."""
    scores = {}
    with open(results) as f:
        for line in f:
            eval_name, accuracy, _ = line.strip().split(",")
            model, attack = eval_name.split(":")
            scores[(model, attack)] = float(accuracy)
    strong = [FLAGS.strong_attack] if FLAGS.strong_attack else []
    columns = ["clean", *FLAGS.eval_attacks, *strong]
    width = max(14, *(len(name) + 2 for name in columns))
    print("\naccuracy on the validation digits")
    print(f"{'model':<13}" + "".join(f"{name:>{width}}" for name in columns))
    for model in runs:
        print(f"{model:<13}" + "".join(f"{scores[(model, name)]:>{width}.1%}" for name in columns))
    for model in runs if strong else ():
        with open(os.path.join(FLAGS.work_dir, f"report_{model}.json")) as f:
            report = json.load(f)
        steps = ", ".join(f"{row['name']} {row['accuracy']:.1%}" for row in report["attacks"])
        print(f"\n{model}: {FLAGS.strong_attack} on the first {report['n']} digits: {steps}")
        for warning in report["warnings"]:
            print(f"  WARNING: {warning}")
    print("\nseconds: " + "; ".join(
        f"{model} " + ", ".join(f"{what} {seconds[(model, what)]:.0f}"
                                for what in ["training", *columns] if (model, what) in seconds)
        for model in runs))


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    FLAGS.work_dir = work = os.path.abspath(FLAGS.work_dir)
    runs = demo_runs()
    raw, records = os.path.join(work, "raw"), os.path.join(work, "tfrecords")
    results = os.path.join(work, "results.csv")
    for path in (raw, records, os.path.join(work, "logs")):
        os.makedirs(path, exist_ok=True)
    if os.path.exists(results):
        os.remove(results)

    sizes = build_raw_folder(raw, FLAGS.image_size, FLAGS.seed)
    print(f"Built {raw}: {sizes['train']} training and {sizes['validation']} validation digits")
    run_command("converter", os.path.join(REPO, "tiny_imagenet_converter", "converter.py"),
                f"--input_dir={raw}", f"--output_dir={records}")
    data_flags = ["--dataset=tiny_imagenet", f"--tiny_imagenet_data_dir={records}",
                  f"--dataset_image_size={FLAGS.image_size}"]
    seconds: dict = {}
    # Longest rows first, so that the last to start are the short ones.
    order = sorted(runs, key=lambda name: ROW_COST.get(name, 0), reverse=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, FLAGS.parallel)) as pool:
        futures = [pool.submit(train_and_evaluate, name, runs[name], data_flags, results,
                               seconds) for name in order]
        errors = [future.exception() for future in futures]
    failures = [str(error) for error in errors if error is not None]
    if failures:
        print("\n".join(dict.fromkeys(failures)), file=sys.stderr)
        sys.exit(1)
    print_table(runs, results, seconds)
    print(f"Wall time {time.time() - start:.0f}s; outputs in {work}")


# Measured seconds of each row (training and evaluation), to start the long ones first.
ROW_COST = {"eff_advprop": 400, "llr": 330, "alp": 250, "stepll": 160, "eff_clean": 150,
            "clean": 60}


if __name__ == "__main__":
    app.run(main)
