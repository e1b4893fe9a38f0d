"""Confidence intervals (``ctharden.evaluation.intervals``) and paired comparisons
(``ctharden.evaluation.paired``): checked against scipy, sklearn and brute-force DeLong."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest, norm
from sklearn.metrics import roc_auc_score

from ctharden.core.errors import DataError
from ctharden.evaluation.intervals import (
    Interval,
    auc_bootstrap,
    auc_delong,
    delong_components,
    proportion_interval,
    z_value,
)
from ctharden.evaluation.paired import (
    PairedOutcomes,
    auc_noninferior,
    delong_paired,
    mcnemar_exact,
    paired_outcomes,
)

KN_GRID = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (0, 324), (1, 324), (162, 324), (300, 324), (324, 324)]
LEVELS = [0.9, 0.95, 0.99]
SCIPY_ALTERNATIVE = {"two-sided": "two-sided", "lower": "greater", "upper": "less"}


# --------------------------------------------------------------------------------- brute force
def _psi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(m, n) DeLong kernel: 1 if positive x_i > negative y_j, 1/2 on a tie, else 0."""
    d = x[:, None] - y[None, :]
    return np.asarray((d > 0) + 0.5 * (d == 0), dtype=np.float64)


def _brute_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """O(m n) DeLong, DeLong & Clarke-Pearson (1988), straight from the definitions."""
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    v10, v01, aucs = [], [], []
    for s in scores:
        psi = _psi(s[pos], s[~pos])
        aucs.append(psi.sum() / (m * n))
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    k = len(aucs)
    cov = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            s10 = np.sum((v10[a] - aucs[a]) * (v10[b] - aucs[b])) / (m - 1)
            s01 = np.sum((v01[a] - aucs[a]) * (v01[b] - aucs[b])) / (n - 1)
            cov[a, b] = s10 / m + s01 / n
    return np.asarray(aucs), cov


def _tied_data(seed: int, n: int = 120, models: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (models, n) scores rounded to a coarse grid, so that there are many ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2], y[2:4] = 0, 1
    base = rng.normal(size=n) + 1.2 * y
    scores = np.stack([np.round(base + rng.normal(scale=0.3 * (i + 1), size=n), 1) for i in range(models)])
    return y, scores


@pytest.fixture(scope="module")
def overlapping() -> tuple[np.ndarray, np.ndarray]:
    """300 samples, 150 per class, scores N(1.466, 1) vs N(0, 1): population AUC Φ(1.466/√2) ≈ 0.85."""
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(150, dtype=int), np.zeros(150, dtype=int)]
    s = np.r_[rng.normal(1.466, 1.0, 150), rng.normal(0.0, 1.0, 150)]
    return y, s


# --------------------------------------------------------------------------------- proportions
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method,scipy_method", [("clopper-pearson", "exact"), ("wilson", "wilson")])
@pytest.mark.parametrize("sided", ["two-sided", "lower", "upper"])
def test_proportion_matches_scipy(level: float, method: str, scipy_method: str, sided: str) -> None:
    for k, n in KN_GRID:
        got = proportion_interval(k, n, level=level, method=method, sided=sided)
        ref = binomtest(k, n, alternative=SCIPY_ALTERNATIVE[sided]).proportion_ci(level, method=scipy_method)
        assert got.lower == pytest.approx(ref.low, abs=1e-10), (k, n)
        assert got.upper == pytest.approx(ref.high, abs=1e-10), (k, n)
        assert got.point == k / n and got.k == k and got.n == n
        assert got.method == method and got.level == level and got.sided == sided and got.se is None
        assert 0.0 <= got.lower <= got.point <= got.upper <= 1.0


def test_proportion_one_sided_conventions() -> None:
    lo = proportion_interval(45, 50, level=0.95, sided="lower")
    two = proportion_interval(45, 50, level=0.90)
    up = proportion_interval(45, 50, level=0.95, sided="upper")
    assert lo.upper == 1.0 and up.lower == 0.0
    assert lo.lower == pytest.approx(two.lower, abs=1e-14)
    assert up.upper == pytest.approx(two.upper, abs=1e-14)
    assert proportion_interval(0, 50, sided="lower").lower == 0.0
    assert proportion_interval(50, 50, sided="upper").upper == 1.0
    wl = proportion_interval(45, 50, level=0.95, method="wilson", sided="lower")
    assert wl.lower == pytest.approx(proportion_interval(45, 50, level=0.90, method="wilson").lower, abs=1e-14)
    assert z_value(0.95, "lower") == pytest.approx(norm.ppf(0.95), abs=1e-14)
    assert z_value(0.95, "upper") == z_value(0.95, "lower")
    assert z_value(0.95, "two-sided") == pytest.approx(norm.ppf(0.975), abs=1e-14)


