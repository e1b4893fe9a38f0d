"""The robustness gate: does an evaluated model meet the thresholds in ``params.yaml``?

``gate.defaults`` deep-merged with ``gate.jobs.<job>`` lists the criteria. Each one names a
headline metric of the evaluation (:mod:`ctharden.evaluation.headline`, test split):

- ``min_clean_auc``: clean test AUC ``>=`` the threshold;
- ``max_san_rate.{random,optimized}.<mAs>``: SAN/N (% of test samples whose fp32 label flips under
  the NPS attack at that dose) ``<=`` the threshold;
- ``min_robust_accuracy.{linf,l2}.<ε>``: 100-PGD robust accuracy at ε (model-input units) ``>=``;
- ``sanity``: every sanity check of the evaluation passed (gradient masking, budget, convergence).

A threshold of ``null`` disables that criterion. A criterion whose metric the evaluation did not
measure (e.g. an ε not in the PGD grid) fails: the gate never passes on a number it has not seen.

>>> verdict = check(headline, gate_settings(params, "nodule3d"))
>>> verdict["passed"], verdict["failed"]

The gate stage (:mod:`ctharden.stages.gate`) applies it to every evaluated model and writes
``metrics/gate.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ctharden.config.params import deep_merge, section
from ctharden.core.errors import ConfigError
from ctharden.evaluation.headline import CLEAN_TEST_AUC, SANITY_PASSED, pgd_accuracy_name, san_rate_name

KINDS = ("clean_auc", "san_rate", "robust_accuracy", "sanity")
NPS_ATTACKS = ("random", "optimized")
NORMS = ("linf", "l2")
NORM_LABEL = {"linf": "L∞", "l2": "L2"}


@dataclass(frozen=True)
class Criterion:
    """One gated quantity: ``value(metric) op threshold`` with ``op`` ``">="`` or ``"<="``."""

    name: str  # e.g. "pgd_linf_acc_eps0.01"
    metric: str  # headline metric, e.g. "robust_pgd_linf_acc_eps0.01"
    op: str
    threshold: float
    kind: str  # one of KINDS: which regression tolerance applies
    description: str

    def passes(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def worse_by(self, old: float, new: float) -> float:
        """How much worse ``new`` is than ``old`` in this criterion's direction (> 0: worse)."""
        return old - new if self.op == ">=" else new - old


@dataclass(frozen=True)
class GateSettings:
    """A job's criteria, the primary criterion (champion promotion) and the tolerances."""

    criteria: tuple[Criterion, ...]
    primary: str
    min_improvement: float
    max_clean_auc_drop: float
    regression: dict[str, float]
    model_name: str

    def criterion(self, name: str) -> Criterion:
        for c in self.criteria:
            if c.name == name:
                return c
        raise ConfigError(f"gate: no criterion {name!r} (configured: {', '.join(c.name for c in self.criteria)})")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"gate.{where} must be a number, got {value!r}")
    return float(value)


def _levels(where: str, table: Any) -> list[tuple[float, float]]:
    """``{level: threshold}`` -> sorted ``(level, threshold)``; null thresholds are dropped."""
    if table is None:
        return []
    if not isinstance(table, Mapping):
        raise ConfigError(f"gate.{where} must map a level to a threshold, got {table!r}")
    return sorted((_number(f"{where} (level)", k), _number(f"{where}.{k}", v)) for k, v in table.items()
                  if v is not None)


def _criteria(cfg: Mapping[str, Any]) -> list[Criterion]:
    out: list[Criterion] = []
    if cfg.get("min_clean_auc") is not None:
        t = _number("min_clean_auc", cfg["min_clean_auc"])
        out.append(Criterion("clean_auc", CLEAN_TEST_AUC, ">=", t, "clean_auc", "clean test AUC"))
    san = cfg.get("max_san_rate") or {}
    unknown = set(san) - set(NPS_ATTACKS)
    if unknown:
        raise ConfigError(f"gate.max_san_rate: unknown attacks {sorted(unknown)} (use {list(NPS_ATTACKS)})")
    for attack in NPS_ATTACKS:
        for mas, t in _levels(f"max_san_rate.{attack}", san.get(attack)):
            out.append(Criterion(f"{attack}_san_mas{mas:g}", san_rate_name(attack, "test", mas), "<=", t,
                                 "san_rate", f"SAN/N (%) under {attack} NPS noise at {mas:g} mAs"))
    acc = cfg.get("min_robust_accuracy") or {}
    unknown = set(acc) - set(NORMS)
    if unknown:
        raise ConfigError(f"gate.min_robust_accuracy: unknown norms {sorted(unknown)} (use {list(NORMS)})")
    for norm in NORMS:
        for eps, t in _levels(f"min_robust_accuracy.{norm}", acc.get(norm)):
            out.append(Criterion(f"pgd_{norm}_acc_eps{eps:g}", pgd_accuracy_name(norm, eps), ">=", t,
                                 "robust_accuracy", f"100-PGD {NORM_LABEL[norm]} robust accuracy at ε={eps:g}"))
    sanity = cfg.get("sanity", True)
    if not isinstance(sanity, bool):
        raise ConfigError(f"gate.sanity must be true or false, got {sanity!r}")
    if sanity:
        out.append(Criterion("sanity", SANITY_PASSED, ">=", 1.0, "sanity", "all evaluation sanity checks pass"))
    return out


