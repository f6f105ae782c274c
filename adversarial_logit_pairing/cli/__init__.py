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

from absl import app, flags, logging

from adversarial_logit_pairing.datasets import dataset_facts
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
