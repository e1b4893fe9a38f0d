"""Paired comparisons of two models scored on the same samples (champion promotion, PR check).

When a new model and the current one are evaluated on the *same* samples their errors are
correlated, and the comparison must use that pairing: two unpaired confidence intervals that
overlap say little about the difference.

**Per-sample outcomes** (correct / incorrect, or "survived the attack"), :func:`paired_outcomes`
counts the four kinds of pair ``(new ok, old ok)``. Only the discordant pairs carry information
about the difference: ``b = new_only`` (new right, old wrong) and ``c = old_only``.
:func:`mcnemar_exact` is the exact (binomial) McNemar test: under H0 "both models are equally
often right" ``b ~ Binomial(b + c, 1/2)``, and

- ``"greater"`` (H1: the new model is better): ``p = P(X >= b)``;
- ``"less"`` (H1: the new model is worse): ``p = P(X <= b)``;
- ``"two-sided"``: ``p = min(1, 2 min(P(X <= b), P(X >= b)))``, which for the symmetric
  Binomial(·, 1/2) is the same as :func:`scipy.stats.binomtest`'s two-sided p-value.

With no discordant pairs there is no evidence either way and ``p = 1``.

**AUC** (label 1 positive; ties count one half), :func:`delong_paired`: the difference
``diff = AUC_new - AUC_old`` and its standard error from DeLong's covariance of two correlated
AUCs (DeLong, DeLong & Clarke-Pearson 1988), ``Var(diff) = Var_new + Var_old - 2 Cov``, computed
by :func:`ctharden.evaluation.intervals.delong_components`; ``z = diff / se`` and the two-sided
normal p-value ``2 (1 - Φ(|z|))``.

:func:`auc_noninferior` is the one-sided non-inferiority test of H0: ``diff <= -margin`` against
H1: ``diff > -margin``. It passes iff the one-sided lower confidence bound
``lower = diff - z_{1-alpha} se`` exceeds ``-margin`` (equivalently its p-value
``1 - Φ((diff + margin) / se)`` is below ``alpha``). Identical scores give ``diff = se = 0`` and
pass for every ``margin > 0``.

When ``se = 0`` (e.g. both models separate the classes perfectly, or the scores are identical),
``z`` is ``0`` for ``diff = 0`` and ``±inf`` otherwise, and the p-values are the limits (1 or 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr
from scipy.stats import binom

from ctharden.core.errors import DataError
from ctharden.evaluation.clean import as_labels
from ctharden.evaluation.intervals import (
    check_count,
    check_level,
    checked_real_scores,
    delong_components,
    finite_float,
    z_value,
)

__all__ = [
    "ALTERNATIVES",
    "PairedOutcomes",
    "auc_noninferior",
    "delong_paired",
    "mcnemar_exact",
    "paired_outcomes",
]

ALTERNATIVES: tuple[str, ...] = ("greater", "less", "two-sided")
"""Alternatives of :func:`mcnemar_exact`; ``"greater"`` means the new model is better."""


# ------------------------------------------------------------------------------------ outcomes
@dataclass(frozen=True)
class PairedOutcomes:
    """Counts of the pairs ``(new ok, old ok)`` over ``n`` samples.

    ``both``: both right; ``new_only``: only the new model right; ``old_only``: only the old model
    right; ``neither``: both wrong. The four add up to ``n``.
    """

    n: int
    both: int
    new_only: int
    old_only: int
    neither: int

    def to_dict(self) -> dict[str, int]:
        """The five counts as plain ``int`` (JSON-ready)."""
        return {key: int(value) for key, value in asdict(self).items()}


def paired_outcomes(new_ok: Any, old_ok: Any) -> PairedOutcomes:
    """Count the paired outcomes of two models on the same ``N`` samples.

    Args:
        new_ok: ``(N,)`` bool or 0/1: the new model got sample ``i`` right.
        old_ok: ``(N,)`` bool or 0/1: the old model got sample ``i`` right.

    Raises:
        DataError: empty or non-1-D input, values other than 0/1, or different lengths.
    """
    a = as_labels(new_ok, "new_ok").astype(bool)
    b = as_labels(old_ok, "old_ok").astype(bool)
    if a.shape[0] != b.shape[0]:
        raise DataError(f"shape mismatch: new_ok has {a.shape[0]} samples but old_ok has {b.shape[0]}")
    return PairedOutcomes(
        n=int(a.shape[0]),
        both=int(np.sum(a & b)),
        new_only=int(np.sum(a & ~b)),
        old_only=int(np.sum(~a & b)),
        neither=int(np.sum(~a & ~b)),
    )


def mcnemar_exact(new_only: int, old_only: int, *, alternative: str = "greater") -> float:
    """Exact McNemar p-value from the discordant counts (module docstring).

    Args:
        new_only: pairs where only the new model is right (``b >= 0``).
        old_only: pairs where only the old model is right (``c >= 0``).
        alternative: ``"greater"`` (new better, the default), ``"less"`` or ``"two-sided"``.

    Returns:
        The p-value in [0, 1]; ``1.0`` when ``b + c = 0``.

    Raises:
        DataError: a count that is not a non-negative integer, or an unknown ``alternative``.
    """
    b, c = check_count(new_only, "new_only"), check_count(old_only, "old_only")
    if b < 0 or c < 0:
        raise DataError(f"discordant counts must be >= 0, got new_only={b}, old_only={c}")
    if alternative not in ALTERNATIVES:
        raise DataError(f"unknown alternative={alternative!r}: expected one of {', '.join(ALTERNATIVES)}")
    d = b + c
    if d == 0:
        return 1.0
    p_ge = float(binom.sf(b - 1, d, 0.5))
    p_le = float(binom.cdf(b, d, 0.5))
    if alternative == "greater":
        p = p_ge
    elif alternative == "less":
        p = p_le
    else:
        p = 2.0 * min(p_ge, p_le)
    return min(1.0, max(0.0, p))


# ------------------------------------------------------------------------------------ AUC
def _z_ratio(num: float, se: float) -> float:
    """``num / se`` with the limits for ``se = 0``: 0 when ``num = 0``, else ``±inf``."""
    if se > 0.0:
        return num / se
    return 0.0 if num == 0.0 else math.copysign(math.inf, num)


def delong_paired(y_true: Any, score_new: Any, score_old: Any) -> dict[str, float]:
    """DeLong comparison of two correlated AUCs on the same samples.

    Args:
        y_true: ``(N,)`` labels in {0, 1}, at least two of each class.
        score_new: ``(N,)`` finite real scores of the new model.
        score_old: ``(N,)`` finite real scores of the old model.

    Returns:
        ``{"auc_new", "auc_old", "diff" (new - old), "se" (of diff), "z", "p_two_sided"}`` as
        Python floats (``z`` may be ``±inf`` when ``se = 0``, module docstring).

    Raises:
        DataError: bad labels or scores, length mismatch, fewer than two samples of a class.
    """
    y, s_new = checked_real_scores(y_true, score_new, "score_new")
    _, s_old = checked_real_scores(y, score_old, "score_old")
    aucs, cov = delong_components(y, np.stack([s_new, s_old]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    z = _z_ratio(diff, se)
    p = float(2.0 * ndtr(-abs(z)))
    return {
        "auc_new": float(aucs[0]),
        "auc_old": float(aucs[1]),
        "diff": diff,
        "se": se,
        "z": z,
        "p_two_sided": min(1.0, p),
    }


def auc_noninferior(
    y_true: Any, score_new: Any, score_old: Any, *, margin: float, alpha: float = 0.05
) -> dict[str, Any]:
    """One-sided DeLong non-inferiority test of the new model's AUC against the old one's.

    H0: ``auc_new - auc_old <= -margin``; passes iff ``diff - z_{1-alpha} se > -margin``.

    Args:
        y_true: ``(N,)`` labels in {0, 1}, at least two of each class.
        score_new, score_old: ``(N,)`` finite real scores of the two models on the same samples.
        margin: the tolerated loss of AUC, ``0 <= margin < 1`` (e.g. 0.02).
        alpha: one-sided significance level in (0, 1).

    Returns:
        ``{"passed" (bool), "lower", "diff", "se", "margin", "alpha", "auc_new", "auc_old",
        "p_value"}``; ``lower`` is the one-sided ``1 - alpha`` lower confidence bound of ``diff``,
        ``p_value`` the one-sided p-value ``1 - Φ((diff + margin) / se)``.

    Raises:
        DataError: as :func:`delong_paired`, or ``margin`` / ``alpha`` out of range.
    """
    mg = finite_float(margin, "margin")
    if not 0.0 <= mg < 1.0:
        raise DataError(f"margin={margin!r} must lie in [0, 1) (an AUC difference)")
    al = check_level(alpha, "alpha")
    res = delong_paired(y_true, score_new, score_old)
    diff, se = res["diff"], res["se"]
    lower = diff - z_value(1.0 - al, "lower") * se
    p = float(ndtr(-_z_ratio(diff + mg, se)))
    return {
        "passed": bool(lower > -mg),
        "lower": float(lower),
        "diff": diff,
        "se": se,
        "margin": mg,
        "alpha": al,
        "auc_new": res["auc_new"],
        "auc_old": res["auc_old"],
        "p_value": p,
    }
