"""Command-line programs: absl flags of the original scripts mapped onto the library.

``run_program`` is the one place that turns a :class:`~adversarial_logit_pairing.errors.UserError`
or a flag absl refuses into a one-line message ``<prog>: error: ...`` and exit status 2,
instead of a traceback (or absl's two-line ``FATAL Flags parsing error`` and status 1).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Callable, NoReturn

from absl import app, flags

from adversarial_logit_pairing.errors import UserError

EXIT_USER_ERROR = 2


def _fail(prog: str, message: object) -> NoReturn:
    """Prints ``<prog>: error: message`` on one line and exits with status 2."""
    line = " ".join(str(message).split("\n")).strip()
    print(f"{prog}: error: {line}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_program(main: Callable[[Sequence[str]], None], prog: str) -> None:
    """Runs ``main`` under ``absl.app.run``; user errors end the process with one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def parse_flags(argv: list[str]) -> list[str]:
        # absl's own parser prints two lines and exits with status 1; --help and --helpfull
        # still print and exit inside flags.FLAGS(argv).
        try:
            return flags.FLAGS(argv)
        except flags.Error as exc:
            _fail(prog, f"{exc} (--helpfull lists the flags)")

    def guarded(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            _fail(prog, f"unexpected arguments {' '.join(argv[1:])!r} "
                  "(flags are written --name=value)")
        try:
            main(argv)
        except UserError as exc:
            _fail(prog, exc)

    app.run(guarded, flags_parser=parse_flags)


def config_from_flags(config_class: type, flag_values: flags.FlagValues = flags.FLAGS):
    """A config dataclass filled from the flags of the same names.

    The configs mirror the programs' flags field for field, so copying them by name keeps the
    two from drifting apart; fields without a flag (library-only settings) keep their defaults.
    """
    values = {field.name: flag_values[field.name].value
              for field in dataclasses.fields(config_class) if field.name in flag_values}
    return config_class(**values)
