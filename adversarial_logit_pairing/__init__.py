"""TensorFlow 2 port of Adversarial Logit Pairing (Kannan, Kurakin, Goodfellow, 2018).

Modules, each with one job as in the original:
  hparams, model_lib        hyper-parameters, lr schedules, optimizers, model registry
  adversarial_attack        PGD attacks (pgd, pgdll, pgdrnd) and their descriptions
  attacks/                  strong evaluation on true labels: APGD, APGD-T, FAB-T, Square,
                            multi-restart PGD and the AutoAttack sequence
  models/                   network definitions with TF-Slim variable names
  datasets/                 input pipelines of the original TFRecord layouts
  training, evaluation      the train and eval loops behind train.py / eval.py
  checkpoints, moving_average, optimizers   TF1-compatible state
  atomic_files, progress, tf_error_text     outputs renamed into place when complete,
                            progress/ETA log lines, the one useful line of a TF error
"""
