"""White-box attacks: PGD (L∞/L2, CE/margin loss), FGSM, the robust-accuracy curve, sanity checks.

>>> x_adv, broken = pgd(model, x, y, eps=4 / 255, norm="linf", steps=100, loss="both")
>>> curve = robust_accuracy_curve(model, x, y, [0.01, 0.02, 0.05], loss="both")
>>> report = run_sanity_checks(model, x, y, [0.01, 0.02, 0.05]); report.passed, report.flags

Inputs and ε are in model-input units (``[0, 1]``; see :mod:`ctharden.models.wrapper` for HU).
:mod:`.pgd` documents the conventions and the step-size rule, :mod:`.losses` the losses and output
adapters (``rating`` models: ``logit = rating - 3``), :mod:`.sanity` the checks.
"""

from ctharden.attacks.losses import AttackError, OutputAdapter, attack_loss, infer_adapter
from ctharden.attacks.pgd import (
    ATTACK_LOSSES,
    NORMS,
    STEP_SIZE_FACTOR,
    attack_mode,
    default_step_size,
    fgsm,
    pgd,
    predict_broken,
    robust_accuracy_curve,
)
from ctharden.attacks.sanity import CHECKS, SanityReport, run_sanity_checks

__all__ = [
    "ATTACK_LOSSES",
    "AttackError",
    "CHECKS",
    "NORMS",
    "OutputAdapter",
    "STEP_SIZE_FACTOR",
    "SanityReport",
    "attack_loss",
    "attack_mode",
    "default_step_size",
    "fgsm",
    "infer_adapter",
    "pgd",
    "predict_broken",
    "robust_accuracy_curve",
    "run_sanity_checks",
]
