"""``python -m llr.evaluate`` on real JPEG photos in the challenge layout, and its errors."""

import json
import os

import numpy as np
import pytest

from adversarial_logit_pairing.errors import ConfigError, DataError
from llr import data, evaluation, hub_model, tf1_hub_format
from tests.llr_builders import write_photo_folder, write_standin_pair
from tests.program_runs import run_concurrently, run_program

FAST = ["--image_size=64", "--batch_size=4", "--spatial_grid=3,3,5", "--pgd_iters=3",
        "--spsa_steps=3", "--spsa_samples=8", "--spsa_batch_size=4"]
ALL_ATTACKS = ("clean", "spatial_grid", "pgd", "pgd_8_2_2", "spsa", "common_corruptions",
               "jpeg_compression")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llr_eval")
    data_dir = write_photo_folder(str(root / "data"))
    images = np.concatenate([b.images for b in data.iterate_split(data_dir, "test", 8, 64)])
    latents, linear = write_standin_pair(str(root / "modules"), centre_on=images)
    return {"root": root, "data_dir": data_dir, "latents": latents, "linear": linear}


def _hand_computed_clean_accuracies(setup):
    """Accuracy at 100% and 80% coverage of the clean photos, computed here by hand."""
    model = hub_model.load(setup["latents"], setup["linear"])
    batches = list(data.iterate_split(setup["data_dir"], "test", 8, 64, shuffle_seed=None))
    logits = model(np.concatenate([b.images for b in batches])).numpy()
    labels = np.concatenate([b.labels for b in batches])
    correct = (logits[:, 1] > logits[:, 0]).astype(int) == labels
    confidence = logits.max(axis=1)
    answered = np.argsort(-confidence, kind="stable")[:int(0.8 * len(labels))]
    answered = confidence >= confidence[answered].min()
    return correct[answered].mean(), correct.mean(), int(answered.sum())


@pytest.mark.slow
def test_evaluate_command_runs_every_attack_on_real_jpeg_photos(setup):
    """Default module flags (the tfhub.dev URLs), served by a seeded cache."""
    cache = str(setup["root"] / "tfhub_cache")
    tf1_hub_format.seed_hub_cache(cache, hub_model.DEFAULT_LATENTS_HANDLE, setup["latents"])
    tf1_hub_format.seed_hub_cache(cache, hub_model.DEFAULT_LINEAR_HANDLE, setup["linear"])
    output = str(setup["root"] / "results.jsonl")
    proc = run_program("llr.evaluate", f"--data_dir={setup['data_dir']}", "--split=test",
                       f"--attacks={','.join(ALL_ATTACKS)}", f"--output_file={output}", *FAST,
                       check=False, env={"TFHUB_CACHE_DIR": cache})
    assert proc.returncode == 0, proc.stderr[-4000:]
    json_lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in json_lines]
    assert [r["attack"] for r in records] == list(ALL_ATTACKS)
    with open(output) as f:
        assert f.read().splitlines() == json_lines
    table = proc.stdout.split("{", 1)[0]
    assert "acc@80% cov" in table and "acc@100% cov" in table
    for attack in ALL_ATTACKS:
        assert any(line.startswith(attack + " ") for line in table.splitlines()), attack
    for record in records:
        assert record["num_examples"] == 8 and record["split"] == "test"
        assert record["latents_module"] == hub_model.DEFAULT_LATENTS_HANDLE
        assert 0.0 <= record["accuracy_at_80"] <= 1.0
    clean = records[0]
    acc80, acc100, covered = _hand_computed_clean_accuracies(setup)
    assert clean["accuracy_at_100"] == pytest.approx(acc100)
    assert clean["accuracy_at_80"] == pytest.approx(acc80)
    assert clean["num_covered_at_80"] == covered
    assert 0.0 < acc100 < 1.0, "the stand-in should get some photos right and some wrong"
    pgd = records[ALL_ATTACKS.index("pgd")]
    assert pgd["accuracy_at_100"] <= clean["accuracy_at_100"]
    # Long attacks log their progress.
    assert "spatial_grid batch 1: 45/45 transforms" in proc.stderr
    assert "spsa: 8/8 images" in proc.stderr


