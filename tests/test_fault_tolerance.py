"""train.py survives SIGKILL: a restart with the same command resumes from the last complete
checkpoint, also when the kill lands in the middle of a checkpoint write.

The process helpers (start, wait, kill, read checkpoints) are in ``tests/program_runs.py``,
shared with the multi-worker and continuous-evaluation tests.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.program_runs import (
    ALP,
    MODEL_FLAGS,
    checkpoint_values,
    finish_all,
    kill_all,
    latest_step,
    logged_steps,
    program,
    start,
    wait_for,
)

pytestmark = pytest.mark.slow


# ---- Tests ------------------------------------------------------------------------------------

def _check_final_checkpoint(output_dir, max_steps: int, names: set) -> None:
    prefix = tf.train.latest_checkpoint(str(output_dir))
    assert prefix.endswith(f"model.ckpt-{max_steps}")
    values = checkpoint_values(prefix)
    assert int(values["global_step"]) == max_steps
    assert set(values) == names
    assert all(np.all(np.isfinite(v)) for v in values.values() if v.dtype.kind == "f")
    # No half-written leftovers of the interrupted run.
    assert not [p for p in os.listdir(output_dir) if p.startswith(".tmp-")]


def test_sigkill_mid_run_then_the_same_command_resumes_and_finishes(tmp_path, tiny_data):
    out = tmp_path / "train"
    command = program("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}",
                      *MODEL_FLAGS, ALP, "--max_steps=60", "--save_model_steps=5",
                      "--save_summaries_steps=10")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(command, first_log)
    try:
        wait_for(lambda: (latest_step(out) or 0) >= 5, 300, "a checkpoint after step 0",
                 [(first, first_log)])
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        kill_all([first])
    resumed = latest_step(out)
    assert 5 <= resumed < 60 and resumed % 5 == 0, "the run ended before the kill"
    names = set(checkpoint_values(str(out / f"model.ckpt-{resumed}")))

    log, = finish_all([(start(command, second_log), second_log)], 300)
    assert f"Resuming from {out}/model.ckpt-{resumed}" in log
    steps = logged_steps(log)
    assert steps == list(range(resumed + 1, 61))
    _check_final_checkpoint(out, 60, names)


# Runs train.py with a pause inside the write of one checkpoint, at one of two places:
# * after_data: right after SaveV2 wrote the checkpoint's data into its staging directory,
#   before the files get their final names (a kill leaves a staging directory behind);
# * before_pointer: the files are complete under their final names, but the ``checkpoint``
#   pointer still names the previous checkpoint.
_PAUSED_TRAIN = """
import os, sys, time
import tensorflow as tf
step, marker = os.environ["PAUSE_AT_STEP"], os.environ["PAUSE_MARKER"]
def pause():
    open(marker, "w").close()
    time.sleep(600)
if os.environ["PAUSE_AT"] == "after_data":
    save = tf.raw_ops.SaveV2
    def paused_save(prefix, *args, **kwargs):
        result = save(prefix=prefix, *args, **kwargs)
        if "model.ckpt-" + step + "-" in prefix:
            pause()
        return result
    tf.raw_ops.SaveV2 = paused_save
else:
    update = tf.compat.v1.train.update_checkpoint_state
    def paused_update(save_dir, model_checkpoint_path, *args, **kwargs):
        if model_checkpoint_path.endswith("-" + step):
            pause()
        return update(save_dir, model_checkpoint_path, *args, **kwargs)
    tf.compat.v1.train.update_checkpoint_state = paused_update
sys.argv = ["train.py"] + sys.argv[1:]
from adversarial_logit_pairing.cli.train import run
run()
"""


@pytest.mark.parametrize("pause_at", ["after_data", "before_pointer"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tiny_data,
                                                                         pause_at):
    out = tmp_path / "train"
    flags = [f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}", *MODEL_FLAGS, ALP,
             "--max_steps=6", "--save_model_steps=2", "--save_summaries_steps=0"]
    marker = tmp_path / "paused"
    paused_log, second_log = tmp_path / "paused.log", tmp_path / "second.log"
    paused = start([sys.executable, "-c", _PAUSED_TRAIN, *flags], paused_log,
                   env={"PAUSE_AT_STEP": "4", "PAUSE_MARKER": str(marker), "PAUSE_AT": pause_at})
    try:
        wait_for(marker.exists, 300, "the write of checkpoint 4", [(paused, paused_log)])
        staged = [p for p in os.listdir(out) if p.startswith(".tmp-model.ckpt-4-")]
        if pause_at == "after_data":
            # The data is written, but only in the staging directory.
            assert staged and not (out / "model.ckpt-4.index").exists()
        else:
            # Checkpoint 4's files are complete, but the pointer still names checkpoint 2.
            assert not staged and (out / "model.ckpt-4.index").exists()
        assert latest_step(out) == 2
        paused.send_signal(signal.SIGKILL)
        paused.wait()
    finally:
        kill_all([paused])
    assert tf.train.latest_checkpoint(str(out)).endswith("model.ckpt-2")
    names = set(checkpoint_values(str(out / "model.ckpt-2")))

    log, = finish_all([(start(program("train.py", *flags), second_log), second_log)], 300)
    assert f"Resuming from {out}/model.ckpt-2" in log
    assert logged_steps(log) == [3, 4, 5, 6]
    # The final checkpoint is complete and the killed write's staging files are gone.
    _check_final_checkpoint(out, 6, names)
    # Checkpoint 4 was written again by the resumed run, and is listed now.
    state = tf.train.get_checkpoint_state(str(out))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths][-3:] == [
        "model.ckpt-2", "model.ckpt-4", "model.ckpt-6"]
