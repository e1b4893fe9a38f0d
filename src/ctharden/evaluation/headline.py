"""Headline metrics: the flat scalar metrics of one evaluated model, named once.

The evaluation writes them (``metrics/robustness*.json`` ``<job>.headline`` and the MLflow run),
the gate's criteria read them, the pull-request check compares them and the registry tags them.
Every one of them is spelled by the functions below and nowhere else, so a renamed metric cannot
silently turn into a criterion that fails for want of a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The NPS attacks as the evaluation result names them, and their short names in metric names.
NPS_RESULT_KEYS = (("random_nps", "random"), ("optimized_nps", "optimized"))
CLEAN_TEST_AUC = "robust_clean_test_auc"  # == clean_metric_name("test", "auc")
SANITY_PASSED = "robust_sanity_passed"
#: What a report row, a gate row and an evaluation block say for a white-box number of a model
#: without input gradients (ONNX): the number does not exist, it was not forgotten.
NO_GRADIENTS = "not applicable: no gradients"


def clean_metric_name(split: str, key: str) -> str:
    """A clean metric (``accuracy``, ``sensitivity``, ``specificity``, ``auc``) on ``split``."""
    return f"robust_clean_{split}_{key}"


def san_rate_name(attack: str, split: str, mas: float) -> str:
    """SAN/N (%) of ``attack`` (``random``/``optimized``) on ``split`` at ``mas`` mAs."""
    return f"robust_{attack}_{split}_san_rate_mas{mas:g}"


def pgd_accuracy_name(norm: str, eps: float) -> str:
    """100-PGD robust accuracy at ``eps`` (model-input units) for ``norm`` (``linf``/``l2``)."""
    return f"robust_pgd_{norm}_acc_eps{eps:g}"


def ensemble_accuracy_name(norm: str, eps: float) -> str:
    """Robust accuracy at ``eps`` for ``norm``: the worst case per sample over the attack ensemble
    (PGD, APGD-CE, APGD-margin, Square; :mod:`ctharden.attacks.ensemble`) — what the gate reads."""
    return f"robust_ensemble_{norm}_acc_eps{eps:g}"


def blackbox_accuracy_name(norm: str, eps: float) -> str:
    """Accuracy at ``eps`` for ``norm`` under the black-box Square Attack alone: what a model without
    input gradients (ONNX) gets instead of the ensemble's worst case. An *upper* bound of its robust
    accuracy (a stronger attack can only break more), so the gate lets it fail a criterion, never pass."""
    return f"robust_blackbox_{norm}_acc_eps{eps:g}"


def ensemble_eps(curve: Mapping[str, Any]) -> list[float]:
    """The ε (ε = 0 first) at which a PGD curve's attack ensemble ran: its own ``eps`` list (the
    gated ε under ``robustness.pgd.ensemble_eps: gated``), or, in results written before that
    option existed, every ε of the curve; empty without an ensemble."""
    ens = curve.get("ensemble")
    if not ens:
        return []
    return [float(e) for e in ens.get("eps", curve["eps"])]


def pgd_area_name(norm: str) -> str:
    """Normalised area under the 100-PGD accuracy-vs-ε curve for ``norm``."""
    return f"robust_pgd_{norm}_auc"


def headline_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of one evaluation result (MLflow metric names; the gate reads the same)."""
    out: dict[str, float] = {}
    for key, short in NPS_RESULT_KEYS:
        for split, block in result[key].items():
            for lv in block["levels"].values():
                out[san_rate_name(short, split, lv["mas"])] = float(lv["san_rate"])
    for norm, c in result["pgd"].items():
        out[pgd_area_name(norm)] = float(c["auc"])
        for e, a in zip(c["eps"], c["accuracy"], strict=True):
            out[pgd_accuracy_name(norm, e)] = float(a)
        if c.get("ensemble"):
            for e, a in zip(ensemble_eps(c), c["ensemble"]["accuracy"], strict=True):
                out[ensemble_accuracy_name(norm, e)] = float(a)
    for norm, c in (result.get("blackbox") or {}).items():
        for e, a in zip(c["eps"], c["accuracy"], strict=True):
            out[blackbox_accuracy_name(norm, e)] = float(a)
    if result.get("sanity_passed") is not None:  # None: a black-box evaluation has no white-box checks
        out[SANITY_PASSED] = float(result["sanity_passed"])
    if result["clean"].get("test", {}).get("auc") is not None:
        out[CLEAN_TEST_AUC] = float(result["clean"]["test"]["auc"])
    return out
