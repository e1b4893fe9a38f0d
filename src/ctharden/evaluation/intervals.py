"""Confidence intervals for proportions and for the AUC, so that a gate decides on bounds.

A robustness gate that compares a point estimate (``accuracy = 0.91``) with a threshold passes a
model by luck as often as by merit when the test set is small. This module turns the estimates
into confidence bounds; the gate then asks whether the *bound* clears the threshold.

**Conventions.** Every function returns an :class:`Interval`. ``level`` is the confidence level
(``0.95``). ``sided`` is one of :data:`SIDES`:

- ``"two-sided"``: the usual central interval, each tail holding ``(1 - level) / 2``;
- ``"lower"``: a one-sided *lower* confidence bound at ``level`` in ``lower`` (the whole
  ``1 - level`` in one tail), with ``upper`` set to the largest possible value, ``1.0``;
- ``"upper"``: the mirror image, a one-sided upper bound in ``upper`` and ``lower = 0.0``.

A one-sided 95 % bound is therefore the matching end of the two-sided 90 % interval.

**Proportions** (``k`` successes out of ``n``, e.g. correctly classified samples),
:func:`proportion_interval`, methods :data:`METHODS`:

- ``"clopper-pearson"`` (exact, conservative: the coverage is at least ``level`` for every true
  ``p``). With ``a = 1 - level`` (one-sided) or ``a = (1 - level) / 2`` (two-sided)::

      lower = Beta.ppf(a, k, n - k + 1)        (0 when k = 0)
      upper = Beta.ppf(1 - a, k + 1, n - k)    (1 when k = n)

  the same bounds as :meth:`scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")`.
- ``"wilson"`` (score interval without continuity correction; coverage close to ``level`` on
  average but not guaranteed), with ``p = k / n`` and ``z`` from :func:`z_value`::

      centre = (2 n p + z²) / (2 (n + z²)),   half = z · sqrt(4 n p (1 - p) + z²) / (2 (n + z²))

  ``lower = centre - half`` (0 when k = 0), ``upper = centre + half`` (1 when k = n), as scipy's
  ``method="wilson"``.

**AUC.** The AUC counts ties one half, ``AUC = P(S⁺ > S⁻) + ½ P(S⁺ = S⁻)``, the same number as
:func:`sklearn.metrics.roc_auc_score`. Scores may be any finite reals (probabilities or logits);
only their order matters. Label 1 is the positive class; ``m`` positives, ``n`` negatives.

- :func:`auc_delong`: the normal-theory interval ``AUC ± z · se`` clipped to [0, 1], with the
  variance of DeLong, DeLong & Clarke-Pearson (1988), *Biometrics* 44:837-845. With the kernel
  ``ψ(x, y) = 1[x > y] + ½ 1[x = y]``, the structural components are
  ``V10(X_i) = (1/n) Σ_j ψ(X_i, Y_j)`` for each positive and ``V01(Y_j) = (1/m) Σ_i ψ(X_i, Y_j)``
  for each negative; ``S10``, ``S01`` are their sample covariance matrices (over models, ``ddof = 1``)
  and ``Var(AUC) = S10 / m + S01 / n``. They are computed with the midrank algorithm of Sun & Xu
  (2014), *IEEE Signal Processing Letters* 21(11):1389-1393, in O(N log N) per model: with ``T_z``
  the midranks of all scores, ``T_x`` those within the positives and ``T_y`` within the
  negatives, ``V10 = (T_z[pos] - T_x) / n`` and ``V01 = 1 - (T_z[neg] - T_y) / m``.
  :func:`delong_components` gives the AUCs and their covariance matrix for several models scored
  on the same samples; :mod:`ctharden.evaluation.paired` builds the paired test on it.

  *Known limitation*: when the classes are perfectly separated (AUC = 1 or 0) every component is
  constant, ``se = 0`` and the interval collapses onto the point. That is a property of the
  estimator, not a bug (the class-stratified bootstrap collapses the same way, since every
  resample is separated too); read such an interval together with ``n``.
- :func:`auc_bootstrap`: the class-stratified percentile bootstrap: positives and negatives are
  resampled separately with replacement (so every resample keeps ``m`` and ``n``), the AUC is
  recomputed ``n_boot`` times, and the interval is the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` quantiles of those AUCs; ``se`` is their standard deviation (``ddof = 1``).

Every :class:`Interval` converts to a JSON-ready dict (:meth:`Interval.to_dict`) and back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy.special import ndtri
from scipy.stats import beta, rankdata

from ctharden.core.errors import DataError
from ctharden.evaluation.clean import as_labels, finite_scores

__all__ = [
    "AUC_METHODS",
    "METHODS",
    "SIDES",
    "Interval",
    "auc_bootstrap",
    "auc_delong",
    "checked_real_scores",
    "delong_components",
    "proportion_interval",
    "z_value",
]

METHODS: tuple[str, ...] = ("clopper-pearson", "wilson")
"""Methods of :func:`proportion_interval`."""
AUC_METHODS: tuple[str, ...] = ("delong", "bootstrap")
"""Methods of the AUC intervals (:func:`auc_delong`, :func:`auc_bootstrap`)."""
SIDES: tuple[str, ...] = ("two-sided", "lower", "upper")
"""Kinds of interval: central, one-sided lower bound, one-sided upper bound."""

# elements of one (chunk, N) block of bootstrap resamples: bounds the memory to a few tens of MB
_BOOT_BLOCK = 1 << 21


# ------------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence bounds.

    ``point`` is the estimate (``k / n``, or the AUC), ``[lower, upper]`` the interval (for a
    one-sided bound the other end is the range's limit, see the module docstring), ``n`` the number
    of samples, ``k`` the successes (``None`` for the AUC), ``method`` one of :data:`METHODS` or
    :data:`AUC_METHODS`, ``level`` the confidence level, ``sided`` one of :data:`SIDES`, ``se``
    the standard error where the method has one (DeLong, bootstrap), else ``None``.
    """

    point: float | None
    lower: float
    upper: float
    n: int
    k: int | None
    method: str
    level: float
    sided: str
    se: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS + AUC_METHODS:
            raise DataError(f"unknown interval method {self.method!r}: expected one of {METHODS + AUC_METHODS}")
        if self.sided not in SIDES:
            raise DataError(f"unknown interval side {self.sided!r}: expected one of {SIDES}")
        if not self.lower <= self.upper:
            raise DataError(f"interval lower={self.lower!r} must not exceed upper={self.upper!r}")

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain Python ``float``/``int``/``str``/``None`` (JSON-ready)."""
        return {
            "point": None if self.point is None else float(self.point),
            "lower": float(self.lower),
            "upper": float(self.upper),
            "n": int(self.n),
            "k": None if self.k is None else int(self.k),
            "method": str(self.method),
            "level": float(self.level),
            "sided": str(self.sided),
            "se": None if self.se is None else float(self.se),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interval:
        """The inverse of :meth:`to_dict`. ``se`` may be absent; any other missing or unknown key
        is a :class:`DataError`."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in d and name != "se"]
        if missing:
            raise DataError(f"interval record lacks key(s) {', '.join(missing)} (has: {', '.join(sorted(d))})")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise DataError(f"interval record has unknown key(s) {', '.join(unknown)}")
        try:
            return cls(
                point=None if d["point"] is None else float(d["point"]),
                lower=float(d["lower"]),
                upper=float(d["upper"]),
                n=int(d["n"]),
                k=None if d["k"] is None else int(d["k"]),
                method=str(d["method"]),
                level=float(d["level"]),
                sided=str(d["sided"]),
                se=None if d.get("se") is None else float(d["se"]),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"interval record has a value of the wrong type: {exc}") from exc

    def scaled(self, factor: float) -> Interval:
        """``point``, ``lower``, ``upper`` and ``se`` multiplied by ``factor`` (> 0, e.g. 100 for
        percent); ``n``, ``k``, ``method``, ``level`` and ``sided`` unchanged."""
        f = finite_float(factor, "factor")
        if f <= 0.0:
            raise DataError(f"factor={factor!r} must be > 0 (a negative factor would swap the bounds)")
        return Interval(
            point=None if self.point is None else self.point * f,
            lower=self.lower * f,
            upper=self.upper * f,
            n=self.n,
            k=self.k,
            method=self.method,
            level=self.level,
            sided=self.sided,
            se=None if self.se is None else self.se * f,
        )


