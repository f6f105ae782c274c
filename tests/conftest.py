"""Shared pytest setup: quiet TensorFlow logs and make the repo root importable."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tiny ImageNet TFRecords for the program runs: 32 training and 16 validation images
    of 32x32 class patterns (train.py and eval.py with ``--dataset_image_size=32``)."""
    from tests.data_builders import write_tiny_imagenet_tfrecords

    path = tmp_path_factory.mktemp("tiny_records")
    write_tiny_imagenet_tfrecords(str(path), num_train=32, num_val=16, image_size=32, seed=5)
    return str(path)


@pytest.fixture
def unwritable_dir(tmp_path):
    """An existing, empty directory in which this process cannot create files.

    Permission bits do not stop root (as CI runs), so as root the directory is made immutable
    with ``chattr +i`` instead; where neither works the test is skipped, saying why.
    """
    path = tmp_path / "unwritable_output"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)

        def undo():
            path.chmod(0o755)
    else:
        try:
            made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("running as root without chattr: no way to make a directory unwritable")
        if made.returncode:
            pytest.skip(f"chattr +i is not supported here: {made.stderr.strip()}")

        def undo():
            subprocess.run(["chattr", "-i", str(path)], check=True)
    try:
        try:
            (path / "probe").touch()
        except OSError:
            pass
        else:
            (path / "probe").unlink()
            pytest.skip(f"{path} stayed writable")
        yield str(path)
    finally:
        undo()
