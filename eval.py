r"""Evaluates checkpoints on clean or adversarial inputs (the original eval.py).

Example:
  python eval.py --checkpoint_path=/tmp/alp --dataset=tiny_imagenet \
      --tiny_imagenet_data_dir=/data/tiny --adv_method=pgdll_16_2_10 --output_file=results.csv
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial_logit_pairing.cli.eval import run  # noqa: E402

if __name__ == "__main__":
    run()
