"""Packaging for the TF2 port of Adversarial Logit Pairing and related robust models."""

from setuptools import find_packages, setup

setup(
    name="adversarial-logit-pairing-tf2",
    version="0.1.0",
    description=(
        "TensorFlow 2 port of Google's Adversarial Logit Pairing research code: "
        "adversarial training and robustness evaluation of image classifiers."
    ),
    python_requires=">=3.9",
    packages=find_packages(
        include=["adversarial_logit_pairing*", "llr*", "tiny_imagenet_converter*"]
    ),
    install_requires=[
        # The one TensorFlow CI tests (.ci/run installs this file's pins): the multi-worker
        # start-up deadline uses TensorFlow internals (distribution._configure_coordination),
        # and tf-keras/tf-slim in the tests follow TensorFlow's minor version.
        "tensorflow>=2.21,<2.22",
        "tensorflow-hub>=0.16",
        "absl-py",
        "pandas",
        "numpy",
    ],
    extras_require={
        "test": [
            "pytest",
            "tf-slim",
            "tf-keras>=2.21,<2.22",
            "Pillow",
            "ruff",
            "scikit-learn",
        ],
        "demo": ["scikit-learn"],
        # Peers of bench/attack.py; cleverhans 4 declares dependencies that its tf2 attacks
        # do not import (tensorflow-probability, matplotlib, ...), so install it with
        # `pip install --no-deps cleverhans==4.0.0` next to this extra.
        "bench": ["adversarial-robustness-toolbox>=1.20", "tqdm", "scipy", "scikit-learn",
                  "six", "tf-keras"],
    },
    entry_points={
        "console_scripts": [
            "alp-train=adversarial_logit_pairing.cli.train:run",
            "alp-eval=adversarial_logit_pairing.cli.eval:run",
            "alp-convert-tiny-imagenet=tiny_imagenet_converter.converter:run",
            "alp-convert-imagenet=adversarial_logit_pairing.cli.convert_imagenet:run",
            "alp-export=adversarial_logit_pairing.cli.export:run",
            "llr-evaluate=llr.evaluate:run",
            "llr-convert=llr.convert_to_tfrecord:run",
        ]
    },
)
