"""Command-line programs: absl flags of the original scripts mapped onto the library.

``run_program`` is the one place that turns a :class:`~adversarial_logit_pairing.errors.UserError`
or a flag absl refuses into a one-line message ``<prog>: error: ...`` and exit status 2,
instead of a traceback (or absl's two-line ``FATAL Flags parsing error`` and status 1).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any, Callable, NoReturn, TypeVar

from absl import app, flags, logging

from adversarial_logit_pairing.datasets import dataset_facts
from adversarial_logit_pairing.errors import UserError

EXIT_USER_ERROR = 2
T = TypeVar("T")


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


def run_converter(convert: Callable[..., dict[str, int]], prog: str) -> None:
    """Runs a converter program: ``convert`` called with its flags; logs the records written."""

    def main(argv: Sequence[str]) -> None:
        del argv
        counts = config_from_flags(convert)
        logging.info("Wrote %s", ", ".join(f"{count} {split}" for split, count in counts.items()))

    run_program(main, prog)


def strategy_from_flags(check: Callable[[Any], None]) -> Any:
    """The ``tf.distribute`` strategy of the distribution flags (``train.py``, ``eval.py``).

    ``check(distribution_config)`` runs first, with the program's other cheap checks: a
    multi-worker start-up waits for the whole cluster before it can fail. Logs at INFO from
    then on.
    """
    from adversarial_logit_pairing import distribution

    config = config_from_flags(distribution.apply_legacy_flags,
                               config=config_from_flags(distribution.DistributionConfig))
    check(config)
    logging.set_verbosity(logging.INFO)
    return distribution.create_strategy(config)


def define_model_and_data_flags() -> None:
    """The flags ``train.py`` and ``eval.py`` share: model, data set, its directories, dtype."""
    flags.DEFINE_string("master", "",
                        "TensorFlow master (TF1). With --strategy=tpu: the TPU address (same as "
                        "--tpu); otherwise only '' is accepted.")
    flags.DEFINE_string("model_name", "resnet_v2_50", "Name of the model.")
    flags.DEFINE_string("dataset", "imagenet", 'Dataset: "tiny_imagenet" or "imagenet".')
    flags.DEFINE_integer("dataset_image_size", 64,
                         "Side of the images fed to the model (logged when it differs from "
                         "the model's native size).")
    for facts in dataset_facts.FACTS.values():
        flags.DEFINE_string(facts.data_dir_flag.removeprefix("--"), None,
                            f"Directory with {facts.data_dir_contents}.")
    flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                      "Dtype of convolutions and activations; variables, loss, optimizer state "
                      "and moving averages stay float32 (bfloat16: CPUs with bf16 units and "
                      "TPUs; float16: GPUs, with loss scaling).")


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
