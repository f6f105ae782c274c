"""train.py survives SIGKILL: a restart with the same command resumes from the last complete
checkpoint, also when the kill lands in the middle of a checkpoint write.

The process helpers at the top (start, wait, kill, read checkpoints) are shared with the
multi-worker and continuous-evaluation tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import tensorflow as tf

from tests.data_builders import write_tiny_imagenet_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FLAGS = ["--dataset=tiny_imagenet", "--model_name=resnet_v2_tiny", "--dataset_image_size=32"]
ALP = "--hparams=batch_size=4,train_adv_method=pgdll_16_2_1,train_lp_weight=0.5"

pytestmark = pytest.mark.slow


# ---- Process helpers --------------------------------------------------------------------------

def program(script: str, *flags: str) -> list[str]:
    """The command line running ``script`` (train.py or eval.py) of the repository."""
    return [sys.executable, os.path.join(REPO, script), *flags]


def start(command: Sequence[str], log_path, env: dict | None = None) -> subprocess.Popen:
    """Starts ``command`` with stdout and stderr going to ``log_path``."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    with open(log_path, "w") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=REPO)


def read_log(log_path) -> str:
    with open(log_path, errors="replace") as f:
        return f.read()


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             watched: Sequence[tuple[subprocess.Popen, object]] = ()) -> None:
    """Polls ``condition`` until true; fails after ``timeout`` s or if a watched process ends.

    Args:
      watched: (process, log path) pairs that must keep running meanwhile; the failure
        message carries the end of their logs.
    """
    deadline = time.time() + timeout
    while True:
        if condition():
            return
        ended = [(p, log) for p, log in watched if p.poll() is not None]
        if ended or time.time() > deadline:
            tails = "\n".join(f"--- {log} (exit {p.poll()}):\n{read_log(log)[-3000:]}"
                              for p, log in watched)
            reason = "a process ended" if ended else f"timed out after {timeout:.0f}s"
            raise AssertionError(f"waiting for {what}: {reason}\n{tails}")
        time.sleep(0.05)


def finish(process: subprocess.Popen, log_path, timeout: float) -> str:
    """Waits for ``process`` to exit (killing it after ``timeout`` s); returns its log."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"{log_path}: still running after {timeout:.0f}s; killed:\n"
                             f"{read_log(log_path)[-3000:]}") from None
    return read_log(log_path)


def kill_all(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILLs the processes still running and reaps them all."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    for process in processes:
        process.wait()


def latest_step(output_dir) -> int | None:
    """The step of the checkpoint the ``checkpoint`` pointer names, or None."""
    state_file = os.path.join(output_dir, "checkpoint")
    if not os.path.exists(state_file):
        return None
    state = tf.train.get_checkpoint_state(str(output_dir))
    if state is None:
        return None
    return int(state.model_checkpoint_path.rsplit("-", 1)[-1])


def checkpoint_values(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def logged_steps(log: str) -> list[int]:
    """The global steps train.py logged, in order."""
    return [int(s) for s in re.findall(r"global_step (\d+): total_loss", log)]


# ---- Tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_imagenet_tfrecords(str(path), num_train=32, num_val=16, image_size=32, seed=5)
    return str(path)


def _check_final_checkpoint(output_dir, max_steps: int, names: set) -> None:
    prefix = tf.train.latest_checkpoint(str(output_dir))
    assert prefix.endswith(f"model.ckpt-{max_steps}")
    values = checkpoint_values(prefix)
    assert int(values["global_step"]) == max_steps
    assert set(values) == names
    assert all(np.all(np.isfinite(v)) for v in values.values() if v.dtype.kind == "f")
    # No half-written leftovers of the interrupted run.
    assert not [p for p in os.listdir(output_dir) if p.startswith(".tmp-")]


def test_sigkill_mid_run_then_the_same_command_resumes_and_finishes(tmp_path, data_dir):
    out = tmp_path / "train"
    command = program("train.py", f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}",
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

    second = start(command, second_log)
    try:
        log = finish(second, second_log, 300)
    finally:
        kill_all([second])
    assert second.returncode == 0, log[-3000:]
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
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, data_dir,
                                                                         pause_at):
    out = tmp_path / "train"
    flags = [f"--output_dir={out}", f"--tiny_imagenet_data_dir={data_dir}", *MODEL_FLAGS, ALP,
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

    second = start(program("train.py", *flags), second_log)
    try:
        log = finish(second, second_log, 300)
    finally:
        kill_all([second])
    assert second.returncode == 0, log[-3000:]
    assert f"Resuming from {out}/model.ckpt-2" in log
    assert logged_steps(log) == [3, 4, 5, 6]
    # The final checkpoint is complete and the killed write's staging files are gone.
    _check_final_checkpoint(out, 6, names)
    # Checkpoint 4 was written again by the resumed run, and is listed now.
    state = tf.train.get_checkpoint_state(str(out))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths][-3:] == [
        "model.ckpt-2", "model.ckpt-4", "model.ckpt-6"]