def gate_settings(params: Mapping[str, Any], job: str) -> GateSettings:
    """``gate.defaults`` deep-merged with ``gate.jobs.<job>``, validated."""
    g = section(params, "gate")
    cfg = deep_merge(g.get("defaults") or {}, (g.get("jobs") or {}).get(job) or {})
    criteria = tuple(_criteria(cfg))
    if not criteria:
        raise ConfigError(f"gate: job {job!r} has no criteria (every threshold is null)")
    names = [c.name for c in criteria]
    primary = cfg.get("primary")
    if primary not in names:
        raise ConfigError(f"gate.primary for {job!r} must be one of its criteria {names}, got {primary!r}")
    if next(c for c in criteria if c.name == primary).kind == "sanity":
        raise ConfigError("gate.primary cannot be the sanity criterion (it has no magnitude)")
    champion = cfg.get("champion") or {}
    regression = cfg.get("regression") or {}
    unknown = set(regression) - set(KINDS)
    if unknown:
        raise ConfigError(f"gate.regression: unknown kinds {sorted(unknown)} (use {list(KINDS)})")
    name = str(cfg.get("model_name", "ctharden-{job}")).format(job=job)
    if not name or "/" in name or "@" in name:
        raise ConfigError(f"gate.model_name {name!r} is not a valid registered-model name")
    return GateSettings(
        criteria=criteria, primary=primary,
        min_improvement=_number("champion.min_improvement", champion.get("min_improvement", 0.0)),
        max_clean_auc_drop=_number("champion.max_clean_auc_drop", champion.get("max_clean_auc_drop", 0.02)),
        regression={k: _number(f"regression.{k}", regression.get(k, 0.0)) for k in KINDS},
        model_name=name,
    )


def check(headline: Mapping[str, float], settings: GateSettings) -> dict[str, Any]:
    """Decide every criterion on one model's headline metrics.

    Returns ``{"passed", "failed": [names], "criteria": {name: {metric, description, op,
    threshold, value, passed}}, "primary": {criterion, metric, value}}``; ``value`` is None when
    the evaluation did not measure the metric (which fails the criterion).
    """
    rows: dict[str, Any] = {}
    for c in settings.criteria:
        raw = headline.get(c.metric)
        value = float(raw) if raw is not None else None
        rows[c.name] = {"metric": c.metric, "description": c.description, "op": c.op, "threshold": c.threshold,
                        "value": value, "passed": c.passes(value), "kind": c.kind}
    failed = [n for n, r in rows.items() if not r["passed"]]
    p = rows[settings.primary]
    return {"passed": not failed, "failed": failed, "criteria": rows,
            "primary": {"criterion": settings.primary, "metric": p["metric"], "value": p["value"]}}


def reasons(verdict: Mapping[str, Any]) -> str:
    """One line naming every failed criterion with its value and threshold."""
    parts = []
    for name in verdict["failed"]:
        r = verdict["criteria"][name]
        value = "not measured" if r["value"] is None else f"{r['value']:.4g}"
        parts.append(f"{name} = {value} (needs {r['op']} {r['threshold']:g})")
    return "; ".join(parts) or "all criteria passed"


def gate_markdown(gated: Mapping[str, Mapping[str, Any]]) -> str:
    """The gate table (markdown): one row per criterion and model."""
    lines = ["| job | model | criterion | value | threshold | verdict |", "|---|---|---|---|---|---|"]
    for variant, entries in gated.items():
        for job, rec in entries.items():
            for name, r in rec["criteria"].items():
                value = "not measured" if r["value"] is None else f"{r['value']:.4g}"
                lines.append(f"| {job} | {variant} | {r['description']} (`{name}`) | {value} | {r['op']} "
                             f"{r['threshold']:g} | {'pass' if r['passed'] else '**FAIL**'} |")
            lines.append(f"| {job} | {variant} | **gate** | | | {'**PASSED**' if rec['passed'] else '**FAILED**'} |")
    return "\n".join(lines)


def failures(gated: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``"job (variant): reasons"`` for every gated model that failed."""
    return [f"{job} ({variant}): {reasons(rec)}" for variant, entries in gated.items()
            for job, rec in entries.items() if not rec["passed"]]
