"""train.py and eval.py expose every flag of the original scripts (seen by --helpfull)."""

import re

import pytest

from tests.program_runs import run_concurrently

ORIGINAL_FLAGS = {
    "train.py": [
        "max_steps", "output_dir", "ps_tasks", "task", "master", "model_name", "dataset",
        "dataset_image_size", "num_summary_images", "save_summaries_steps",
        "save_summaries_secs", "save_model_steps", "hparams", "replicas_to_aggregate",
        "worker_replicas", "moving_average_decay", "finetune_checkpoint_path",
        "finetune_exclude_pretrained_scopes", "finetune_trainable_scopes",
        "imagenet_data_dir", "tiny_imagenet_data_dir",
    ],
    "eval.py": [
        "train_dir", "checkpoint_path", "output_file", "eval_name", "master", "model_name",
        "adv_method", "dataset", "dataset_image_size", "hparams", "split_name",
        "moving_average_decay", "eval_interval_secs", "num_examples", "eval_once",
        "trainable_scopes", "imagenet_data_dir", "tiny_imagenet_data_dir",
    ],
}


@pytest.fixture(scope="module")
def helpfull(tmp_path_factory) -> dict:
    """script -> its ``--helpfull`` run; the programs start at the same time."""
    return run_concurrently({script: (script, ["--helpfull"]) for script in ORIGINAL_FLAGS},
                            str(tmp_path_factory.mktemp("helpfull")), check=False)


@pytest.mark.parametrize("script", sorted(ORIGINAL_FLAGS))
def test_helpfull_lists_every_original_flag(helpfull, script):
    proc = helpfull[script]
    # absl ends --helpfull with status 1 after printing the flags to stdout.
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+):", proc.stdout, flags=re.M))
    missing = [flag for flag in ORIGINAL_FLAGS[script] if flag not in listed]
    assert not missing, f"{script} --helpfull lacks {missing}"