def test_results_are_written_as_csv_when_the_file_name_says_so(tmp_path):
    results = [evaluation.AttackResult("clean", 8, 0.75, 0.5, 6, 2, 4, 1.5),
               evaluation.AttackResult("spsa", 8, 0.5, 0.25, 6, 3, 6, 9.0)]
    records = evaluation.result_records(results, {"split": "test"})
    evaluation.write_results(str(tmp_path / "r.csv"), records)
    evaluation.write_results(str(tmp_path / "r.jsonl"), records)
    with open(tmp_path / "r.csv") as f:
        assert f.read().splitlines() == [
            "attack,num_examples,accuracy_at_80,accuracy_at_100,num_covered_at_80,"
            "num_errors_at_80,num_errors_at_100,seconds,split",
            "clean,8,0.75,0.5,6,2,4,1.5,test", "spsa,8,0.5,0.25,6,3,6,9.0,test"]
    with open(tmp_path / "r.jsonl") as f:
        assert [json.loads(line) for line in f] == records
    assert sorted(os.listdir(tmp_path)) == ["r.csv", "r.jsonl"]


def _one_line_error(proc):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llr-evaluate:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("llr-evaluate: error: ")
    return errors[0]


@pytest.fixture(scope="module")
def bad_input_runs(setup, tmp_path_factory):
    """llr.evaluate on the two bad inputs below, one after the other in one process."""
    root = tmp_path_factory.mktemp("llr_bad_inputs")
    not_a_module = root / "plain_dir"
    not_a_module.mkdir()
    (not_a_module / "saved_model.pb").write_bytes(b"")
    no_class_folders = root / "no_class_folders"
    (no_class_folders / "test" / "birds").mkdir(parents=True)
    runs = run_concurrently({
        "module": ("llr.evaluate", [
            f"--latents_module={not_a_module}", f"--linear_module={setup['linear']}",
            f"--data_dir={setup['data_dir']}", "--attacks=clean", *FAST]),
        "folder": ("llr.evaluate", [
            f"--latents_module={setup['latents']}", f"--linear_module={setup['linear']}",
            f"--data_dir={no_class_folders}", "--attacks=clean", *FAST]),
    }, str(root / "logs"), check=False, in_one_process=True)
    return runs, not_a_module


@pytest.mark.slow
def test_evaluate_command_reports_a_bad_module_handle_in_one_line(bad_input_runs):
    runs, not_a_module = bad_input_runs
    line = _one_line_error(runs["module"])
    assert f"latents module '{not_a_module}'" in line
    assert "not a TF1 Hub module" in line and line.endswith("(--latents_module)")


@pytest.mark.slow
def test_evaluate_command_reports_a_folder_without_class_folders_in_one_line(bad_input_runs):
    line = _one_line_error(bad_input_runs[0]["folder"])
    assert "lacks the class folder(s) bicycle/, bird/" in line and "(found: birds)" in line


def test_unreadable_image_stops_evaluation_naming_the_file(setup, tmp_path):
    data_dir = write_photo_folder(str(tmp_path), per_class=2)
    bad = os.path.join(data_dir, "test", "bicycle", "zz_broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    model = hub_model.load(setup["latents"], setup["linear"])
    settings = evaluation.EvalSettings(data_dir=data_dir, batch_size=2, image_size=64)
    with pytest.raises(DataError, match=f"^{bad}: cannot decode the image"):
        evaluation.evaluate(model, settings, ["clean"])


def test_converted_tfrecords_evaluate_like_the_folders(setup, tmp_path):
    data.write_tfrecord(setup["data_dir"], "test", str(tmp_path / "test.tfrecord"))
    model = hub_model.load(setup["latents"], setup["linear"])
    folder = evaluation.evaluate(model, evaluation.EvalSettings(
        data_dir=setup["data_dir"], batch_size=3, image_size=64), ["clean"])[0]
    records = evaluation.evaluate(model, evaluation.EvalSettings(
        data_dir=str(tmp_path), batch_size=3, image_size=64), ["clean"])[0]
    assert (records.accuracy_at_80, records.accuracy_at_100, records.num_covered_at_80) == \
        (folder.accuracy_at_80, folder.accuracy_at_100, folder.num_covered_at_80)


def test_attack_list_and_settings_are_validated():
    assert evaluation.parse_attacks(" clean, pgd_4_1_10 ,gaussian_noise") == [
        "clean", "pgd_4_1_10", "gaussian_noise"]
    with pytest.raises(ConfigError, match="unknown attack 'boundary'"):
        evaluation.parse_attacks("clean,boundary")
    with pytest.raises(ConfigError, match="listed more than once"):
        evaluation.parse_attacks("clean,clean")
    # The grammar's limits are ALP's: EPS and STEP within 1..255, NITER >= 1.
    for bad in ("pgd_300_2_10", "pgd_0_2_10", "pgd_16_256_3", "pgd_16_2_0"):
        with pytest.raises(ConfigError, match=f"--attacks: invalid attack description '{bad}'"):
            evaluation.parse_attacks(f"clean,{bad}")
    with pytest.raises(ConfigError, match="--spsa_samples must be even"):
        evaluation.check_settings(evaluation.EvalSettings(data_dir=".", spsa_samples=5))