def test_proportion_accepts_numpy_ints() -> None:
    got = proportion_interval(np.int64(3), np.int32(10))  # type: ignore[arg-type]
    assert got.k == 3 and got.n == 10 and isinstance(got.k, int)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_clopper_pearson_lower_bound_covers(p: float) -> None:
    n, level = 50, 0.95
    bound = np.array([proportion_interval(k, n, level=level, sided="lower").lower for k in range(n + 1)])
    # exact coverage over the binomial distribution: Clopper-Pearson is conservative
    assert binom.pmf(np.arange(n + 1), n, p)[bound <= p].sum() >= level
    draws = np.random.default_rng(2024).binomial(n, p, size=20_000)
    assert np.mean(bound[draws] <= p) >= level


# --------------------------------------------------------------------------------- Interval
def test_interval_dict_round_trip_and_scaling() -> None:
    iv = proportion_interval(np.int64(45), 50, level=0.95, sided="lower")  # type: ignore[arg-type]
    d = iv.to_dict()
    assert set(d) == {"point", "lower", "upper", "n", "k", "method", "level", "sided", "se"}
    assert all(type(v) in (float, int, str, type(None)) for v in d.values())
    assert Interval.from_dict(json.loads(json.dumps(d))) == iv

    y, s = _tied_data(0, models=1)
    dl = auc_delong(y, s[0])
    assert Interval.from_dict(dl.to_dict()) == dl
    pct = dl.scaled(100.0)
    assert pct.point == pytest.approx(100 * float(dl.point or 0.0))
    assert (pct.lower, pct.upper) == pytest.approx((100 * dl.lower, 100 * dl.upper))
    assert pct.se == pytest.approx(100 * float(dl.se or 0.0))
    assert (pct.n, pct.k, pct.method, pct.level, pct.sided) == (dl.n, dl.k, dl.method, dl.level, dl.sided)

    no_se = {k: v for k, v in d.items() if k != "se"}
    assert Interval.from_dict(no_se) == iv
    with pytest.raises(DataError, match="lacks key.*lower"):
        Interval.from_dict({k: v for k, v in d.items() if k != "lower"})
    with pytest.raises(DataError, match="unknown key.*extra"):
        Interval.from_dict({**d, "extra": 1})
    with pytest.raises(DataError, match="factor"):
        iv.scaled(-1.0)


# --------------------------------------------------------------------------------- DeLong
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_components_match_brute_force(seed: int) -> None:
    y, scores = _tied_data(seed)
    aucs, cov = delong_components(y, scores)
    ref_aucs, ref_cov = _brute_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-15)
    for row, auc in zip(scores, aucs, strict=True):
        assert auc == pytest.approx(roc_auc_score(y, row), abs=1e-12)


def test_auc_delong_interval() -> None:
    y, scores = _tied_data(3, models=1)
    s = scores[0]
    _, ref_cov = _brute_delong(y, scores)
    se = math.sqrt(ref_cov[0, 0])
    auc = roc_auc_score(y, s)
    iv = auc_delong(y, s, level=0.95)
    assert iv.method == "delong" and iv.k is None and iv.n == y.size and iv.sided == "two-sided"
    assert iv.point == pytest.approx(auc, abs=1e-12)
    assert iv.se == pytest.approx(se, rel=1e-10)
    z = norm.ppf(0.975)
    assert (iv.lower, iv.upper) == pytest.approx((auc - z * se, min(1.0, auc + z * se)), abs=1e-12)
    lower = auc_delong(y, s, level=0.95, sided="lower")
    assert lower.lower == pytest.approx(auc - norm.ppf(0.95) * se, abs=1e-12) and lower.upper == 1.0
    upper = auc_delong(y, s, level=0.95, sided="upper")
    assert upper.lower == 0.0 and upper.upper == pytest.approx(min(1.0, auc + norm.ppf(0.95) * se), abs=1e-12)
    # logits: only the order matters
    logit = auc_delong(y, 7.0 * s - 3.0)
    assert (logit.point, logit.se) == pytest.approx((iv.point, iv.se), abs=1e-12)


def test_auc_delong_perfect_separation_collapses() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    iv = auc_delong(y, s)
    assert (iv.point, iv.lower, iv.upper, iv.se) == (1.0, 1.0, 1.0, 0.0)
    boot = auc_bootstrap(y, s, n_boot=200)
    assert (boot.lower, boot.upper, boot.se) == (1.0, 1.0, 0.0)


