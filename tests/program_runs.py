"""Runs the repository's command-line programs (train.py, eval.py, export.py) from tests.

A program is a script path relative to the repository (``train.py``) or, without the ``.py``,
a module run with ``python -m`` from the repository root (``llr.evaluate``).

``run_concurrently`` starts several programs at once and waits for all: most of a short run
is Python and TensorFlow start-up, which overlaps well on two cores.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECS = 900


@dataclasses.dataclass
class ProgramRun:
    returncode: int
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


def _environment() -> dict:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def _command(script: str) -> list[str]:
    if script.endswith(".py"):
        return [sys.executable, os.path.join(REPO, script)]
    return [sys.executable, "-m", script]


def _failure(script: str, run: ProgramRun) -> AssertionError:
    return AssertionError(f"{script} failed ({run.returncode}):\n{run.stderr[-4000:]}")


def run_program(script: str, *flags: str, check: bool = True) -> ProgramRun:
    """Runs ``python <repo>/<script> <flags>``; raises AssertionError on failure if ``check``."""
    proc = subprocess.run([*_command(script), *flags], cwd=REPO, capture_output=True,
                          text=True, env=_environment(), timeout=TIMEOUT_SECS)
    run = ProgramRun(proc.returncode, proc.stderr)
    if check and run.returncode != 0:
        raise _failure(script, run)
    return run


def run_concurrently(runs: Mapping[object, tuple[str, Sequence[str]]], log_dir: str,
                     check: bool = True) -> dict:
    """Runs ``{key: (script, flags)}`` at the same time; returns ``{key: ProgramRun}``.

    stderr goes to files under ``log_dir`` rather than pipes, so a chatty program can never
    block on a full pipe while another one is awaited.
    """
    os.makedirs(log_dir, exist_ok=True)
    started = {}
    for index, (key, (script, flags)) in enumerate(runs.items()):
        log_path = os.path.join(log_dir, f"{index}-{os.path.basename(script)}.stderr")
        log = open(log_path, "w")  # closed once the process ended
        proc = subprocess.Popen([*_command(script), *flags], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=log, text=True,
                                env=_environment())
        started[key] = (script, proc, log, log_path)
    results = {}
    try:
        for key, (_, proc, _, log_path) in started.items():
            proc.wait(timeout=TIMEOUT_SECS)
            with open(log_path) as f:
                results[key] = ProgramRun(proc.returncode, f.read())
    finally:
        for _, proc, log, _ in started.values():
            if proc.poll() is None:  # only after a timeout or an interrupt
                proc.kill()
                proc.wait()
            log.close()
    if check:
        for key, run in results.items():
            if run.returncode != 0:
                raise _failure(runs[key][0], run)
    return results