# ------------------------------------------------------------------------------------ validation
def finite_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise DataError(f"{name} must be finite, got {value!r}")
    return v


def check_count(value: Any, name: str) -> int:
    """``value`` as an ``int``: Python or numpy integers, not bools, not floats."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def check_level(level: Any, name: str = "level") -> float:
    lv = finite_float(level, name)
    if not 0.0 < lv < 1.0:
        raise DataError(f"{name}={level!r} must lie strictly between 0 and 1 (e.g. 0.95)")
    return lv


def _check_sided(sided: Any) -> str:
    if sided not in SIDES:
        raise DataError(f"unknown sided={sided!r}: expected one of {', '.join(SIDES)}")
    return str(sided)


def checked_real_scores(y_true: Any, score: Any, name: str = "score") -> tuple[np.ndarray, np.ndarray]:
    """``(y int64 (N,), s float64 (N,))``: labels in {0, 1} and finite real scores of equal length.

    Unlike :func:`ctharden.evaluation.clean.checked_scores` the scores need not lie in [0, 1]
    (logits are fine; ranks are all that matter here).
    """
    y = as_labels(y_true)
    return y, finite_scores(score, y.shape[0], name)


def _both_classes(y: np.ndarray, what: str, at_least: int = 1) -> tuple[int, int]:
    m = int(y.sum())
    n = int(y.shape[0]) - m
    if m == 0 or n == 0:
        only = 1 if m else 0
        raise DataError(f"{what} is undefined: y_true has only class {only} ({y.shape[0]} samples); need both classes")
    if min(m, n) < at_least:
        raise DataError(
            f"{what} needs at least {at_least} samples of each class, got {m} positive(s) and {n} negative(s)"
        )
    return m, n


# ------------------------------------------------------------------------------------ proportions
def z_value(level: float, sided: str) -> float:
    """The standard normal quantile of the normal-theory bounds: ``Φ⁻¹((1 + level) / 2)`` for
    ``"two-sided"``, ``Φ⁻¹(level)`` for ``"lower"`` and ``"upper"``."""
    lv = check_level(level)
    side = _check_sided(sided)
    return float(ndtri(0.5 + 0.5 * lv if side == "two-sided" else lv))


def proportion_interval(
    k: int, n: int, *, level: float = 0.95, method: str = "clopper-pearson", sided: str = "two-sided"
) -> Interval:
    """Confidence interval (or one-sided bound) for a binomial proportion ``k / n``.

    Args:
        k: successes, ``0 <= k <= n`` (Python or numpy integer; not a bool).
        n: trials, ``n >= 1``.
        level: confidence level in (0, 1).
        method: ``"clopper-pearson"`` (exact) or ``"wilson"`` (score, no continuity correction).
        sided: ``"two-sided"``, ``"lower"`` or ``"upper"`` (see the module docstring).

    Returns:
        An :class:`Interval` with ``point = k / n``, ``k``, ``n`` and ``se = None``.

    Raises:
        DataError: a count that is not an integer or is out of range, ``level`` outside (0, 1),
            or an unknown ``method`` / ``sided``.
    """
    kk, nn = check_count(k, "k"), check_count(n, "n")
    if nn < 1:
        raise DataError(f"n={nn} must be >= 1: a proportion needs at least one trial")
    if not 0 <= kk <= nn:
        raise DataError(f"k={kk} must lie in [0, n={nn}]")
    lv = check_level(level)
    if method not in METHODS:
        raise DataError(f"unknown proportion method={method!r}: expected one of {', '.join(METHODS)}")
    side = _check_sided(sided)

    lo_a, hi_a = _bounds_of(np.asarray([kk]), nn, lv, str(method), side)
    lo, hi = float(lo_a[0]), float(hi_a[0])
    return Interval(point=kk / nn, lower=lo, upper=hi, n=nn, k=kk, method=str(method), level=lv, sided=side)


def _bounds_of(k: np.ndarray, n: int, level: float, method: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised bounds ``(lower (K,), upper (K,))`` for counts ``k`` of ``n`` (validated inputs)."""
    k = k.astype(np.float64)
    if method == "clopper-pearson":
        a = (1.0 - level) / 2.0 if side == "two-sided" else 1.0 - level
        with np.errstate(invalid="ignore", divide="ignore"):
            lo = np.where(k == 0, 0.0, beta.ppf(a, np.maximum(k, 1), n - k + 1))
            hi = np.where(k == n, 1.0, beta.ppf(1.0 - a, k + 1, np.maximum(n - k, 1)))
    else:
        z = z_value(level, side)
        p = k / n
        denom = 2.0 * (n + z * z)
        centre = (2.0 * n * p + z * z) / denom
        half = z / denom * np.sqrt(4.0 * n * p * (1.0 - p) + z * z)
        lo = np.where(k == 0, 0.0, centre - half)
        hi = np.where(k == n, 1.0, centre + half)
    if side == "lower":
        hi = np.ones_like(k)
    elif side == "upper":
        lo = np.zeros_like(k)
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def proportion_bounds(k: Any, n: int, *, level: float = 0.95, method: str = "clopper-pearson",
                      sided: str = "two-sided") -> np.ndarray:
    """The bound of every count in ``k`` (``(K,)`` integers in ``[0, n]``) of ``n`` at once, as
    :func:`proportion_interval` computes it: ``sided="lower"`` gives the lower bounds,
    ``"upper"`` the upper ones; ``"two-sided"`` gives ``(2, K)`` (lower, upper). For the
    sample-size planner, which needs the bound of every possible count."""
    nn = check_count(n, "n")
    if nn < 1:
        raise DataError(f"n={nn} must be >= 1: a proportion needs at least one trial")
    kk = np.asarray(k)
    if kk.ndim != 1 or not np.issubdtype(kk.dtype, np.integer) or (kk < 0).any() or (kk > nn).any():
        raise DataError(f"k must be a 1-D array of integers in [0, n={nn}]")
    if method not in METHODS:
        raise DataError(f"unknown proportion method={method!r}: expected one of {', '.join(METHODS)}")
    side = _check_sided(sided)
    lo, hi = _bounds_of(kk, nn, check_level(level), str(method), side)
    if side == "lower":
        return lo
    if side == "upper":
        return hi
    return np.stack([lo, hi])


