"""The gate decides on confidence bounds: pass / fail / inconclusive in both directions, the
planner's sample sizes decide at the stated confidence (checked by simulation), and a model at
exactly the threshold rarely passes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from ctharden.config.params import load_params
from ctharden.core.errors import ConfigError, DataError
from ctharden.evaluation.intervals import proportion_bounds, proportion_interval
from ctharden.gate.criteria import check, gate_settings, reasons
from ctharden.gate.plan import plan_job, planned_cap, planning_rate
from ctharden.gate.planner import auc_samples_needed, decide_power, samples_needed

ACC = "robust_ensemble_linf_acc_eps0.005"
SAN = "robust_random_test_san_rate_mas100"
AUC = "robust_clean_test_auc"


@pytest.fixture(scope="module")
def settings():  # type: ignore[no-untyped-def]
    return gate_settings(load_params(REPO / "params.yaml", "default"), "nodule2d")


def evidence(k_acc: int, n_acc: int, k_san: int, n_san: int, auc: float = 0.9, se: float = 0.01
             ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Headline metrics and their evidence for a nodule2d model (every other criterion clearly passes)."""
    headline = {AUC: auc, ACC: k_acc / n_acc, SAN: 100 * k_san / n_san, "robust_ensemble_l2_acc_eps0.25": 0.95,
                "robust_sanity_passed": 1.0}
    ev: dict[str, dict[str, float]] = {ACC: {"k": k_acc, "n": n_acc, "point": k_acc / n_acc},
                                       SAN: {"k": k_san, "n": n_san, "point": 100 * k_san / n_san},
                                       AUC: {"point": auc, "se": se, "n": 324},
                                       "robust_ensemble_l2_acc_eps0.25": {"k": 950, "n": 1000, "point": 0.95}}
    for mas in (50, 200, 500):
        name = f"robust_random_test_san_rate_mas{mas}"
        headline[name] = 0.0
        ev[name] = {"k": 0, "n": 1000, "point": 0.0}
    headline["robust_optimized_test_san_rate_mas500"] = 5.0
    ev["robust_optimized_test_san_rate_mas500"] = {"k": 50, "n": 1000, "point": 5.0}
    return headline, ev


def decide(settings, *args, **kwargs):  # type: ignore[no-untyped-def]
    headline, ev = evidence(*args, **kwargs)
    return check(headline, settings, ev)


def test_at_least_criterion_passes_fails_and_is_inconclusive_on_its_lower_bound(settings) -> None:  # type: ignore[no-untyped-def]
    # 0.70 needed: 300/324 has a lower bound far above; 11/16 = 0.69 cannot be decided; 100/324 is far below
    for k, n, want in ((300, 324, "pass"), (11, 16, "inconclusive"), (100, 324, "fail")):
        verdict = decide(settings, k, n, 0, 1000)
        row = verdict["criteria"]["robust_linf_acc_eps0.005"]
        assert row["decision"] == want, row
        assert verdict["verdict"] == want and verdict["passed"] == (want == "pass")
        lower = proportion_interval(k, n, level=0.95, sided="lower").lower
        assert row["lower"] == pytest.approx(lower) and row["k"] == k and row["n"] == n
    # a point above the threshold on too few samples is not a pass (the covid2d case of the issue: 11/16)
    row = decide(settings, 12, 16, 0, 1000)["criteria"]["robust_linf_acc_eps0.005"]
    assert row["value"] == 0.75 > 0.70 and row["decision"] == "inconclusive"
    assert row["samples_to_decide"] is not None and row["samples_to_decide"] > 16


def test_at_most_criterion_mirrors_on_its_upper_bound(settings) -> None:  # type: ignore[no-untyped-def]
    # SAN/N <= 5 % at 100 mAs: 0 of 40 cannot prove <= 5 % (upper bound 7.2 %), 0 of 324 can
    for k, n, want in ((0, 324, "pass"), (0, 40, "inconclusive"), (60, 324, "fail")):
        row = decide(settings, 300, 324, k, n)["criteria"]["random_san_mas100"]
        assert row["decision"] == want, row
        assert row["upper"] == pytest.approx(100 * proportion_interval(k, n, level=0.95, sided="upper").upper)


