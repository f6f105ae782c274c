r"""Exports a checkpoint as a TF2 SavedModel with a serving signature and as a TF-Hub model.

Example (a released checkpoint, saved without moving averages):
  python export.py --checkpoint_path=checkpoints/tiny_imagenet_alp05 \
      --dataset=tiny_imagenet --moving_average_decay=-1 --export_dir=/tmp/tiny_alp05_export
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial_logit_pairing.cli.export import run  # noqa: E402

if __name__ == "__main__":
    run()
