"""Adversarial Logit Pairing at toy scale, end to end, with the project's own programs.

1. Builds a small dataset in the raw Tiny ImageNet folder layout from real images: the
   handwritten digits bundled with scikit-learn (1,797 scans, 10 classes), upscaled to
   32x32 RGB JPEG files, with ``wnids.txt``, per-class ``*_boxes.txt`` and
   ``val/val_annotations.txt``.
2. Converts it with ``tiny_imagenet_converter/converter.py``.
3. Trains a clean model, an ALP model (``pgdll`` training attack, logit pairing 0.5) and an
   LLR model (local linearity regulariser at the same eps and number of inner steps) with
   ``train.py``.
4. Evaluates them with ``eval.py --eval_once`` on clean and PGD inputs, and under a strong
   attack on the true labels (``--strong_attack``: AutoAttack at eps 16, by default with a
   reduced budget so that the demo stays short), and prints a table and the masking checks'
   warnings.

Every step is the command a user would type; they are echoed as they run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", os.path.join(REPO, "demo_output"),
                    "Where the raw folder, TFRecords, checkpoints and results go.")
flags.DEFINE_integer("train_steps", 2000, "Training steps of each model.")
flags.DEFINE_integer("image_size", 32, "Image size of the generated dataset and the model.")
flags.DEFINE_string("train_attack", "pgdll_16_4_3", "ALP model's training attack.")
flags.DEFINE_list("eval_attacks", ["pgd_16_2_10", "pgd_16_1_100"],
                  "Evaluation attacks: the paper's, and a much longer PGD.")
flags.DEFINE_string("strong_attack", "autoattack_16_20_500",
                    "Strong evaluation attack (eval.py --adv_method), '' to skip it. The default "
                    "is AutoAttack at eps 16 with 20 iterations for APGD-CE, APGD-T and FAB-T "
                    "(standard: 100) and 500 Square queries (standard: 5000); 'autoattack_16' "
                    "is the standard one (several minutes more).")
flags.DEFINE_string("llr_hparams", "llr_lambda=4,llr_eps=16,llr_steps=3,llr_eps_warmup_steps=500",
                    "LLR model's regulariser: DeepMind's CIFAR-10 weights (llr_mu=1.2, "
                    "llr_xent_weight=2 by default) at the ALP attack's eps and number of steps.")
flags.DEFINE_list("models", ["clean", "alp", "llr"], "Which of the models to train and evaluate.")
flags.DEFINE_string("model_name", "resnet_v2_tiny", "Model of every run.")
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


def run_command(*args: str) -> None:
    """Runs one of the project's programs as a user would, echoing the command."""
    print("+ python " + " ".join(args), flush=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log_path = os.path.join(FLAGS.work_dir, "logs", os.path.basename(args[0]) + ".log")
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, *args], stdout=log, stderr=log, env=env)
    if proc.returncode != 0:
        print(f"failed with status {proc.returncode}; see {log_path}", file=sys.stderr)
        sys.exit(proc.returncode)


def main(argv: list[str]) -> None:
    del argv
    start = time.time()
    work = os.path.abspath(FLAGS.work_dir)
    raw, records = os.path.join(work, "raw"), os.path.join(work, "tfrecords")
    results = os.path.join(work, "results.csv")
    for path in (raw, records, os.path.join(work, "logs")):
        os.makedirs(path, exist_ok=True)
    if os.path.exists(results):
        os.remove(results)

    sizes = build_raw_folder(raw, FLAGS.image_size, FLAGS.seed)
    print(f"Built {raw}: {sizes['train']} training and {sizes['validation']} validation digits")
    run_command(os.path.join(REPO, "tiny_imagenet_converter", "converter.py"),
                f"--input_dir={raw}", f"--output_dir={records}")

    common = ["--dataset=tiny_imagenet", f"--tiny_imagenet_data_dir={records}",
              f"--model_name={FLAGS.model_name}", f"--dataset_image_size={FLAGS.image_size}"]
    base_hparams = "batch_size=32,eval_batch_size=50,lr_schedule=fixed,learning_rate=0.02"
    runs = {
        "clean": base_hparams,
        "alp": f"{base_hparams},train_adv_method={FLAGS.train_attack},train_lp_weight=0.5",
        "llr": f"{base_hparams},{FLAGS.llr_hparams}",
    }
    unknown = sorted(set(FLAGS.models) - set(runs))
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {sorted(runs)}")
    runs = {name: runs[name] for name in FLAGS.models}
    for name, hparams in runs.items():
        tick = time.time()
        run_command(os.path.join(REPO, "train.py"), f"--output_dir={work}/train_{name}",
                    *common, f"--hparams={hparams}", f"--max_steps={FLAGS.train_steps}",
                    f"--save_model_steps={FLAGS.train_steps}", "--save_summaries_steps=50",
                    "--moving_average_decay=0.99", f"--seed={FLAGS.seed}")
        print(f"trained {name} in {time.time() - tick:.0f}s", flush=True)
    strong = [FLAGS.strong_attack] if FLAGS.strong_attack else []
    attack_seconds: dict[str, float] = {}
    for name in runs:
        for attack in ["clean", *FLAGS.eval_attacks, *strong]:
            extra = []
            if attack in strong:
                # The per-attack report and the masking checks; the ALP model's training
                # attack is compared with the strong one.
                extra = [f"--report_file={work}/report_{name}.json"]
                if name == "alp":
                    extra.append(f"--training_adv_method={FLAGS.train_attack}")
            attack_start = time.time()
            run_command(os.path.join(REPO, "eval.py"), f"--train_dir={work}/train_{name}",
                        "--eval_once", *common, "--hparams=eval_batch_size=50",
                        f"--adv_method={attack}", f"--eval_name={name}:{attack}",
                        "--moving_average_decay=0.99", f"--output_file={results}", *extra)
            attack_seconds[attack] = attack_seconds.get(attack, 0.0) + time.time() - attack_start

    scores = {}
    with open(results) as f:
        for line in f:
            eval_name, accuracy, _ = line.strip().split(",")
            model, attack = eval_name.split(":")
            scores[(model, attack)] = float(accuracy)
    print()
    columns = ["clean", *FLAGS.eval_attacks, *strong]
    width = max(16, *(len(name) + 2 for name in columns))
    print("accuracy on the validation digits")
    print(f"{'model':<8}" + "".join(f"{name:>{width}}" for name in columns))
    for model in runs:
        print(f"{model:<8}" + "".join(f"{scores[(model, name)]:>{width}.1%}" for name in columns))
    for model in runs if strong else ():
        with open(os.path.join(work, f"report_{model}.json")) as f:
            report = json.load(f)
        steps = ", ".join(f"{row['name']} {row['accuracy']:.1%}" for row in report["attacks"])
        print(f"\n{model}: {FLAGS.strong_attack} on {report['n']} digits: {steps}")
        for warning in report["warnings"]:
            print(f"  WARNING: {warning}")
    print("\nseconds per evaluation attack (all models): " + ", ".join(
        f"{name} {seconds:.0f}" for name, seconds in attack_seconds.items()))
    print(f"Wall time {time.time() - start:.0f}s; outputs in {work}")


if __name__ == "__main__":
    app.run(main)
