"""DeepMind's LLR bird-or-bicycle model (two TF1 Hub modules) in TensorFlow 2.

Modules, one job each:
  hub_model            load the latents + linear pair as one differentiable model
  tf1_hub_format       write TF1 Hub modules (stand-ins for tests and offline use)
  data                 the bird-or-bicycle folder layout and its TFRecord form
  coverage             the challenge's metric: accuracy at 80% / 100% coverage
  spatial, spsa, corruptions   the challenge's attacks (PGD is adversarial_attack.pgd)
  evaluation           run attacks over a split and score them
  evaluate, convert_to_tfrecord   the command lines
"""
