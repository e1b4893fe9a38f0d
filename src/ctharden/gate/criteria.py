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

from ctharden.config import choices
from ctharden.config.params import deep_merge, section
from ctharden.config.schema import GateJob, job_path, validate_section
from ctharden.core.errors import ConfigError
from ctharden.evaluation.headline import CLEAN_TEST_AUC, SANITY_PASSED, pgd_accuracy_name, san_rate_name

KINDS = choices.GATE_KINDS  # which regression tolerance applies to a criterion
NPS_ATTACKS = choices.NPS_ATTACKS
NORMS = choices.NORMS
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


def _levels(table: Mapping[float, float | None] | None) -> list[tuple[float, float]]:
    """``{level: threshold}`` -> sorted ``(level, threshold)``; null thresholds are dropped."""
    return sorted((k, v) for k, v in (table or {}).items() if v is not None)


def _criteria(cfg: GateJob) -> list[Criterion]:
    """The criteria a job's validated gate settings give, in a fixed order."""
    out: list[Criterion] = []
    if cfg.min_clean_auc is not None:
        out.append(Criterion("clean_auc", CLEAN_TEST_AUC, ">=", cfg.min_clean_auc, "clean_auc", "clean test AUC"))
    san = {str(k): v for k, v in (cfg.max_san_rate or {}).items()}
    for attack in NPS_ATTACKS:
        for mas, t in _levels(san.get(attack)):
            out.append(Criterion(f"{attack}_san_mas{mas:g}", san_rate_name(attack, "test", mas), "<=", t,
                                 "san_rate", f"SAN/N (%) under {attack} NPS noise at {mas:g} mAs"))
    acc = {str(k): v for k, v in (cfg.min_robust_accuracy or {}).items()}
    for norm in NORMS:
        for eps, t in _levels(acc.get(norm)):
            out.append(Criterion(f"pgd_{norm}_acc_eps{eps:g}", pgd_accuracy_name(norm, eps), ">=", t,
                                 "robust_accuracy", f"100-PGD {NORM_LABEL[norm]} robust accuracy at ε={eps:g}"))
    if cfg.sanity:
        out.append(Criterion("sanity", SANITY_PASSED, ">=", 1.0, "sanity", "all evaluation sanity checks pass"))
    return out


def gate_settings(params: Mapping[str, Any], job: str) -> GateSettings:
    """``gate.defaults`` deep-merged with ``gate.jobs.<job>``, validated by the schema (:class:`GateJob`);
    the job must have criteria and its ``primary`` must be one of them (not ``sanity``)."""
    g = section(params, "gate")
    cfg = validate_section(GateJob, deep_merge(g.get("defaults") or {}, (g.get("jobs") or {}).get(job) or {}),
                           job_path(g, "gate", job))
    criteria = tuple(_criteria(cfg))
    if not criteria:
        raise ConfigError(f"gate: job {job!r} has no criteria (every threshold is null)")
    names = [c.name for c in criteria]
    primary = cfg.primary
    if primary is None or primary not in names:
        raise ConfigError(f"gate.primary for {job!r} must be one of its criteria {names}, got {primary!r}")
    if next(c for c in criteria if c.name == primary).kind == "sanity":
        raise ConfigError("gate.primary cannot be the sanity criterion (it has no magnitude)")
    name = cfg.model_name.format(job=job)
    if not name or "/" in name or "@" in name:
        raise ConfigError(f"gate.model_name {name!r} is not a valid registered-model name")
    regression = {str(k): v for k, v in (cfg.regression or {}).items()}
    return GateSettings(
        criteria=criteria, primary=primary,
        min_improvement=cfg.champion.min_improvement, max_clean_auc_drop=cfg.champion.max_clean_auc_drop,
        regression={k: float(regression.get(k, 0.0)) for k in KINDS},
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
