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


PAUSES = ("after_data", "before_pointer")


@pytest.fixture(scope="module")
def killed_writes(tmp_path_factory, tiny_data) -> dict:
    """pause_at -> what a run killed while paused in the write of checkpoint 4 left behind,
    and what the same command, run again, logged.

    The two places are independent, so their runs go at the same time: both paused runs, then
    both restarts. What is on disk is recorded while each run is still paused.
    """
    cases, paused = {}, []
    try:
        for pause_at in PAUSES:
            root = tmp_path_factory.mktemp(pause_at)
            out = root / "train"
            flags = [f"--output_dir={out}", f"--tiny_imagenet_data_dir={tiny_data}",
                     *MODEL_FLAGS, ALP, "--max_steps=6", "--save_model_steps=2",
                     "--save_summaries_steps=0"]
            marker, log = root / "paused", root / "paused.log"
            process = start([sys.executable, "-c", _PAUSED_TRAIN, *flags], log,
                            env={"PAUSE_AT_STEP": "4", "PAUSE_MARKER": str(marker),
                                 "PAUSE_AT": pause_at})
            paused.append(process)
            cases[pause_at] = dict(root=root, out=out, flags=flags, marker=marker,
                                   watched=[(process, log)])
        for pause_at, case in cases.items():
            out = case["out"]
            wait_for(case["marker"].exists, 300, f"the write of checkpoint 4 ({pause_at})",
                     case["watched"])
            case["staged"] = [p for p in os.listdir(out) if p.startswith(".tmp-model.ckpt-4-")]
            case["index_written"] = (out / "model.ckpt-4.index").exists()
            case["latest_while_paused"] = latest_step(out)
            process = case["watched"][0][0]
            process.send_signal(signal.SIGKILL)
            process.wait()
    finally:
        kill_all(paused)
    for case in cases.values():
        case["latest_after_kill"] = tf.train.latest_checkpoint(str(case["out"]))
        case["names"] = set(checkpoint_values(str(case["out"] / "model.ckpt-2")))
    logs = finish_all([(start(program("train.py", *case["flags"]), case["root"] / "second.log"),
                        case["root"] / "second.log") for case in cases.values()], 600)
    for case, log in zip(cases.values(), logs):
        case["second_log"] = log
    return cases


@pytest.mark.parametrize("pause_at", PAUSES)
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(killed_writes,
                                                                         pause_at):
    case = killed_writes[pause_at]
    out = case["out"]
    if pause_at == "after_data":
        # The data is written, but only in the staging directory.
        assert case["staged"] and not case["index_written"]
    else:
        # Checkpoint 4's files are complete, but the pointer still names checkpoint 2.
        assert not case["staged"] and case["index_written"]
    assert case["latest_while_paused"] == 2
    assert case["latest_after_kill"].endswith("model.ckpt-2")

    log = case["second_log"]
    assert f"Resuming from {out}/model.ckpt-2" in log
    assert logged_steps(log) == [3, 4, 5, 6]
    # The final checkpoint is complete and the killed write's staging files are gone.
    _check_final_checkpoint(out, 6, case["names"])
    # Checkpoint 4 was written again by the resumed run, and is listed now.
    state = tf.train.get_checkpoint_state(str(out))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths][-3:] == [
        "model.ckpt-2", "model.ckpt-4", "model.ckpt-6"]
