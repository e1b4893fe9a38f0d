"""Attacks: PGD (L∞/L2, CE/margin loss), FGSM, the robust-accuracy curve, sanity checks, the
random and optimised NPS noise attacks (shen 2020, SAN/SAR metrics) in :mod:`.nps`, Auto-PGD
(:mod:`.apgd`), the black-box Square Attack (:mod:`.square`) and the AutoAttack-style ensemble
with its gradient-masking flag (:mod:`.ensemble`).

>>> x_adv, broken = pgd(model, x, y, eps=4 / 255, norm="linf", steps=100, loss="both")
>>> curve = robust_accuracy_curve(model, x, y, [0.01, 0.02, 0.05], loss="both")
>>> report = run_sanity_checks(model, x, y, [0.01, 0.02, 0.05]); report.passed, report.flags

Inputs and ε are in model-input units (``[0, 1]``; see :mod:`ctharden.models.wrapper` for HU).
:mod:`.pgd` documents the conventions and the step-size rule, :mod:`.losses` the losses and output
adapters (``rating`` models: ``logit = rating - 3``), :mod:`.sanity` the checks.
"""

from ctharden.attacks.apgd import apgd
from ctharden.attacks.common import ATTACK_LOSSES, NORMS, STEP_SIZE_FACTOR, attack_mode, default_step_size
from ctharden.attacks.ensemble import ENSEMBLE_ATTACKS, EnsembleResult, attack_ensemble
from ctharden.attacks.losses import AttackError, OutputAdapter, attack_loss, infer_adapter
from ctharden.attacks.nps import NPSAttackResult, NPSLevelResult, optimized_nps_attack, random_nps_attack
from ctharden.attacks.nps_metrics import san, san_rate, sar_above_curve, sar_from_counts
from ctharden.attacks.pgd import fgsm, pgd, predict_broken, robust_accuracy_curve
from ctharden.attacks.sanity import CHECKS, SanityReport, run_sanity_checks
from ctharden.attacks.square import SquareResult, square_attack, square_attack_result

__all__ = [
    "ATTACK_LOSSES",
    "AttackError",
    "NPSAttackResult",
    "NPSLevelResult",
    "CHECKS",
    "ENSEMBLE_ATTACKS",
    "EnsembleResult",
    "NORMS",
    "OutputAdapter",
    "STEP_SIZE_FACTOR",
    "SanityReport",
    "SquareResult",
    "apgd",
    "attack_ensemble",
    "attack_loss",
    "attack_mode",
    "default_step_size",
    "fgsm",
    "infer_adapter",
    "optimized_nps_attack",
    "pgd",
    "predict_broken",
    "random_nps_attack",
    "robust_accuracy_curve",
    "run_sanity_checks",
    "san",
    "san_rate",
    "sar_above_curve",
    "sar_from_counts",
    "square_attack",
    "square_attack_result",
]