def test_bootstrap_agrees_with_delong(overlapping: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = overlapping
    dl = auc_delong(y, s)
    bs = auc_bootstrap(y, s, n_boot=2000, seed=0)
    assert dl.point is not None and 0.8 < dl.point < 0.92
    assert bs.point == pytest.approx(dl.point, abs=1e-12)
    assert (bs.method, bs.sided, bs.k, bs.n) == ("bootstrap", "two-sided", None, 300)
    assert abs(bs.lower - dl.lower) < 0.02 and abs(bs.upper - dl.upper) < 0.02
    assert bs.se == pytest.approx(dl.se, rel=0.2)
    assert auc_bootstrap(y, s, n_boot=500, seed=7) == auc_bootstrap(y, s, n_boot=500, seed=7)


# --------------------------------------------------------------------------------- paired
def test_delong_paired_matches_brute_force() -> None:
    y, scores = _tied_data(5, n=150, models=2)
    res = delong_paired(y, scores[0], scores[1])
    aucs, cov = _brute_delong(y, scores)
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    assert res["auc_new"] == pytest.approx(aucs[0], abs=1e-12)
    assert res["auc_old"] == pytest.approx(aucs[1], abs=1e-12)
    assert res["diff"] == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert res["se"] == pytest.approx(math.sqrt(var), rel=1e-9)
    assert res["z"] == pytest.approx(res["diff"] / res["se"], rel=1e-12)
    assert res["p_two_sided"] == pytest.approx(2 * norm.sf(abs(res["z"])), rel=1e-9)
    assert all(isinstance(v, float) for v in res.values())


def test_identical_scores_are_noninferior_for_any_margin() -> None:
    y, scores = _tied_data(6, models=1)
    res = delong_paired(y, scores[0], scores[0])
    assert (res["diff"], res["se"], res["z"], res["p_two_sided"]) == (0.0, 0.0, 0.0, 1.0)
    for margin in (1e-9, 0.01, 0.2):
        ni = auc_noninferior(y, scores[0], scores[0], margin=margin)
        assert ni["passed"] is True and ni["lower"] == 0.0 and ni["p_value"] == 0.0


def test_noninferiority_decision() -> None:
    y, scores = _tied_data(8, n=150, models=2)
    res = delong_paired(y, scores[0], scores[1])
    for margin in (0.0, 0.01, 0.05, 0.1):
        ni = auc_noninferior(y, scores[0], scores[1], margin=margin, alpha=0.05)
        lower = res["diff"] - norm.ppf(0.95) * res["se"]
        assert ni["lower"] == pytest.approx(lower, abs=1e-12)
        assert ni["passed"] == (lower > -margin) == (ni["p_value"] < 0.05)
        assert (ni["margin"], ni["alpha"], ni["diff"], ni["se"]) == (margin, 0.05, res["diff"], res["se"])
        assert (ni["auc_new"], ni["auc_old"]) == (res["auc_new"], res["auc_old"])
    # a model against its own reversal: the far better one passes, the far worse one fails
    assert auc_noninferior(y, scores[0], -scores[0], margin=0.02)["passed"] is True
    assert auc_noninferior(y, -scores[0], scores[0], margin=0.02)["passed"] is False


def test_paired_outcomes_counts() -> None:
    new = np.array([1, 1, 0, 0, 1, 1, 0], dtype=bool)
    old = np.array([1, 0, 1, 0, 0, 1, 0])
    got = paired_outcomes(new, old)
    assert got == PairedOutcomes(n=7, both=2, new_only=2, old_only=1, neither=2)
    assert got.to_dict() == {"n": 7, "both": 2, "new_only": 2, "old_only": 1, "neither": 2}
    with pytest.raises(DataError, match="shape mismatch: new_ok has 7 samples but old_ok has 6"):
        paired_outcomes(new, old[:6])
    with pytest.raises(DataError, match="old_ok must contain only labels 0 and 1"):
        paired_outcomes(new, old * 2)


@pytest.mark.parametrize("b,c", [(0, 1), (1, 0), (3, 3), (7, 2), (2, 7), (15, 4), (40, 25), (0, 30)])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_mcnemar_matches_binomtest(b: int, c: int, alternative: str) -> None:
    ref = binomtest(b, b + c, 0.5, alternative=alternative).pvalue
    assert mcnemar_exact(b, c, alternative=alternative) == pytest.approx(ref, rel=1e-12, abs=1e-15)


def test_mcnemar_no_discordant_pairs() -> None:
    for alternative in ("greater", "less", "two-sided"):
        assert mcnemar_exact(0, 0, alternative=alternative) == 1.0
    assert mcnemar_exact(np.int64(5), np.int64(0)) == pytest.approx(1 / 32)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 5, "n": 3}, r"k=5 must lie in \[0, n=3\]"),
        ({"k": -1, "n": 3}, r"k=-1 must lie in \[0, n=3\]"),
        ({"k": 0, "n": 0}, r"n=0 must be >= 1"),
        ({"k": 1, "n": 3, "level": 1.0}, r"level=1.0 must lie strictly between 0 and 1"),
        ({"k": 1, "n": 3, "level": 0.0}, r"level=0.0 must lie strictly between 0 and 1"),
        ({"k": 1, "n": 3, "level": float("nan")}, r"level must be finite"),
        ({"k": 1, "n": 3, "method": "jeffreys"}, r"unknown proportion method='jeffreys'"),
        ({"k": 1, "n": 3, "sided": "left"}, r"unknown sided='left'"),
        ({"k": True, "n": 3}, r"k must be an integer, got True"),
        ({"k": 1.0, "n": 3}, r"k must be an integer, got 1.0"),
        ({"k": 1, "n": np.float64(3)}, r"n must be an integer"),
    ],
)
def test_proportion_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        proportion_interval(**kwargs)  # type: ignore[arg-type]


