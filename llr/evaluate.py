"""``python -m llr.evaluate`` (``llr-evaluate``): the LLR hub model on bird-or-bicycle.

Loads the two TF1 Hub modules, runs the selected attacks over one split and prints, per
attack, the challenge's accuracy at 80% and 100% coverage as a table followed by one JSON line
per attack; ``--output_file`` receives the same lines (CSV when it ends in .csv).

Example (the challenge's test split, all attacks):

    python -m llr.evaluate --data_dir=$HOME/bird-or-bicycle/0.0.4 --split=test \\
        --attacks=clean,spatial_grid,pgd,spsa,common_corruptions --output_file=llr.jsonl
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags, logging

from adversarial_logit_pairing.cli import config_from_flags, run_program
from adversarial_logit_pairing.errors import ConfigError
from llr import corruptions, data, evaluation, hub_model, spatial, spsa

FLAGS = flags.FLAGS

flags.DEFINE_string("latents_module", hub_model.DEFAULT_LATENTS_HANDLE,
                    "The latents TF1 Hub module: URL (cached in $TFHUB_CACHE_DIR), local "
                    "directory or .tar.gz.")
flags.DEFINE_string("linear_module", hub_model.DEFAULT_LINEAR_HANDLE,
                    "The linear TF1 Hub module: URL, local directory or .tar.gz.")
flags.DEFINE_string("data_dir", None,
                    "Directory with <split>/{bicycle,bird}/*.jpg (the challenge layout) or "
                    "<split>.tfrecord (from llr.convert_to_tfrecord).")
flags.DEFINE_string("split", "test", "Split to evaluate: train, test or extras.")
flags.DEFINE_integer("batch_size", 16, "Images per batch.")
flags.DEFINE_string("attacks", evaluation.DEFAULT_ATTACKS,
                    "Comma-separated attacks: clean, spatial_grid, pgd, pgd_EPS_STEP_NITER, "
                    "spsa, common_corruptions, strong attacks on the true labels "
                    "(apgdce_EPS[_NITER], apgdmargin_EPS[_NITER], square_EPS[_NQUERIES]; DLR "
                    "is undefined for two classes), or one corruption by name ("
                    + ", ".join(corruptions.CORRUPTIONS) + ").")
flags.DEFINE_string("output_file", None,
                    "Write one JSON line per attack here (CSV if the name ends in .csv).")
flags.DEFINE_integer("num_examples", -1, "Evaluate only this many examples (-1: all).")
flags.DEFINE_integer("image_size", 224,
                     "Side of the images given to the model and the attacks (the challenge "
                     "resized to 224; the model itself crops and resizes to 224 anyway).")
flags.DEFINE_integer("seed", 0, "Seed of the random attacks and of the example order.")
flags.DEFINE_list("spatial_limits", [str(v) for v in spatial.SPATIAL_LIMITS],
                  "spatial_grid: largest dx, dy (pixels) and rotation (degrees).")
flags.DEFINE_list("spatial_grid", [str(v) for v in spatial.GRID_GRANULARITY],
                  "spatial_grid: number of dx, dy and angle values (the challenge: 5,5,31).")
flags.DEFINE_float("spatial_black_border", spatial.BLACK_BORDER_FRACTION,
                   "spatial_grid: fraction of each side shrunk into a black border first.")
flags.DEFINE_float("pgd_eps", 16.0, "pgd: L-infinity radius on the 0..255 scale.")
flags.DEFINE_float("pgd_step_size", 2.0, "pgd: step size on the 0..255 scale.")
flags.DEFINE_integer("pgd_iters", 20, "pgd: number of steps.")
flags.DEFINE_float("spsa_eps", 16.0, "spsa: L-infinity radius on the 0..255 scale.")
flags.DEFINE_integer("spsa_steps", spsa.NUM_STEPS, "spsa: optimisation steps.")
flags.DEFINE_integer("spsa_samples", spsa.NUM_SAMPLES,
                     "spsa: model evaluations per image and step (even).")
flags.DEFINE_float("spsa_learning_rate", spsa.LEARNING_RATE, "spsa: Adam learning rate.")
flags.DEFINE_float("spsa_delta", spsa.DELTA, "spsa: probe size of the gradient estimate.")
flags.DEFINE_bool("spsa_random_spatial", True,
                  "spsa: start from one random rotation and translation, as the challenge.")
flags.DEFINE_integer("spsa_batch_size", 1,
                     "spsa: images attacked together; the model then sees "
                     "spsa_batch_size * spsa_samples images per step.")
flags.DEFINE_list("corruptions", list(corruptions.CORRUPTIONS),
                  "common_corruptions: the corruptions whose worst case is kept per image.")
flags.DEFINE_integer("corruption_severity", 1, "Severity 1..5 of the corruptions.")
flags.DEFINE_float("decay_rate", hub_model.DECAY_RATE,
                   "Fed to the modules' decay_rate input (BN moving averages; no effect on "
                   "inference).")


def _numbers(flag: str, values: list, kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{flag}={','.join(values)}: expected comma-separated "
                          f"{'integers' if kind is int else 'numbers'}") from None


def main(argv: Sequence[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    if not FLAGS.data_dir:
        raise ConfigError("--data_dir is required (the folder holding <split>/{bicycle,bird}/)")
    settings = config_from_flags(
        evaluation.EvalSettings,
        spatial_limits=_numbers("spatial_limits", FLAGS.spatial_limits),
        spatial_grid=_numbers("spatial_grid", FLAGS.spatial_grid, int),
        corruptions=tuple(FLAGS.corruptions),
    )
    attacks = evaluation.parse_attacks(FLAGS.attacks)
    evaluation.check_settings(settings)
    # Fail on a bad folder before spending minutes loading a ResNet-152.
    data.count_examples(settings.data_dir, settings.split, settings.num_examples)
    try:
        model = hub_model.load(FLAGS.latents_module, FLAGS.linear_module,
                               decay_rate=FLAGS.decay_rate)
    except hub_model.HubModuleError as exc:
        raise type(exc)(exc.role, exc.handle, f"{exc.detail} (--{exc.role}_module)") from None
    results = evaluation.evaluate(model, settings, attacks)
    records = evaluation.result_records(results, {
        "split": settings.split,
        "latents_module": FLAGS.latents_module,
        "linear_module": FLAGS.linear_module,
    })
    print(evaluation.format_table(results))
    sys.stdout.write(evaluation.json_lines(records))
    sys.stdout.flush()
    if FLAGS.output_file:
        evaluation.write_results(FLAGS.output_file, records)
        logging.info("Wrote %s", FLAGS.output_file)


def run() -> None:
    """Console-script entry point (``llr-evaluate``)."""
    run_program(main, "llr-evaluate")


if __name__ == "__main__":
    run()
