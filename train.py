r"""Trains a model with clean, adversarial or logit-paired training (the original train.py).

Example (ALP on Tiny ImageNet):
  python train.py --output_dir=/tmp/alp --dataset=tiny_imagenet \
      --tiny_imagenet_data_dir=/data/tiny \
      --hparams=train_adv_method=pgdll_16_2_10,train_lp_weight=0.5
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial_logit_pairing.cli.train import run  # noqa: E402

if __name__ == "__main__":
    run()
