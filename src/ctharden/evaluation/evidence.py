"""The interval of every rate and score an evaluation reports: ``metrics/*.json`` ``<job>.intervals``.

One entry per headline metric (:mod:`ctharden.evaluation.headline`) that is a rate or a score,
plus the clean test accuracy, sensitivity and specificity, keyed by the metric name::

    {"robust_random_test_san_rate_mas10": {"point": 4.6, "lower": 2.6, "upper": 7.5, "k": 15, "n": 324,
                                           "method": "clopper-pearson", "level": 0.95, "sided": "two-sided",
                                           "unit": "%", "pooled": {...}}, ...}

- SAN/N (%) per attack, split and mAs: ``k`` = SAN of the selected model, ``n`` = attacked samples;
  with several fold models also ``pooled`` (every model's SAN over ``n × models`` trials: the
  pooled interval beside the folds' mean ± std; fold models share the samples, so the pooled one
  is a summary, not independent evidence) and ``folds`` (mean, std, models);
- robust accuracy per norm and ε: ``k`` = samples that survived, ``n`` = attacked samples (for a
  model without gradients, the Square-only accuracy under its own name, ``bound: "upper"``);
- clean test accuracy / sensitivity / specificity: from the confusion counts;
- clean test AUC: DeLong (``se`` recorded), with the stratified bootstrap as ``check``.

Rates use ``robustness.intervals.method`` (exact Clopper–Pearson by default, Wilson as an option)
at ``robustness.intervals.level``, two-sided. The gate recomputes its own one-sided bounds from
``k``, ``n`` and ``se`` (:mod:`ctharden.gate.criteria`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctharden.evaluation.headline import (
    CLEAN_TEST_AUC,
    NPS_RESULT_KEYS,
    blackbox_accuracy_name,
    clean_metric_name,
    ensemble_accuracy_name,
    ensemble_eps,
    pgd_accuracy_name,
    san_rate_name,
)
from ctharden.evaluation.intervals import proportion_interval

CLEAN_RATES = (("accuracy", "tp+tn", "n"), ("sensitivity", "tp", "n_pos"), ("specificity", "tn", "n_neg"))


def _rate(k: int, n: int, level: float, method: str, scale: float = 1.0) -> dict[str, Any]:
    iv = proportion_interval(int(k), int(n), level=level, method=method)
    out = (iv.scaled(scale) if scale != 1.0 else iv).to_dict()
    out["unit"] = "%" if scale == 100.0 else "share"
    return out


def interval_settings(result: Mapping[str, Any]) -> tuple[float, str]:
    """``(level, method)`` the evaluation was configured with (defaults for older results)."""
    cfg = (result.get("settings") or {}).get("intervals") or {}
    return float(cfg.get("level", 0.95)), str(cfg.get("method", "clopper-pearson"))


def nps_intervals(result: Mapping[str, Any], level: float, method: str) -> dict[str, dict[str, Any]]:
    """SAN/N (%) intervals per attack, split and mAs."""
    out: dict[str, dict[str, Any]] = {}
    for key, short in NPS_RESULT_KEYS:
        for split, block in result[key].items():
            n, models = int(block["n"]), int(block.get("n_models", 1))
            for lv in block["levels"].values():
                entry = _rate(lv["san"], n, level, method, 100.0)
                if models > 1 and "san_pooled" in lv:
                    entry["pooled"] = _rate(lv["san_pooled"], n * models, level, method, 100.0)
                    entry["folds"] = {"mean": lv["san_rate_mean"], "std": lv["san_rate_std"], "models": models}
                out[san_rate_name(short, split, lv["mas"])] = entry
    return out


def pgd_intervals(result: Mapping[str, Any], level: float, method: str) -> dict[str, dict[str, Any]]:
    """Robust-accuracy intervals per norm and ε, PGD alone and the ensemble's worst case (ε = 0 is
    the clean accuracy of the attacked subset)."""
    out: dict[str, dict[str, Any]] = {}
    for norm, c in result["pgd"].items():
        for e, k in zip(c["eps"], c["survived"], strict=True):
            out[pgd_accuracy_name(norm, e)] = _rate(k, c["n"], level, method)
        if c.get("ensemble"):
            for e, k in zip(ensemble_eps(c), c["ensemble"]["survived"], strict=True):
                out[ensemble_accuracy_name(norm, e)] = _rate(k, c["n"], level, method)
    for norm, c in (result.get("blackbox") or {}).items():
        for e, k in zip(c["eps"], c["survived"], strict=True):
            out[blackbox_accuracy_name(norm, e)] = {**_rate(k, c["n"], level, method), "bound": "upper"}
    return out


def clean_intervals(result: Mapping[str, Any], level: float, method: str) -> dict[str, dict[str, Any]]:
    """Clean test accuracy, sensitivity, specificity (from the confusion counts) and AUC (DeLong)."""
    test = (result.get("clean") or {}).get("test")
    if not test:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, num, den in CLEAN_RATES:
        k = test["tp"] + test["tn"] if num == "tp+tn" else test[num]
        if test[den]:
            out[clean_metric_name("test", key)] = _rate(k, test[den], level, method)
    if test.get("auc_delong"):
        out[CLEAN_TEST_AUC] = {**test["auc_delong"], "unit": "AUC"}
        if test.get("auc_bootstrap"):
            out[CLEAN_TEST_AUC]["check"] = test["auc_bootstrap"]
    return out


def result_intervals(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every interval of one evaluation result, keyed by metric name (see the module docstring)."""
    level, method = interval_settings(result)
    return {**clean_intervals(result, level, method), **nps_intervals(result, level, method),
            **pgd_intervals(result, level, method)}