# ------------------------------------------------------------------------------------ DeLong
def _placements(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sun & Xu midrank placements of ``M`` models on the same samples.

    ``y``: ``(N,)`` labels in {0, 1}; ``scores``: ``(M, N)`` finite. Returns ``(aucs (M,),
    v10 (M, m), v01 (M, n))``: the AUCs and the DeLong structural components of the ``m``
    positives and the ``n`` negatives (the caller has checked both classes are present).
    """
    pos = y == 1
    x, yy = scores[:, pos], scores[:, ~pos]
    m, n = x.shape[1], yy.shape[1]
    tx = rankdata(x, axis=1)
    ty = rankdata(yy, axis=1)
    tz = rankdata(np.concatenate([x, yy], axis=1), axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    aucs = v10.mean(axis=1)
    return aucs, v10, v01


def delong_components(y: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of ``M`` models scored on the same samples and DeLong's covariance matrix of them.

    Args:
        y: ``(N,)`` labels in {0, 1}, at least two of each class.
        scores: ``(M, N)`` finite real scores (a ``(N,)`` array is taken as ``M = 1``).

    Returns:
        ``(aucs (M,), cov (M, M))`` with ``cov = S10 / m + S01 / n`` (module docstring). The
        variance of a contrast ``c · aucs`` is ``c @ cov @ c``.

    Raises:
        DataError: bad labels or scores, shape mismatch, or fewer than two samples of a class (the
            sample covariance of a single structural component is undefined).
    """
    yv = as_labels(y)
    s = np.asarray(scores)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2 or s.shape[0] < 1:
        raise DataError(f"scores must have shape (M, N) or (N,), got shape {np.asarray(scores).shape}")
    rows = np.stack([finite_scores(row, yv.shape[0], f"scores[{i}]") for i, row in enumerate(s)])
    m, n = _both_classes(yv, "the DeLong variance of the AUC", at_least=2)
    aucs, v10, v01 = _placements(yv, rows)
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return aucs, cov


def _bounds(point: float, half_lo: float, half_hi: float, sided: str) -> tuple[float, float]:
    lo = 0.0 if sided == "upper" else max(0.0, point - half_lo)
    hi = 1.0 if sided == "lower" else min(1.0, point + half_hi)
    return lo, hi


def auc_delong(y_true: Any, score: Any, *, level: float = 0.95, sided: str = "two-sided") -> Interval:
    """DeLong confidence interval (or one-sided bound) for the AUC: ``AUC ± z · se`` in [0, 1].

    Args:
        y_true: ``(N,)`` labels in {0, 1}; at least two positives and two negatives.
        score: ``(N,)`` finite real positive-class scores (probabilities or logits).
        level: confidence level in (0, 1); ``z`` is :func:`z_value(level, sided) <z_value>`.
        sided: ``"two-sided"``, ``"lower"`` (``upper = 1``) or ``"upper"`` (``lower = 0``).

    Returns:
        An :class:`Interval` with ``method="delong"``, ``point`` the AUC (ties count one half,
        equal to :func:`sklearn.metrics.roc_auc_score`), ``se`` its DeLong standard error,
        ``n = N`` and ``k = None``. Perfect separation gives ``se = 0`` and a zero-width interval
        (module docstring).

    Raises:
        DataError: bad labels or scores, length mismatch, a missing class, fewer than two samples
            of a class, ``level`` outside (0, 1), unknown ``sided``.
    """
    y, s = checked_real_scores(y_true, score)
    lv = check_level(level)
    side = _check_sided(sided)
    aucs, cov = delong_components(y, s[None, :])
    auc = float(aucs[0])
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    z = z_value(lv, side)
    lo, hi = _bounds(auc, z * se, z * se, side)
    return Interval(
        point=auc, lower=lo, upper=hi, n=int(y.shape[0]), k=None, method="delong", level=lv, sided=side, se=se
    )


# ------------------------------------------------------------------------------------ bootstrap
def _auc_rows(x: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """AUC of each row: ``x`` ``(B, m)`` positive scores, ``yy`` ``(B, n)`` negative scores."""
    m, n = x.shape[1], yy.shape[1]
    ranks = rankdata(np.concatenate([x, yy], axis=1), axis=1)
    return np.asarray((ranks[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n), dtype=np.float64)


def auc_bootstrap(y_true: Any, score: Any, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Class-stratified percentile-bootstrap confidence interval for the AUC (two-sided).

    Args:
        y_true: ``(N,)`` labels in {0, 1}, both classes present.
        score: ``(N,)`` finite real positive-class scores.
        level: confidence level in (0, 1).
        n_boot: number of resamples, ``>= 2``.
        seed: seed of the :func:`numpy.random.default_rng` generator (same seed, same interval).

    Returns:
        An :class:`Interval` with ``method="bootstrap"``, ``sided="two-sided"``, ``point`` the AUC
        of the data, ``[lower, upper]`` the percentile interval of the resampled AUCs and ``se``
        their standard deviation.

    Raises:
        DataError: bad labels or scores, length mismatch, a missing class, ``level`` outside
            (0, 1), ``n_boot < 2`` or a non-integer ``n_boot`` / ``seed``.
    """
    y, s = checked_real_scores(y_true, score)
    lv = check_level(level)
    b = check_count(n_boot, "n_boot")
    if b < 2:
        raise DataError(f"n_boot={b} must be >= 2")
    rng = np.random.default_rng(check_count(seed, "seed"))
    m, n = _both_classes(y, "the bootstrap AUC interval")
    x, yy = s[y == 1], s[y == 0]
    point = float(_auc_rows(x[None, :], yy[None, :])[0])

    chunk = max(1, _BOOT_BLOCK // (m + n))
    boots = np.empty(b, dtype=np.float64)
    for start in range(0, b, chunk):
        size = min(chunk, b - start)
        xb = x[rng.integers(0, m, size=(size, m))]
        yb = yy[rng.integers(0, n, size=(size, n))]
        boots[start : start + size] = _auc_rows(xb, yb)
    lo, hi = np.quantile(boots, [(1.0 - lv) / 2.0, (1.0 + lv) / 2.0])
    return Interval(
        point=point,
        lower=float(lo),
        upper=float(hi),
        n=int(y.shape[0]),
        k=None,
        method="bootstrap",
        level=lv,
        sided="two-sided",
        se=float(boots.std(ddof=1)),
    )
