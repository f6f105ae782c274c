"""Outputs appear whole or not at all, under one naming scheme for temporaries."""

import logging
import os

import pytest

from adversarial_logit_pairing import atomic_files
from adversarial_logit_pairing.progress import ProgressLog


def test_write_file_replaces_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.csv")
    atomic_files.write_file(path, "old\n")
    atomic_files.write_file(path, b"new\n")
    assert (tmp_path / "results.csv").read_bytes() == b"new\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_a_failed_write_keeps_the_old_directory_and_removes_its_temporary(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "saved_model.pb").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_files.staged(str(export)) as staging:
            os.makedirs(staging)
            (tmp_path / os.path.basename(staging) / "partial").write_text("half")
            assert os.path.basename(staging).startswith(".export.tmp-")
            raise RuntimeError("killed half-way")
    assert os.listdir(tmp_path) == ["export"]
    assert (export / "saved_model.pb").read_text() == "old"


def test_a_complete_directory_replaces_the_old_one(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "stale").write_text("old")
    with atomic_files.staged(str(export)) as staging:
        os.makedirs(staging)
        (tmp_path / os.path.basename(staging) / "saved_model.pb").write_text("new")
    assert os.listdir(tmp_path) == ["export"]
    assert os.listdir(export) == ["saved_model.pb"]


def test_progress_logs_every_n_items_with_rate_and_eta(caplog):
    progress = ProgressLog("train.tfrecord", 5, "images", every_n=2)
    with caplog.at_level(logging.INFO, logger="absl"):
        for _ in range(5):
            progress.update()
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" (")[0] for line in lines] == [
        "train.tfrecord: 2/5 images", "train.tfrecord: 4/5 images", "train.tfrecord: 5/5 images"]
    assert all("images/s, ETA " in line for line in lines)
