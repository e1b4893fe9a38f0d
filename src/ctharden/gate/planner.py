"""How many samples a gate criterion needs before it can be decided.

A criterion ``rate >= t`` (robust accuracy) passes when the one-sided lower confidence bound of the
rate clears ``t`` and fails when the one-sided upper bound is below ``t``
(:mod:`ctharden.gate.criteria`); ``rate <= t`` (SAN/N) is the mirror. With few samples the bounds are
wide and the criterion stays *inconclusive*. For a model whose true rate is ``p`` (the *expected*
rate, ``p != t``), :func:`decide_power` is the probability that ``n`` samples decide the criterion
the right way (pass when ``p`` is on the good side of ``t``, fail otherwise), computed exactly by
summing the binomial probabilities of every count ``k`` whose bound decides::

    power(n) = sum_k Binom(k; n, p) * [bound(k, n) decides]

and :func:`samples_needed` is the smallest ``n`` with ``power(n) >= power`` (0.8 by default). The
bound is the gate's own (:func:`ctharden.evaluation.intervals.proportion_bounds`, Clopper–Pearson or
Wilson at the gate's confidence), so an ``n`` from here decides with the gate's confidence: a model
at exactly the threshold passes with probability at most ``1 - confidence``.

``power(n)`` is a saw-tooth in ``n`` (the discreteness of ``k``), not monotone; the search brackets
the first ``n`` reaching the target by doubling and bisection, then scans the 10 % below it (at
most 200 sizes) for a smaller ``n`` that also reaches it. AUC criteria use DeLong's normal bound, whose standard error
scales as ``1/sqrt(n)``: :func:`auc_samples_needed` extrapolates it from an observed one.

Rates are shares in ``[0, 1]`` here; SAN/N criteria (in %) are converted by the caller.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom, norm

from ctharden.core.errors import ConfigError
from ctharden.evaluation.intervals import proportion_bounds

OPS = (">=", "<=")
N_MAX = 100_000
SCAN = 200  # at most this many sizes below the bisection's answer are tried


def _check(op: str, threshold: float, rate: float) -> None:
    if op not in OPS:
        raise ConfigError(f"criterion op must be one of {OPS}, got {op!r}")
    for name, v in (("threshold", threshold), ("expected rate", rate)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ConfigError(f"{name} must be a share in [0, 1], got {v!r}")


def good_side(op: str, threshold: float, rate: float) -> bool:
    """Whether a true ``rate`` meets the criterion ``rate op threshold``."""
    return rate >= threshold if op == ">=" else rate <= threshold


def decide_power(op: str, threshold: float, rate: float, n: int, *, confidence: float = 0.95,
                 method: str = "clopper-pearson") -> float:
    """Probability that ``n`` samples of a model with true rate ``rate`` decide ``rate op threshold``
    correctly (pass if the true rate meets it, fail otherwise) with the gate's one-sided bounds."""
    _check(op, threshold, rate)
    k = np.arange(n + 1)
    good = good_side(op, threshold, rate)
    # the bound that can decide: >= passes on the lower bound and fails on the upper one; <= mirrors
    side = "lower" if (op == ">=") == good else "upper"
    bound = proportion_bounds(k, n, level=confidence, method=method, sided=side)
    if op == ">=":
        decided = bound >= threshold if good else bound < threshold
    else:
        decided = bound <= threshold if good else bound > threshold
    return float(binom.pmf(k, n, rate)[decided].sum())


def _normal_guess(threshold: float, rate: float, confidence: float, power: float) -> int:
    """The normal-approximation sample size (the search's starting point)."""
    za, zb = norm.ppf(confidence), norm.ppf(power)
    num = za * math.sqrt(threshold * (1 - threshold)) + zb * math.sqrt(rate * (1 - rate))
    return max(1, int(math.ceil((num / abs(rate - threshold)) ** 2)))


def samples_needed(op: str, threshold: float, rate: float, *, confidence: float = 0.95, power: float = 0.8,
                   method: str = "clopper-pearson", n_max: int = N_MAX) -> int | None:
    """The smallest ``n`` (found, see the module docstring) whose :func:`decide_power` reaches
    ``power`` for a model with true rate ``rate``; None when no ``n <= n_max`` does (a rate equal
    to the threshold is never decided)."""
    _check(op, threshold, rate)
    if not 0.0 < power < 1.0:
        raise ConfigError(f"power must lie in (0, 1), got {power!r}")
    if rate == threshold:
        return None

    def ok(n: int) -> bool:
        return decide_power(op, threshold, rate, n, confidence=confidence, method=method) >= power

    hi = min(_normal_guess(threshold, rate, confidence, power), n_max)
    while not ok(hi):
        if hi >= n_max:
            return None
        hi = min(2 * hi, n_max)
    lo = 0  # ok(lo) is False (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    for n in range(max(1, int(hi * 0.9), hi - SCAN), hi):  # the saw-tooth: a smaller n may reach it too
        if ok(n):
            return n
    return hi


def auc_samples_needed(threshold: float, auc: float, se: float, n: int, *, confidence: float = 0.95,
                       power: float = 0.8) -> int | None:
    """Samples for the AUC criterion ``AUC >= threshold`` from an observed AUC with DeLong standard
    error ``se`` on ``n`` samples (same class shares): the ``n`` at which the one-sided bound
    ``AUC ∓ z·se`` clears the threshold with probability ``power``. None when ``auc == threshold``
    or ``se`` is 0 (nothing to extrapolate: already decided)."""
    if auc == threshold or not se > 0 or n < 1:
        return None
    z = norm.ppf(confidence) + norm.ppf(power)
    return max(1, int(math.ceil(n * (z * se / abs(auc - threshold)) ** 2)))
