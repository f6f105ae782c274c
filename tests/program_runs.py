"""Runs the repository's command-line programs (train.py, eval.py, export.py) from tests.

A program is a script path relative to the repository (``train.py``) or, without the ``.py``,
a module run with ``python -m`` from the repository root (``llr.evaluate``).

``run_concurrently`` starts several programs at once and waits for all: most of a short run
is Python and TensorFlow start-up, which overlaps well on two cores. With ``in_one_process``
the runs of one program share one Python process (``python -m tests.program_runs``): each is
the program's ``run()`` called on its command line, as the program's ``__main__`` block does,
with its own stderr and exit status; that spares a TensorFlow start-up (about 4.5 CPU
seconds) per run after the first. Keep at least one true ``python <program>`` start per
program in the suite for what only a fresh process shows.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Collection, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECS = 900
# A tiny training run of train.py: model, data set, image size, and ALP hparams.
MODEL_FLAGS = ["--dataset=tiny_imagenet", "--model_name=resnet_v2_tiny", "--dataset_image_size=32"]
ALP = "--hparams=batch_size=4,train_adv_method=pgdll_16_2_1,train_lp_weight=0.5"


@dataclasses.dataclass
class ProgramRun:
    returncode: int
    stderr: str
    stdout: str = ""

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def _environment(extra: Mapping[str, str] | None = None) -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(extra or {}))


def _command(script: str) -> list[str]:
    if script.endswith(".py"):
        return [sys.executable, os.path.join(REPO, script)]
    return [sys.executable, "-m", script]


def _failure(script: str, run: ProgramRun) -> AssertionError:
    return AssertionError(f"{script} failed ({run.returncode}):\n{run.stderr[-4000:]}")


def run_program(script: str, *flags: str, check: bool = True,
                env: Mapping[str, str] | None = None) -> ProgramRun:
    """Runs ``python <repo>/<script> <flags>``; raises AssertionError on failure if ``check``.

    ``env``: variables set for this run on top of the test's environment.
    """
    proc = subprocess.run([*_command(script), *flags], cwd=REPO, capture_output=True,
                          text=True, env=_environment(env), timeout=TIMEOUT_SECS)
    run = ProgramRun(proc.returncode, proc.stderr, proc.stdout)
    if check and run.returncode != 0:
        raise _failure(script, run)
    return run


def run_concurrently(runs: Mapping[object, tuple[str, Sequence[str]]], log_dir: str,
                     check: bool = True, in_one_process: bool | Collection[str] = False,
                     env: Mapping[str, str] | None = None, max_at_once: int = 0) -> dict:
    """Runs ``{key: (script, flags)}`` at the same time; returns ``{key: ProgramRun}``.

    stdout and stderr go to files under ``log_dir`` rather than pipes, so a chatty program
    can never block on a full pipe while another one is awaited. With ``in_one_process`` (True,
    or the programs it names) the runs of each program are made one after the other in one
    process of their own (see the module docstring); different programs and the runs of the
    other programs still run at the same time. ``env``: variables set
    for every run on top of the test's environment. ``max_at_once``: processes running at
    the same time at the most (0: all), to bound the memory in use.
    """
    os.makedirs(log_dir, exist_ok=True)
    groups: dict = {}  # one per process: script -> [(key, path stem of the run, flags)]
    for index, (key, (script, flags)) in enumerate(runs.items()):
        stem = os.path.join(log_dir, f"{index}-{os.path.basename(script)}")
        shared = in_one_process is True or (in_one_process and script in in_one_process)
        group = groups.setdefault((script, True) if shared else index, (script, []))
        group[1].append((key, stem, list(flags)))
    waiting = list(enumerate(groups.items()))
    running, results = [], {}
    try:
        while waiting or running:
            while waiting and (not max_at_once or len(running) < max_at_once):
                running.append(_start_group(*waiting.pop(0), log_dir, env))
            while not any(proc.poll() is not None for proc, *_ in running):
                late = [proc for proc, *_, started in running
                        if time.time() - started > TIMEOUT_SECS]
                if late:
                    raise subprocess.TimeoutExpired(late[0].args, TIMEOUT_SECS)
                time.sleep(0.05)
            for item in [item for item in running if item[0].poll() is not None]:
                running.remove(item)
                proc, files, process_log, members, shared, _ = item
                for log in files:
                    log.close()
                for key, stem, _ in members:
                    results[key] = (_in_process_result(proc.returncode, process_log, stem)
                                    if shared else
                                    ProgramRun(proc.returncode, read_log(stem + ".stderr"),
                                               read_log(stem + ".stdout")))
    finally:
        for proc, files, *_ in running:  # only after a timeout or an interrupt
            proc.kill()
            proc.wait()
            for log in files:
                log.close()
    if check:
        for key, run in results.items():
            if run.returncode != 0:
                raise _failure(runs[key][0], run)
    return results


def _start_group(index: int, key_and_group: tuple, log_dir: str,
                 env: Mapping[str, str] | None) -> tuple:
    """Starts the process of one group of :func:`run_concurrently`; returns its handles."""
    key, (script, members) = key_and_group
    shared = isinstance(key, tuple)
    if shared:
        command = [sys.executable, "-m", "tests.program_runs", script,
                   json.dumps([[stem, flags] for _, stem, flags in members])]
        stem = os.path.join(log_dir, f"process-{index}")
        stdout = subprocess.DEVNULL  # each run's own goes to its files
    else:
        (_, stem, flags), = members
        command = [*_command(script), *flags]
        stdout = open(stem + ".stdout", "w")
    stderr = open(stem + ".stderr", "w")
    files = [stderr] if stdout is subprocess.DEVNULL else [stderr, stdout]
    proc = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, text=True,
                            env=_environment(env))
    return proc, files, stem + ".stderr", members, shared, time.time()


def _in_process_result(process_status: int, process_log: str, stem: str) -> ProgramRun:
    """One run of an ``in_one_process`` group; a run the process never finished fails."""
    if os.path.exists(stem + ".status"):
        return ProgramRun(int(read_log(stem + ".status")), read_log(stem + ".stderr"),
                          read_log(stem + ".stdout"))
    stderr = read_log(stem + ".stderr") if os.path.exists(stem + ".stderr") else ""
    return ProgramRun(process_status or 1,
                      f"{stderr}\n[the shared process ended ({process_status}) before this "
                      f"run did; its own stderr:]\n{read_log(process_log)}")


def run_child(code: str) -> object:
    """Runs ``python -c code`` in a fresh interpreter; returns what it printed as ``RESULTS<json>``.

    For checks that need logical CPU devices, which exist only if made before TensorFlow
    starts. The repository is importable in the child; ``code`` prints its results as one line
    ``"RESULTS" + json.dumps(results)``.
    """
    env = _environment({"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=TIMEOUT_SECS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


# ---- Programs left running: start, wait, kill, read what they wrote ------------------------------

def program(script: str, *flags: str) -> list[str]:
    """The command line running ``script`` (train.py or eval.py) of the repository."""
    return [*_command(script), *flags]


def start(command: Sequence[str], log_path, env: dict | None = None) -> subprocess.Popen:
    """Starts ``command`` with stdout and stderr going to ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                env=_environment(env), cwd=REPO)


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


