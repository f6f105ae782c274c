"""Command-line programs: absl flags of the original scripts mapped onto the library.

``run_program`` is the one place that turns a :class:`~adversarial_logit_pairing.errors.UserError`
into a one-line message and a non-zero exit status, instead of a traceback.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

from absl import app, flags

from adversarial_logit_pairing.errors import UserError

EXIT_USER_ERROR = 2
T = TypeVar("T")


def run_program(main: Callable[[Sequence[str]], None], prog: str) -> None:
    """Runs ``main`` under ``absl.app.run``; user errors end the process with one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def guarded(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            print(f"{prog}: error: unexpected arguments {' '.join(argv[1:])!r} "
                  "(flags are written --name=value)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        try:
            main(argv)
        except UserError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded)


def config_from_flags(target: Callable[..., T], flag_values: flags.FlagValues = flags.FLAGS,
                      **values: Any) -> T:
    """``target`` called with ``values`` and, for its other parameters, the flags of their names.

    ``target`` is a config dataclass or a function whose keyword parameters are its
    configuration (the converters). The configs mirror the programs' flags field for field,
    so copying them by name keeps the two from drifting apart; ``values`` gives what a flag
    holds in another form (a renamed flag, numbers parsed from a list), and parameters without
    a flag (library-only settings) keep their defaults.
    """
    for name in inspect.signature(target).parameters:
        if name not in values and name in flag_values:
            values[name] = flag_values[name].value
    return target(**values)
