"""Strong robustness evaluation: AutoAttack (Croce & Hein 2020) and its parts, L-infinity.

The PGD of the original ALP code (``adversarial_attack``) attacks the model's own prediction
with a fixed step; the critiques of ALP and AutoAttack attack the TRUE labels with stronger,
parameter-free attacks. Modules, one job each:

  losses        per-example losses: cross-entropy, margin, DLR, targeted DLR, targeted margin
  apgd          APGD (step-size schedule, checkpoints, momentum) and APGD-T
  fab           FAB-T, the targeted minimal-L-inf attack, counted within eps
  square        the score-based Square attack (no gradients)
  pgd           multi-restart PGD on the true labels
  autoattack    the standard sequence APGD-CE -> APGD-T -> FAB-T -> Square, with its report
  descriptions  description strings (``autoattack_8``, ``apgdt_8``, ...; grammar there)
  batching      the driver: chunks of at most ``batch_size``, only the points still robust
  step_ll       Step-LL, random-eps Step-LL and R+Step-LL: the single-step attacks of the
                adversarially trained Inception v3, named by the ORIGINAL attack strings
                (``stepll_EPS``, ...; ``adversarial_attack`` parses and dispatches them)

Descriptions (:func:`parse_strong_attack_description`, :func:`run_strong_attack`) name an
attack as the command line will; EPS and STEP are integers 1..255 on the 0..255 pixel scale,
rescaled to model units by ``(hi - lo) / 255`` like the original attack strings; a trailing
budget overrides the standard one:

  apgdce_EPS[_NITER]                APGD on cross-entropy, 1 restart, NITER 100
  apgddlr_EPS[_NITER]               APGD on DLR (>= 3 classes), 1 restart, NITER 100
  apgdmargin_EPS[_NITER]            APGD on the margin z_other - z_y (any number of classes;
                                    the DLR stand-in for two classes), NITER 100
  apgdt_EPS[_NITER]                 APGD-T, targeted DLR (>= 4 classes), 9 targets, NITER 100
  fabt_EPS[_NITER]                  FAB-T, 9 targets, counted within eps, NITER 100
  square_EPS[_NQUERIES]             Square, p_init 0.8, NQUERIES 5000
  pgdtrue_EPS_STEP_NITER_RESTARTS   PGD with random start on the true labels
  autoattack_EPS[_NITER_NQUERIES]   the standard sequence (e.g. autoattack_8: eps 8/255 of
                                    the input range); NITER (APGD, APGD-T and FAB-T iterations)
                                    and NQUERIES (Square) make a cheaper, non-standard one

Every attack takes ``model_fn`` (images -> logits, in inference mode), images within ``bounds``,
the true labels, ``eps`` in model units, a shape-[2] stateless ``seed`` (same seed, same
result) and ``batch_size``, and returns ``AttackResult(x_adv, robust)``; ``robust`` as input
restricts it to the points still robust. Each run is an in-graph ``tf.while_loop`` compiled once
per model and settings, so the model is traced a fixed number of times whatever the budget.
"""

from adversarial_logit_pairing.attacks.apgd import (
    checkpoint_fractions,
    checkpoint_iterations,
    run_apgd,
    run_apgd_targeted,
)
from adversarial_logit_pairing.attacks.autoattack import (
    STANDARD_ATTACKS,
    AutoAttackReport,
    Stage,
    StageReport,
    autoattack_stages,
    run_autoattack,
    run_stages,
)
from adversarial_logit_pairing.attacks.batching import AttackResult
from adversarial_logit_pairing.attacks.descriptions import (
    StrongAttackSpec,
    description_stages,
    is_strong_attack_description,
    parse_strong_attack_description,
    run_strong_attack,
)
from adversarial_logit_pairing.attacks.fab import run_fab_targeted
from adversarial_logit_pairing.attacks.losses import (
    cross_entropy,
    dlr_loss,
    margin_loss,
    targeted_dlr_loss,
    targeted_margin_loss,
    top_targets,
)
from adversarial_logit_pairing.attacks.pgd import run_pgd_true_labels
from adversarial_logit_pairing.attacks.square import run_square

__all__ = [
    "AttackResult",
    "AutoAttackReport",
    "STANDARD_ATTACKS",
    "Stage",
    "StageReport",
    "StrongAttackSpec",
    "autoattack_stages",
    "checkpoint_fractions",
    "checkpoint_iterations",
    "cross_entropy",
    "description_stages",
    "is_strong_attack_description",
    "dlr_loss",
    "margin_loss",
    "parse_strong_attack_description",
    "run_apgd",
    "run_apgd_targeted",
    "run_autoattack",
    "run_fab_targeted",
    "run_pgd_true_labels",
    "run_stages",
    "run_square",
    "run_strong_attack",
    "targeted_dlr_loss",
    "targeted_margin_loss",
    "top_targets",
]