def test_auc_bad_input() -> None:
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.9, -3.0, 2.0, 0.5])
    with pytest.raises(DataError, match="only class 1"):
        auc_delong(np.ones(5, dtype=int), s)
    with pytest.raises(DataError, match="only class 0"):
        auc_bootstrap(np.zeros(5, dtype=int), s)
    with pytest.raises(DataError, match="at least 2 samples of each class, got 1 positive"):
        auc_delong(np.array([0, 0, 0, 0, 1]), s)
    with pytest.raises(DataError, match="shape mismatch: y_true has 5 samples but score has 4"):
        auc_delong(y, s[:4])
    with pytest.raises(DataError, match="shape mismatch: y_true has 5 samples but score has 4"):
        auc_bootstrap(y, s[:4])
    with pytest.raises(DataError, match="score has 1 NaN/Inf value.*index 2"):
        auc_delong(y, np.array([0.1, 0.9, np.nan, 2.0, 0.5]))
    with pytest.raises(DataError, match="score has 1 NaN/Inf value.*index 0"):
        auc_bootstrap(y, np.array([np.inf, 0.9, 0.1, 2.0, 0.5]))
    with pytest.raises(DataError, match="y_true must contain only labels 0 and 1"):
        auc_delong(np.array([0, 1, 2, 1, 0]), s)
    with pytest.raises(DataError, match="level=1.0 must lie strictly between 0 and 1"):
        auc_delong(y, s, level=1.0)
    with pytest.raises(DataError, match="unknown sided='both'"):
        auc_delong(y, s, sided="both")
    with pytest.raises(DataError, match="n_boot=1 must be >= 2"):
        auc_bootstrap(y, s, n_boot=1)
    with pytest.raises(DataError, match="seed must be an integer"):
        auc_bootstrap(y, s, seed=0.5)  # type: ignore[arg-type]


def test_paired_bad_input() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, -3.0, 2.0, 0.5, 0.2])
    with pytest.raises(DataError, match="shape mismatch: y_true has 6 samples but score_old has 5"):
        delong_paired(y, s, s[:5])
    with pytest.raises(DataError, match=r"score_new has 3 NaN/Inf value\(s\), first at index 1: nan"):
        delong_paired(y, np.where(y == 1, np.nan, s), s)
    with pytest.raises(DataError, match="only class 0"):
        auc_noninferior(np.zeros(6, dtype=int), s, s, margin=0.02)
    with pytest.raises(DataError, match="margin=-0.1 must lie in"):
        auc_noninferior(y, s, s, margin=-0.1)
    with pytest.raises(DataError, match="alpha=0.0 must lie strictly between 0 and 1"):
        auc_noninferior(y, s, s, margin=0.02, alpha=0.0)
    with pytest.raises(DataError, match="unknown alternative='bigger'"):
        mcnemar_exact(3, 1, alternative="bigger")
    with pytest.raises(DataError, match="discordant counts must be >= 0"):
        mcnemar_exact(-1, 1)
    with pytest.raises(DataError, match="new_only must be an integer"):
        mcnemar_exact(1.5, 1)  # type: ignore[arg-type]
