"""eval.py --train_dir beside training: every checkpoint evaluated once, deletions survived."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation
from tests.program_runs import (
    ALP,
    MODEL_FLAGS,
    finish,
    kill_all,
    logged_steps,
    program,
    read_log,
    start,
    summary_values,
    wait_for,
)


def _evaluated_steps(directory) -> list[int]:
    """Global steps of the ``Eval/Accuracy`` summaries under ``directory``, in writing order."""
    return [step for step, tag, _, _ in summary_values(directory) if tag == "Eval/Accuracy"]


@pytest.mark.slow
def test_continuous_eval_beside_training_evaluates_each_checkpoint_exactly_once(
        tmp_path, tiny_data):
    out = tmp_path / "train"
    results = tmp_path / "results.csv"
    # 8 checkpoints (steps 0..7); training keeps the newest 5, deleting 0, 1 and 2 as it goes.
    train = program("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}",
                    *MODEL_FLAGS, ALP, "--max_steps=7", "--save_model_steps=1",
                    "--save_summaries_steps=0")
    evaluate = program("eval.py", f"--train_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}",
                       *MODEL_FLAGS, "--hparams=eval_batch_size=8", "--num_examples=8",
                       "--eval_name=beside", f"--output_file={results}",
                       "--eval_interval_secs=1", "--timeout_secs=600")
    train_log, eval_log = tmp_path / "train.log", tmp_path / "eval.log"
    trainer = start(train, train_log)
    evaluator = start(evaluate, eval_log)
    try:
        log = finish(trainer, train_log, 300)
        assert trainer.returncode == 0, log[-3000:]
        assert logged_steps(log) == list(range(1, 8))
        wait_for(lambda: 7 in _evaluated_steps(out / "beside"), 300,
                 "the evaluation of the last checkpoint", [(evaluator, eval_log)])
    finally:
        kill_all([trainer, evaluator])

    steps = _evaluated_steps(out / "beside")
    assert len(steps) == len(set(steps)), f"a checkpoint was evaluated twice: {steps}"
    assert steps == sorted(steps)
    kept = [checkpoints.checkpoint_step(p)
            for p in tf.train.get_checkpoint_state(str(out)).all_model_checkpoint_paths]
    assert kept == [3, 4, 5, 6, 7]
    # The kept ones exactly once; the deleted ones at most once (maybe before their deletion).
    assert set(kept) <= set(steps) <= set(range(8))
    lines = results.read_text().splitlines()
    assert len(lines) == len(steps) and all(line.startswith("beside,") for line in lines)
    assert "Traceback" not in read_log(eval_log)


def _write_checkpoint(directory, step: int, value: float) -> str:
    variables = {"global_step": tf.Variable(step, dtype=tf.int64),
                 "w": tf.Variable(np.full([2], value, np.float32))}
    return checkpoints.save(variables, str(directory), step, max_to_keep=10)


def test_pending_checkpoints_are_complete_newer_and_oldest_first(tmp_path):
    for step in (10, 2, 30, 20):
        _write_checkpoint(tmp_path, step, float(step))
    # Deleted after being listed (training's max_to_keep): never offered.
    for path in tf.io.gfile.glob(str(tmp_path / "model.ckpt-20.*")):
        os.remove(path)
    pending = evaluation.pending_checkpoints(str(tmp_path), after_step=None)
    assert [step for step, _ in pending] == [2, 10, 30]
    assert all(prefix == str(tmp_path / f"model.ckpt-{step}") for step, prefix in pending)
    assert [step for step, _ in evaluation.pending_checkpoints(str(tmp_path), 10)] == [30]
    assert evaluation.pending_checkpoints(str(tmp_path / "missing"), None) == []