def test_auc_criterion_uses_the_delong_bound(settings) -> None:  # type: ignore[no-untyped-def]
    for auc, se, want in ((0.92, 0.02, "pass"), (0.87, 0.02, "inconclusive"), (0.80, 0.02, "fail")):
        row = decide(settings, 300, 324, 0, 1000, auc=auc, se=se)["criteria"]["clean_auc"]
        assert row["decision"] == want, row
        assert row["lower"] == pytest.approx(auc - 1.6448536 * se, abs=1e-6)


def test_missing_sample_counts_fail_with_a_reason(settings) -> None:  # type: ignore[no-untyped-def]
    headline, ev = evidence(300, 324, 0, 1000)
    del ev[ACC]
    verdict = check(headline, settings, ev)
    assert verdict["verdict"] == "fail" and "robust_linf_acc_eps0.005" in verdict["failed"]
    assert "no sample count" in reasons(verdict)
    headline.pop(SAN)
    assert check(headline, settings, ev)["criteria"]["random_san_mas100"]["note"] == "not measured"


def test_fail_outranks_inconclusive(settings) -> None:  # type: ignore[no-untyped-def]
    verdict = decide(settings, 11, 16, 60, 324)
    assert verdict["verdict"] == "fail" and verdict["inconclusive"] == ["robust_linf_acc_eps0.005"]
    assert "random_san_mas100 fail" in reasons(verdict) and "inconclusive" in reasons(verdict)


def test_a_model_without_gradients_can_fail_but_never_pass_a_white_box_criterion(settings) -> None:  # type: ignore[no-untyped-def]
    """Square's accuracy is an upper bound: a clear miss fails, a clear clearance is inconclusive;
    sanity and the optimised attack are not applicable; random NPS and the AUC decide as usual."""
    headline, ev = evidence(300, 324, 0, 1000)
    for name in (ACC, "robust_ensemble_l2_acc_eps0.25", "robust_optimized_test_san_rate_mas500",
                 "robust_sanity_passed"):
        headline.pop(name)
        ev.pop(name, None)
    bb_linf, bb_l2 = "robust_blackbox_linf_acc_eps0.005", "robust_blackbox_l2_acc_eps0.25"
    for k, want in ((320, "inconclusive"), (100, "fail")):
        headline[bb_linf], ev[bb_linf] = k / 324, {"k": k, "n": 324, "point": k / 324, "bound": "upper"}
        verdict = check(headline, settings, ev, white_box=False)
        row = verdict["criteria"]["robust_linf_acc_eps0.005"]
        assert row["decision"] == want and row["metric"] == bb_linf and row["k"] == k, row
        assert verdict["verdict"] == want and verdict["white_box"] is False and not verdict["passed"]
        if want == "inconclusive":
            assert "upper bound" in row["note"] and row["samples_to_decide"] is None
    # no black-box number either (that norm was not attacked): not applicable, not a silent pass
    l2 = verdict["criteria"]["robust_l2_acc_eps0.25"]
    assert l2["decision"] == "inconclusive" and l2["note"] == "not applicable: no gradients" and bb_l2 not in headline
    for name in ("sanity", "optimized_san_mas500"):
        row = verdict["criteria"][name]
        assert row["decision"] == "inconclusive" and row["note"] == "not applicable: no gradients", row
    assert verdict["criteria"]["random_san_mas100"]["decision"] == "pass"
    assert verdict["criteria"]["clean_auc"]["decision"] == "pass"
    assert "not applicable: no gradients" in reasons(verdict)
    # the same numbers with gradients: the white-box criteria without a value fail as "not measured"
    assert check(headline, settings, ev)["criteria"]["sanity"]["decision"] == "fail"


@pytest.mark.parametrize(("op", "t", "p"), [(">=", 0.70, 0.80), (">=", 0.70, 0.60), ("<=", 0.05, 0.01),
                                            ("<=", 0.25, 0.15)])
