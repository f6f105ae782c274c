"""The test helper that runs several command lines of a program in one process.

``run_concurrently(in_one_process=True)`` stands in for separate ``python <program>`` starts
in the slow program tests (the bad-input walk, the checkpoint interchange); here its results
are compared with true starts of a small absl program, which needs no TensorFlow.
"""

from __future__ import annotations

import pytest

from tests.program_runs import run_concurrently

PROGRAM = '''
import sys

from absl import app, flags, logging

flags.DEFINE_string("name", "default", "Printed to stdout and stderr.")
flags.DEFINE_integer("status", 0, "Exit status.")
flags.DEFINE_bool("crash", False, "Raise an exception instead.")


def main(argv):
    print("stdout of", flags.FLAGS.name)
    print("stderr of", flags.FLAGS.name, file=sys.stderr)
    logging.info("info of %s", flags.FLAGS.name)
    if flags.FLAGS.crash:
        raise ValueError("crashed " + flags.FLAGS.name)
    sys.exit(flags.FLAGS.status)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
'''

COMMAND_LINES = {
    "status_3": ["--name=first", "--status=3"],
    "defaults": [],  # must not inherit the flags of the run before
    "crash": ["--name=third", "--crash"],
    "bad_flag": ["--status=abc"],
    "after_all": ["--name=last"],
}


@pytest.fixture(scope="module")
def both_ways(tmp_path_factory):
    """(separate processes, one process): {case: ProgramRun} for every command line."""
    root = tmp_path_factory.mktemp("program_runs")
    script = root / "absl_program.py"
    script.write_text(PROGRAM)
    runs = {name: (str(script), flags) for name, flags in COMMAND_LINES.items()}
    return (run_concurrently(runs, str(root / "separate"), check=False),
            run_concurrently(runs, str(root / "shared"), check=False, in_one_process=True))


def _lines(text: str, *starts: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(starts)]


@pytest.mark.parametrize("case", sorted(COMMAND_LINES))
def test_a_run_in_a_shared_process_ends_as_its_own_process_would(both_ways, case):
    separate, shared = both_ways[0][case], both_ways[1][case]
    assert shared.returncode == separate.returncode
    assert shared.stdout == separate.stdout
    # stderr: the program's own lines, the INFO log line (absl's app.run sets INFO on every
    # run), the exception and the flag error; not the log prefixes (time, process id).
    assert _lines(shared.stderr, "stderr of", "ValueError", "FATAL") == _lines(
        separate.stderr, "stderr of", "ValueError", "FATAL")
    assert ("info of" in shared.stderr) == ("info of" in separate.stderr)
    assert ("Traceback" in shared.stderr) == ("Traceback" in separate.stderr)


def test_the_true_starts_give_the_expected_results(both_ways):
    separate = both_ways[0]
    assert [separate[name].returncode for name in COMMAND_LINES] == [3, 0, 1, 1, 0]
    assert separate["defaults"].stdout == "stdout of default\n"
    assert "ValueError: crashed third" in separate["crash"].stderr
