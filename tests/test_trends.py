"""The papers' trends are checked on measured headline metrics, and say where they do not hold."""

from __future__ import annotations

from ctharden.evaluation.headline import CLEAN_TEST_AUC, san_rate_name
from ctharden.evaluation.trends import hardening_trends, nps_trends, trend_lines

MAS = [10, 50, 100, 200, 500]


def _headline(random: list[float], optimized: list[float], auc: float = 0.9) -> dict[str, float]:
    out = {CLEAN_TEST_AUC: auc}
    for attack, series in (("random", random), ("optimized", optimized)):
        for split in ("train", "test"):
            out.update({san_rate_name(attack, split, m): v for m, v in zip(MAS, series, strict=True)})
    return out


def test_falling_san_and_optimized_above_random_hold() -> None:
    t = nps_trends(_headline([40, 20, 10, 5, 1], [60, 35, 20, 10, 5]), MAS, ["train", "test"])
    assert all(c["holds"] for c in t["san_falls_with_mas"].values()) and len(t["san_falls_with_mas"]) == 4
    assert all(c["holds"] for c in t["optimized_ge_random"].values())


def test_violations_name_the_levels() -> None:
    t = nps_trends(_headline([40, 20, 25, 5, 1], [60, 15, 20, 10, 5]), [500, 10, 50, 100, 200], ["test"])
    assert t["san_falls_with_mas"]["random_test"]["rises_between"] == [[50.0, 100.0]]  # levels sorted
    assert t["optimized_ge_random"]["test"]["optimized_below_random_at_mas"] == [50.0, 100.0]
    lines = trend_lines(t)
    assert "- SAN/N falls as mAs rises, random test: no (rises between 50→100 mAs)" in lines
    assert "- optimised ≥ random SAN/N, test: no (below at 50, 100 mAs)" in lines


def test_hardening_trend_compares_with_the_baseline_and_the_stated_auc_loss() -> None:
    base = _headline([40, 20, 10, 5, 1], [60, 35, 20, 10, 5], auc=0.90)
    hard = _headline([30, 10, 12, 2, 0], [50, 30, 15, 5, 5], auc=0.84)
    t = hardening_trends(base, hard, MAS, max_auc_drop=0.05)
    assert not t["san_lowered"]["random"]["holds"] and t["san_lowered"]["random"]["higher_at_mas"] == [100.0]
    assert t["san_lowered"]["optimized"]["holds"]  # equal at 500 mAs counts as not higher
    assert not t["clean_auc"]["holds"] and abs(t["clean_auc"]["drop"] - 0.06) < 1e-9
    assert "clean_auc" not in hardening_trends(base, hard, MAS, max_auc_drop=None)
    assert nps_trends({}, MAS, ["test"]) == {"san_falls_with_mas": {}, "optimized_ge_random": {}}  # nothing measured
