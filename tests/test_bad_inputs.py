"""Every program answers a bad input with one line naming the culprit, and exit status 2.

The walk: each command-line program (train.py, eval.py, export.py, the two converters,
llr.evaluate) is run on a table of inputs a user gets wrong (a flag value absl refuses, an
hparam, learning-rate schedule values, an attack description, SPSA settings, a missing,
corrupt or foreign checkpoint, a missing data folder, a bad Hub module handle, an output
path that cannot be created). Every input fails before any training or evaluation starts, so
a run is mostly a TensorFlow start-up (about 4.5 CPU seconds). The first row of each program
is a true ``python <program>`` start; its other rows share one process per program
(``run_concurrently(in_one_process=True)``), each still the program's whole ``run()`` with
its own command line, stderr and exit status: 12 start-ups instead of 34.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation
from adversarial_logit_pairing.cli import EXIT_USER_ERROR
from adversarial_logit_pairing.errors import DataError
from llr import evaluation as llr_evaluation
from tests.data_builders import write_tiny_imagenet_tfrecords
from tests.llr_builders import write_photo_folder
from tests.program_runs import run_concurrently

# The name each program prints before ': error: '.
PROGRAM_NAMES = {
    "train.py": "train.py",
    "eval.py": "eval.py",
    "export.py": "export.py",
    "tiny_imagenet_converter/converter.py": "converter.py",
    "adversarial_logit_pairing.cli.convert_imagenet": "convert_imagenet.py",
    "llr.evaluate": "llr-evaluate",
}
MODEL = ["--model_name=resnet_v2_tiny", "--dataset_image_size=32"]


def _write_checkpoints(root: str) -> dict:
    """Paths of a foreign checkpoint (another network's names) and a corrupt one."""
    foreign = os.path.join(root, "foreign")
    checkpoints.save({"global_step": tf.Variable(7, dtype=tf.int64),
                      "other_net/logits/biases": tf.Variable(tf.zeros([200]))}, foreign, step=7)
    corrupt = os.path.join(root, "corrupt")
    prefix = checkpoints.save({"global_step": tf.Variable(3, dtype=tf.int64)}, corrupt, step=3)
    with open(prefix + ".index", "wb") as f:
        f.write(b"this is not a checkpoint index")
    return {"foreign": foreign, "corrupt": corrupt}


def _cases(root: str, data_dir: str, llr_dir: str, ckpt: dict) -> dict:
    """{name: (program, flags, culprit)}: ``culprit`` must appear in the error line."""
    missing = os.path.join(root, "missing")
    a_file = os.path.join(root, "a_file")
    with open(a_file, "w") as f:
        f.write("not a directory")
    data = ["--dataset=tiny_imagenet", f"--tiny_imagenet_data_dir={data_dir}", *MODEL]
    train = ["train.py", f"--output_dir={os.path.join(root, 'out')}", *data]
    evaluate = ["eval.py", f"--checkpoint_path={ckpt['foreign']}", *data]
    export = ["export.py", MODEL[0], f"--export_dir={os.path.join(root, 'export')}"]
    llr = ["llr.evaluate", f"--data_dir={llr_dir}", "--attacks=clean",
           f"--latents_module={missing}/latents", f"--linear_module={missing}/linear"]
    rows = {
        # train.py: flags and hparams
        "train_unknown_flag_value": (*train, "--strategy=bogus", "--strategy=bogus"),
        "train_flag_of_wrong_type": (*train, "--max_steps=abc", "--max_steps=abc"),
        "train_unknown_flag": (*train, "--no_such_flag=1", "no_such_flag"),
        "train_positional_argument": (*train, "stray", "stray"),
        "train_unknown_hparam": (*train, "--hparams=bach_size=3", "bach_size"),
        "train_bad_attack": (*train, "--hparams=train_adv_method=pgd_1_2", "pgd_1_2"),
        "train_bad_lr_schedule": (
            *train, "--hparams=lr_schedule=step,lr_decay_epochs=[3,1],lr_list=[1.0,0.1,0.01]",
            "lr_decay_epochs"),
        "train_lr_decay_under_a_step": (
            *train, "--hparams=lr_num_epochs_per_decay=0.00001", "lr_num_epochs_per_decay"),
        "train_unknown_model": (*train, "--model_name=resnet_v9", "resnet_v9"),
        "train_unknown_dataset": (*train, "--dataset=cifar", "cifar"),
        "train_missing_data_dir": (*train, f"--tiny_imagenet_data_dir={missing}",
                                   "--tiny_imagenet_data_dir"),
        "train_ps_tasks": (*train, "--ps_tasks=2", "--ps_tasks"),
        "train_multi_worker_without_tf_config": (*train, "--strategy=multi_worker", "TF_CONFIG"),
        "train_output_dir_is_a_file": (*train, f"--output_dir={a_file}/out", "--output_dir"),
        "train_missing_finetune_checkpoint": (
            *train, f"--finetune_checkpoint_path={missing}", "--finetune_checkpoint_path"),
        # eval.py
        "eval_bad_attack": (*evaluate, "--adv_method=pgdll_x", "pgdll_x"),
        "eval_no_checkpoint_flag": ("eval.py", *data, "--train_dir"),
        "eval_two_checkpoint_flags": (*evaluate, f"--train_dir={root}", "--checkpoint_path"),
        "eval_unknown_hparam": (*evaluate, "--hparams=eval_bach_size=3", "eval_bach_size"),
        "eval_bad_split": (*evaluate, "--split_name=test", "--split_name"),
        "eval_missing_data_dir": (*evaluate, f"--tiny_imagenet_data_dir={missing}",
                                  "--tiny_imagenet_data_dir"),
        "eval_missing_checkpoint": (*evaluate, f"--checkpoint_path={missing}",
                                    "--checkpoint_path"),
        "eval_corrupt_checkpoint": (*evaluate, f"--checkpoint_path={ckpt['corrupt']}",
                                    "cannot read checkpoint"),
        "eval_checkpoint_of_another_model": (*evaluate, "--moving_average_decay=-1",
                                             "check --model_name"),
        # export.py
        "export_missing_checkpoint": (*export, f"--checkpoint_path={missing}",
                                      "--checkpoint_path"),
        # No --dataset: the class count is read from the (unreadable) checkpoint.
        "export_corrupt_checkpoint": (*export, f"--checkpoint_path={ckpt['corrupt']}",
                                      "cannot read checkpoint"),
        "export_unknown_format": (*export, f"--checkpoint_path={ckpt['foreign']}",
                                  "--format=onnx", "--format"),
        # converters
        "tiny_converter_missing_input": ("tiny_imagenet_converter/converter.py",
                                         f"--input_dir={missing}",
                                         f"--output_dir={root}/tiny_out", "--input_dir"),
        "imagenet_converter_missing_labels": (
            "adversarial_logit_pairing.cli.convert_imagenet", f"--train_dir={root}",
            f"--labels_file={missing}", f"--output_dir={root}/imagenet_out", "--labels_file"),
        # llr.evaluate (the module handles are checked last: a bad one is the only fault)
        "llr_bad_attack": (*llr[:2], "--attacks=pgd_x", *llr[3:], "pgd_x"),
        "llr_odd_spsa_samples": (*llr, "--spsa_samples=3", "--spsa_samples"),
        "llr_zero_spsa_delta": (*llr, "--spsa_delta=0", "--spsa_delta"),
        "llr_missing_data_dir": (llr[0], f"--data_dir={missing}", *llr[2:], missing),
        "llr_bad_hub_handle": (*llr, "--latents_module"),
    }
    return {name: (row[0], list(row[1:-1]), row[-1]) for name, row in rows.items()}


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> dict:
    """{case: (ProgramRun, program, culprit)} for every row of :func:`_cases`."""
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    data_dir = os.path.join(root, "tiny")
    write_tiny_imagenet_tfrecords(data_dir, num_train=4, num_val=4, image_size=32, seed=3)
    llr_dir = write_photo_folder(os.path.join(root, "llr"), per_class=1, size=32)
    cases = _cases(root, data_dir, llr_dir, _write_checkpoints(root))
    first_rows = {}
    for name, (program, _, _) in cases.items():
        first_rows.setdefault(program, name)
    true_starts = {name: cases[name][:2] for name in first_rows.values()}
    shared = {name: case[:2] for name, case in cases.items() if name not in true_starts}
    # Six processes at a time: start-ups overlap on two cores without running out of memory.
    results = run_concurrently(true_starts, os.path.join(root, "logs", "own"), check=False)
    results.update(run_concurrently(shared, os.path.join(root, "logs", "shared"), check=False,
                                    in_one_process=True))
    return {name: (results[name], cases[name][0], cases[name][2]) for name in sorted(cases)}


@pytest.mark.slow
def test_every_bad_input_ends_in_one_error_line_with_status_2(walk):
    failures = []
    for name, (run, program, culprit) in walk.items():
        prefix = f"{PROGRAM_NAMES[program]}: error: "
        error_lines = [line for line in run.stderr.splitlines() if ": error: " in line]
        if (run.returncode != EXIT_USER_ERROR or "Traceback" in run.stderr
                or error_lines != [run.last_line] or not run.last_line.startswith(prefix)
                or culprit not in run.last_line):
            failures.append(f"{name}: status {run.returncode}, expected one last line "
                            f"'{prefix}...{culprit}...'; stderr ends:\n{run.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


def test_result_files_that_cannot_be_written_are_named_by_their_flag(tmp_path):
    # Written at the end of an evaluation, so outside the walk: a one-line error, not a
    # traceback, after minutes of work.
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    result = evaluation.EvalResult("ckpt", 1, 0.5, 0.75, 8)
    with pytest.raises(DataError, match=r"^--output_file=.*a_file/r\.csv: cannot append"):
        evaluation.append_result_line(str(a_file / "r.csv"), "clean", result)
    with pytest.raises(DataError, match=r"^--predictions_file=.*a_file/p\.npz: cannot write"):
        evaluation.write_predictions(str(a_file / "p.npz"), np.zeros(2), np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"^--output_file=.*a_file/r\.jsonl: cannot write"):
        llr_evaluation.write_results(str(a_file / "r.jsonl"), [{"attack": "clean"}])