def test_planner_n_decides_with_the_stated_power_in_a_simulation(op: str, t: float, p: float) -> None:
    n = samples_needed(op, t, p, confidence=0.95, power=0.8)
    assert n is not None and decide_power(op, t, p, n) >= 0.8
    rng = np.random.default_rng(1)
    k = rng.binomial(n, p, size=4000)
    lower = proportion_bounds(k, n, sided="lower")
    upper = proportion_bounds(k, n, sided="upper")
    good = p >= t if op == ">=" else p <= t
    if op == ">=":
        decided = lower >= t if good else upper < t
    else:
        decided = upper <= t if good else lower > t
    assert decided.mean() >= 0.8 - 3 * np.sqrt(0.8 * 0.2 / len(k))  # Monte Carlo slack, 3 sigma
    assert decide_power(op, t, p, max(1, n // 2)) < 0.8  # and half as many would not do


def test_a_model_at_the_threshold_rarely_passes() -> None:
    # confidence 0.95: at the threshold the one-sided bound clears it in at most 5 % of draws
    rng = np.random.default_rng(2)
    n, t = 200, 0.7
    k = rng.binomial(n, t, size=4000)
    passed = proportion_bounds(k, n, sided="lower") >= t
    assert passed.mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(k))
    assert samples_needed(">=", t, t) is None


def test_auc_planner_extrapolates_the_delong_se() -> None:
    n = auc_samples_needed(0.85, 0.88, 0.02, 324)
    assert n is not None and n > 324  # 0.88 - 1.64 * 0.02 < 0.85: more samples needed
    assert auc_samples_needed(0.85, 0.95, 0.02, 324) < 324
    assert auc_samples_needed(0.85, 0.85, 0.02, 324) is None


def test_job_plan_rows_and_caps(settings) -> None:  # type: ignore[no-untyped-def]
    rows = {r["criterion"]: r for r in plan_job(settings, expected={"robust_linf_acc_eps0.005": 0.8})}
    assert rows["robust_linf_acc_eps0.005"]["expected_from"] == "given"
    assert rows["robust_linf_acc_eps0.005"]["needed"] == samples_needed(">=", 0.7, 0.8)
    assert rows["optimized_san_mas500"]["expected"] == pytest.approx(15.0)  # 25 % - the 10-point margin
    assert rows["clean_auc"]["needed"] is None  # no observed DeLong se to extrapolate from
    c = next(c for c in settings.criteria if c.name == "optimized_san_mas500")
    assert planning_rate(c, settings) == pytest.approx(15.0)
    assert planned_cap(settings, "optimized") == samples_needed("<=", 0.25, 0.15)
    with pytest.raises(ConfigError, match="op"):
        samples_needed("==", 0.5, 0.6)


def _outcomes(survivors: list[bool], dataset: str = "d1") -> dict:  # type: ignore[type-arg]
    ids = [f"s{i}" for i in range(len(survivors))]
    return {"dataset_hash": dataset, "ensemble_linf": {"ids": ids, "broken": {"0.005": [not s for s in survivors]}},
            "clean": {"ids": ids, "y": [i % 2 for i in range(len(ids))], "score": [0.5] * len(ids)}}


def test_paired_regression_is_not_fooled_by_a_few_moved_samples(settings) -> None:  # type: ignore[no-untyped-def]
    from ctharden.gate.champion import paired_regression

    c = settings.criterion("robust_linf_acc_eps0.005")
    base = _outcomes([True] * 31 + [False])  # 31/32
    head = _outcomes([True] * 28 + [False] * 4)  # 28/32: 0.094 worse, beyond a 0.07 tolerance on points
    r = paired_regression(head, base, c, alpha=0.05)
    assert (r["new_only"], r["old_only"], r["n"]) == (0, 3, 32)
    assert r["p_value"] == pytest.approx(0.125) and not r["regressed"]  # 3 discordant pairs prove nothing
    worse = _outcomes([True] * 20 + [False] * 12)
    assert paired_regression(worse, base, c, alpha=0.05)["regressed"]  # 11 lost samples do
    with pytest.raises(DataError, match="different datasets"):
        paired_regression(_outcomes([True] * 32, "d2"), base, c, alpha=0.05)


def test_plan_caps_reach_the_evaluation_settings() -> None:
    from ctharden.stages.evaluate import evaluation_settings

    params = load_params(REPO / "params.yaml", "default")
    s = evaluation_settings(params, "nodule2d", 45)
    n = samples_needed("<=", 0.25, 0.15)  # optimised SAN/N <= 25 % at 500 mAs, planned for a 15 % model
    assert s.optimized.max_samples == n and s.planned_caps == {"optimized": n}
    assert s.pgd.max_samples is None  # PGD attacks every test sample
    assert s.to_dict()["planned"] == ["optimized"]
