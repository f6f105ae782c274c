"""eval.py with a strong --adv_method: worst-case output line, JSON report, robust mask, and
the same report on every run of the same checkpoint.

The checkpoint is a real (randomly initialised) resnet_v2_tiny saved under its TF-Slim names;
the validation records are relabelled with that model's own clean predictions (two of them
wrong on purpose), so that most points start correct and the attacks have work to do.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from adversarial_logit_pairing import checkpoints, evaluation, model_lib
from adversarial_logit_pairing.errors import ConfigError
from tests.data_builders import (
    class_pattern_image,
    encode_jpeg,
    tiny_imagenet_example,
    write_records,
)

MODEL = "resnet_v2_tiny"
NUM_EXAMPLES = 8
SIZE = 32
# A cheap AutoAttack: 3 iterations for APGD, APGD-T and FAB-T, 20 Square queries.
CHEAP_AUTOATTACK = "autoattack_8_3_20"


def _write_validation(directory, labels, seed=3):
    rng = np.random.default_rng(seed)
    records = [tiny_imagenet_example(encode_jpeg(class_pattern_image(i % 200, 200, SIZE, rng)),
                                     int(label), box=(0, 0, SIZE - 1, SIZE - 1))
               for i, label in enumerate(labels)]
    write_records(os.path.join(directory, "validation.tfrecord"), records)
    write_records(os.path.join(directory, "train.tfrecord"), [])


def _config(setup, **overrides):
    data_dir, prefix = setup
    values = dict(checkpoint_path=prefix, model_name=MODEL, dataset="tiny_imagenet",
                  dataset_image_size=SIZE, tiny_imagenet_data_dir=data_dir,
                  hparams="eval_batch_size=4", moving_average_decay=-1,
                  num_examples=NUM_EXAMPLES)
    values.update(overrides)
    return evaluation.EvalConfig(**values)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = model_lib.get_model(MODEL, 200, seed=0)
    prefix = checkpoints.save(dict(model.variables_by_name),
                              str(tmp_path_factory.mktemp("ckpt")), step=3)
    data_dir = str(tmp_path_factory.mktemp("tiny"))
    _write_validation(data_dir, [0] * NUM_EXAMPLES)
    predictions = str(tmp_path_factory.mktemp("pred") / "p.npz")
    evaluation.run(_config((data_dir, prefix), predictions_file=predictions))
    labels = np.load(predictions)["predictions"]
    labels[:2] = (labels[:2] + 1) % 200  # two points wrong without attack
    _write_validation(data_dir, labels)
    return data_dir, prefix


def _without_times(report):
    report = json.loads(json.dumps(report))
    for part in (report, report.get("second_eps") or {}):
        for row in part.get("attacks", []):
            row.pop("seconds")
    return report


def test_strong_eval_writes_worst_case_line_report_and_mask_the_same_every_run(setup, tmp_path):
    # One evaluator, the checkpoint evaluated twice (as continuous evaluation would).
    config = _config(setup, adv_method=CHEAP_AUTOATTACK, eval_name="aa")
    evaluator = evaluation.Evaluator(config)
    runs = []
    for run, mask_name in enumerate(("robust.npy", "robust.csv")):
        config.report_file = str(tmp_path / f"report{run}.json")
        config.robust_mask_file = str(tmp_path / mask_name)
        result = evaluator.evaluate(setup[1])
        evaluation.append_result_line(str(tmp_path / "results.csv"), "aa", result)
        runs.append((result, json.loads((tmp_path / f"report{run}.json").read_text())))
    (result, report), (result_again, report_again) = runs
    mask = np.load(tmp_path / "robust.npy")
    rows = np.loadtxt(tmp_path / "robust.csv", delimiter=",", skiprows=1, dtype=int)

    # The one-line contract: eval_name,accuracy,top5 with the worst-case accuracy.
    line = f"aa,{mask.mean():.3f},{result.top5:.3f}\n"
    assert (tmp_path / "results.csv").read_text() == line * 2
    assert mask.dtype == bool and mask.shape == (NUM_EXAMPLES,)
    assert report["n"] == NUM_EXAMPLES and report["eps"] == 8
    assert report["clean_count"] == NUM_EXAMPLES - 2
    assert [row["name"] for row in report["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # The description's budgets: 3 iterations, 20 Square queries.
    assert "3 iterations" in report["attacks"][0]["detail"]
    assert report["attacks"][-1]["detail"].startswith("20 queries")
    # Each attack ran on the points robust after the previous one; the last row is the mask.
    previous = report["clean_count"]
    for row in report["attacks"]:
        assert row["attacked"] == previous and row["robust_count"] <= previous
        assert row["accuracy"] == pytest.approx(row["robust_count"] / NUM_EXAMPLES)
        previous = row["robust_count"]
    assert previous == mask.sum() == report["robust_count"]
    assert report["robust_count"] < report["clean_count"]  # the attacks broke something
    assert not mask[:2].any()  # misclassified points are never robust
    assert report["global_step"] == 3 and report["gradients"]["examples"] == 6
    # Determinism: the same checkpoint gives the same report and mask (CSV: index,robust).
    np.testing.assert_array_equal(rows[:, 0], np.arange(NUM_EXAMPLES))
    np.testing.assert_array_equal(rows[:, 1].astype(bool), mask)
    assert _without_times(report_again) == _without_times(report)
    assert result_again.accuracy == result.accuracy


def test_eval_py_flags_reach_the_strong_evaluation(setup, tmp_path):
    # eval.py's own main() on parsed flags: a single attack, its report and the output line.
    from absl import flags

    from adversarial_logit_pairing.cli import eval as eval_cli

    data_dir, prefix = setup
    argv = ["eval.py", f"--checkpoint_path={prefix}", f"--model_name={MODEL}",
            "--dataset=tiny_imagenet", f"--dataset_image_size={SIZE}",
            f"--tiny_imagenet_data_dir={data_dir}", "--hparams=eval_batch_size=4",
            "--moving_average_decay=-1", f"--num_examples={NUM_EXAMPLES}",
            "--adv_method=apgdce_8_2", f"--output_file={tmp_path / 'out.csv'}",
            f"--report_file={tmp_path / 'r.json'}", "--eval_name=ce"]
    flags.FLAGS(argv)
    try:
        eval_cli.main(argv)
    finally:
        flags.FLAGS.unparse_flags()
    report = json.loads((tmp_path / "r.json").read_text())
    assert [row["name"] for row in report["attacks"]] == ["apgdce"]
    robust, top5 = report["robust_count"] / NUM_EXAMPLES, report["top5"]
    assert (tmp_path / "out.csv").read_text() == f"ce,{robust:.3f},{top5:.3f}\n"


@pytest.mark.parametrize("overrides, flag", [
    (dict(adv_method="pgd_8_2_3", report_file="r.json"), "--report_file"),
    (dict(adv_method="clean", robust_mask_file="m.npy"), "--robust_mask_file"),
    (dict(adv_method="autoattack_8", second_eps=300), "--second_eps"),
    (dict(adv_method="autoattack_8", training_adv_method="pgd_8"), "--training_adv_method"),
    (dict(adv_method="autoattack_8_5"), "autoattack_8_5"),
])
def test_bad_strong_flags_are_refused_before_any_work(setup, overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        evaluation.validate(_config(setup, **overrides))


def test_dlr_attacks_are_refused_for_too_few_classes():
    from adversarial_logit_pairing import attacks

    with pytest.raises(ConfigError, match="needs >= 4 classes"):
        attacks.description_stages("apgdt_8", num_classes=2)
    assert [s.name for s in attacks.description_stages("apgdmargin_8", 2)(2)] == ["apgdmargin"]


def test_driver_attacks_only_robust_points_seeded_as_run_stages_per_batch():
    from adversarial_logit_pairing import attacks, strong_evaluation
    from tests.test_autoattack import _counted_case

    model, x, labels, _, eps = _counted_case(12)
    eps_255 = max(1, int(round(eps * 255 / 2)))
    assert eps_255 * 2 / 255 < 0.05  # the index pixel still names its image

    def batches():
        return [(x[:6], labels[:6]), (x[6:], labels[6:])]

    def run(description):
        model.views.assign(tf.zeros_like(model.views))
        result = strong_evaluation.run_sequence(model, batches, description, bounds=(-1.0, 1.0),
                                                num_classes=5, batch_size=6)
        return result, model.views.numpy().copy()

    first, views_first = run(f"apgdce_{eps_255}_5")
    full, views = run(f"autoattack_{eps_255}_5_30")
    # Points APGD-CE broke are never shown to the later attacks; the others are.
    broken_first = first.clean & ~first.robust
    assert broken_first.sum() >= 2 and full.robust.sum() >= 2
    np.testing.assert_array_equal(views[broken_first], views_first[broken_first])
    assert (views[full.robust] > views_first[full.robust]).all()
    # Batch b is attacked as run_stages on that batch alone with seed (0, b): same masks.
    description = f"autoattack_{eps_255}_5_30"
    result, _ = run(description)
    expected = [attacks.run_stages(attacks.description_stages(description), model, xb, lb,
                                   eps=eps_255 * 2 / 255, seed=(0, b), batch_size=6)[1]
                for b, (xb, lb) in enumerate(batches())]
    np.testing.assert_array_equal(result.robust, np.concatenate([r.robust for r in expected]))
    for i, row in enumerate(result.rows):
        assert row.robust_count == sum(r.stages[i].robust_count for r in expected)


def test_driver_seeds_batch_b_with_0_b():
    # Two Square queries at a large eps: which points break depends on the seed.
    from adversarial_logit_pairing import attacks, strong_evaluation
    from tests.attack_models import LinearModel, images, predictions

    model = LinearModel(shape=(4, 4, 3), bias_scale=8.0, seed=4)
    x = images(40, shape=(4, 4, 3), low=-0.3, high=0.3, seed=2)
    labels = predictions(model, x)
    chunks = [(x[:20], labels[:20]), (x[20:], labels[20:])]
    result = strong_evaluation.run_sequence(model, lambda: chunks, "square_12_2",
                                            bounds=(-1.0, 1.0), num_classes=5, batch_size=20)

    def masks(seed_of):
        return np.concatenate([attacks.run_stages(
            attacks.description_stages("square_12_2"), model, xb, lb, eps=24 / 255,
            seed=seed_of(b), batch_size=20)[1].robust for b, (xb, lb) in enumerate(chunks)])

    np.testing.assert_array_equal(result.robust, masks(lambda b: (0, b)))
    assert (masks(lambda b: (0, b + 1)) != result.robust).any()  # the seed matters here