def finish_all(started: Sequence[tuple[subprocess.Popen, object]], timeout: float) -> list[str]:
    """Waits for every (process, log path) to end with status 0; returns their logs.

    Whatever still runs after a failure or a timeout is killed, so that no program outlives
    its test.
    """
    try:
        logs = [finish(process, log, timeout) for process, log in started]
    finally:
        kill_all([process for process, _ in started])
    for (process, _), log in zip(started, logs):
        assert process.returncode == 0, log[-4000:]
    return logs


def kill_all(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILLs the processes still running and reaps them all."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
    for process in processes:
        process.wait()


def latest_step(output_dir) -> int | None:
    """The step of the checkpoint the ``checkpoint`` pointer names, or None."""
    import tensorflow as tf

    state_file = os.path.join(output_dir, "checkpoint")
    if not os.path.exists(state_file):
        return None
    state = tf.train.get_checkpoint_state(str(output_dir))
    if state is None:
        return None
    return int(state.model_checkpoint_path.rsplit("-", 1)[-1])


def checkpoint_values(prefix: str) -> dict:
    """{name: array} of every tensor in the checkpoint ``prefix``."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def logged_steps(log: str) -> list[int]:
    """The global steps train.py logged, in order."""
    return [int(s) for s in re.findall(r"global_step (\d+): total_loss", log)]


# ---- What programs and experiments leave behind --------------------------------------------------

def summary_values(directory) -> list[tuple[int, str, str, object]]:
    """(step, tag, value kind, payload) of every summary under ``directory``, in writing order.

    The kind is the TF1 ``Summary.Value`` field set (``simple_value``, ``image``, ...).
    """
    import tensorflow as tf

    found = []
    for path in sorted(tf.io.gfile.glob(os.path.join(str(directory), "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                found.append((event.step, value.tag, kind, getattr(value, kind)))
    return found


def scalar_events(directory, tag: str) -> dict[int, float]:
    """{step: value} of the TF1 scalar summaries ``tag`` under ``directory``."""
    return {step: payload for step, found, kind, payload in summary_values(directory)
            if found == tag and kind == "simple_value"}


def save_experiment(out_path: str, summary: dict, states: Mapping[str, Mapping]) -> None:
    """Writes what an experiment run in a subprocess found: ``out_path`` .json and .npz.

    ``states`` is ``{run: {variable name: array}}``; the .npz keys are ``run|name``.
    """
    import numpy as np

    np.savez(out_path + ".npz", **{f"{run}|{name}": value for run, state in states.items()
                                   for name, value in state.items()})
    with open(out_path + ".json", "w") as f:
        json.dump(summary, f)


class Experiment:
    """``python -m <module> mirrored <out_path> <args>``, started now, its results read later.

    For experiments that need a fresh TensorFlow (logical CPU devices exist only if made
    before TensorFlow starts); the module's ``__main__`` block runs the experiment, which ends
    with :func:`save_experiment`. (Started beside other TensorFlow work, the replicas'
    collectives wait on a busy CPU: run it alone, with :func:`run_experiment`.)
    """

    def __init__(self, module: str, out_path: str, *args: str) -> None:
        self.out_path = out_path
        self.log_path = out_path + ".log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "mirrored", out_path, *args], cwd=REPO,
                env=_environment(), stdout=log, stderr=subprocess.STDOUT)

    def results(self) -> tuple[dict, dict]:
        """Waits for the experiment; returns (summary, {run: {variable name: array}})."""
        import numpy as np

        log = finish(self.process, self.log_path, TIMEOUT_SECS)
        assert self.process.returncode == 0, log[-4000:]
        with open(self.out_path + ".json") as f:
            summary = json.load(f)
        states: dict = {}
        with np.load(self.out_path + ".npz") as arrays:
            for key in arrays.files:
                run, name = key.split("|", 1)
                states.setdefault(run, {})[name] = arrays[key]
        return summary, states

    def stop(self) -> None:
        """Kills the experiment if it still runs (a test run cut short)."""
        kill_all([self.process])


def run_experiment(module: str, out_path: str, *args: str) -> tuple[dict, dict]:
    """Runs an :class:`Experiment` to its end; returns (summary, states)."""
    experiment = Experiment(module, out_path, *args)
    try:
        return experiment.results()
    finally:
        experiment.stop()


# ---- In one process: python -m tests.program_runs SCRIPT '[[path stem, flags], ...]' -----

def _load_program(script: str):
    """The program's module, loaded as ``python <script>``/``-m`` would, minus ``__main__``."""
    if not script.endswith(".py"):
        return importlib.import_module(script)
    spec = importlib.util.spec_from_file_location("program_under_test",
                                                  os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_here(program, script: str, flags: Sequence[str], stem: str) -> int:
    """``program.run()`` on the command line ``flags``, stdout and stderr (fd 1 and 2) to
    ``stem.stdout`` and ``stem.stderr``.

    Returns the exit status the process would have had. absl re-parses its flags when
    ``app.run`` runs again; the flags are reset to their defaults first, verbosity INFO as
    ``app.run`` sets it on a first run.
    """
    from absl import flags as absl_flags

    if absl_flags.FLAGS.is_parsed():
        absl_flags.FLAGS.unparse_flags()
        absl_flags.FLAGS["verbosity"].value = 0
    sys.argv = [script, *flags]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(stem + ".stdout", "w") as out, open(stem + ".stderr", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            program.run()
            status = 0
        except SystemExit as exc:  # as the interpreter turns it into an exit status
            if exc.code is None or isinstance(exc.code, int):
                status = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                status = 1
        except Exception:
            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
    return status


def _main(script: str, cases_json: str) -> None:
    program = _load_program(script)
    for stem, flags in json.loads(cases_json):
        status = _run_here(program, script, flags, stem)
        with open(stem + ".status", "w") as f:
            f.write(str(status))


if __name__ == "__main__":
    _main(*sys.argv[1:])
