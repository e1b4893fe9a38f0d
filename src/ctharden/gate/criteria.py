"""The robustness gate: does an evaluated model meet the thresholds in ``params.yaml``?

``gate.defaults`` deep-merged with ``gate.jobs.<job>`` lists the criteria. Each one names a
headline metric of the evaluation (:mod:`ctharden.evaluation.headline`, test split):

- ``min_clean_auc``: clean test AUC ``>=`` the threshold;
- ``max_san_rate.{random,optimized}.<mAs>``: SAN/N (% of test samples whose fp32 label flips under
  the NPS attack at that dose) ``<=`` the threshold;
- ``min_robust_accuracy.{linf,l2}.<ε>``: robust accuracy at ε (model-input units) ``>=``: the share
  of attacked test samples that survive *every* member of the attack ensemble (PGD, APGD-CE,
  APGD-margin, Square; AutoAttack's reporting rule), criterion ``robust_<norm>_acc_eps<ε>``;
- ``sanity``: every sanity check of the evaluation passed (budget, convergence, and gradient
  masking: a sample the black-box Square Attack breaks but no gradient attack does fails it).

A threshold of ``null`` disables that criterion. A criterion whose metric the evaluation did not
measure (e.g. an ε not in the PGD grid) fails: the gate never passes on a number it has not seen.

**A model without input gradients** (ONNX; ``check(..., white_box=False)``) cannot be measured by
the white-box attacks. Its robust-accuracy criteria read the Square-only accuracy, an upper bound
of the robust accuracy: it fails the criterion when even its upper bound misses the threshold and
is otherwise inconclusive (never a pass: a stronger attack might break more). The optimised-NPS
SAN/N and ``sanity`` criteria are inconclusive with the note "not applicable: no gradients". So a
black-box model can fail the gate or pass a policy without white-box criteria, but never pass one
on numbers that only a gradient attack could establish.

**Decided on confidence bounds, not point values.** Every rate comes with its count ``k`` of ``n``
samples (the evaluation's ``intervals``), the AUC with its DeLong standard error. At the gate's
``confidence`` (default 95 %, one-sided) a ``>=`` criterion *passes* when the lower bound clears
the threshold, *fails* when the upper bound is below it and is *inconclusive* otherwise; ``<=``
criteria (SAN/N) mirror it. Rates use exact Clopper–Pearson bounds (``gate.method: wilson`` for
Wilson's). A model's verdict is ``fail`` if any criterion fails, else ``inconclusive`` if any is,
else ``pass``; only ``pass`` registers. An inconclusive criterion states how many samples would
decide it at the observed rate (:mod:`ctharden.gate.planner`). So a lucky draw on 16 samples
cannot pass a criterion that 16 samples cannot decide, and a model at the threshold passes with
probability at most 5 %.

>>> verdict = check(headline, gate_settings(params, "nodule3d"), result["intervals"])
>>> verdict["verdict"], verdict["failed"], verdict["inconclusive"]

The gate stage (:mod:`ctharden.stages.gate`) applies it to every evaluated model and writes
``metrics/gate.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ctharden.config import choices
from ctharden.config.params import deep_merge, section
from ctharden.config.schema import GateJob, job_path, validate_section
from ctharden.core.errors import ConfigError, DataError
from ctharden.evaluation.headline import (
    CLEAN_TEST_AUC,
    NO_GRADIENTS,
    SANITY_PASSED,
    blackbox_accuracy_name,
    ensemble_accuracy_name,
    san_rate_name,
)
from ctharden.evaluation.intervals import proportion_interval, z_value
from ctharden.gate.planner import auc_samples_needed, samples_needed
from ctharden.reporting.report import bound_text

KINDS = choices.GATE_KINDS  # which regression tolerance applies to a criterion
NPS_ATTACKS = choices.NPS_ATTACKS
NORMS = choices.NORMS
NORM_LABEL = {"linf": "L∞", "l2": "L2"}


@dataclass(frozen=True)
class Criterion:
    """One gated quantity: ``value(metric) op threshold`` with ``op`` ``">="`` or ``"<="``."""

    name: str  # e.g. "robust_linf_acc_eps0.01"
    metric: str  # headline metric, e.g. "robust_ensemble_linf_acc_eps0.01"
    op: str
    threshold: float
    kind: str  # one of KINDS: which regression tolerance applies
    description: str
    norm: str | None = None  # robust accuracy: the attack norm ...
    eps: float | None = None  # ... and ε (model-input units)
    white_box: bool = False  # measuring it needs input gradients (optimised NPS, robust accuracy, sanity)

    def passes(self, value: float | None) -> bool:
        """Whether a point value meets the threshold (the champion and regression rules use it;
        the gate decides on bounds, :meth:`decide`)."""
        if value is None or not math.isfinite(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def worse_by(self, old: float, new: float) -> float:
        """How much worse ``new`` is than ``old`` in this criterion's direction (> 0: worse)."""
        return old - new if self.op == ">=" else new - old

    @property
    def scale(self) -> float:
        """Metric units per share: SAN/N is in %, every other rate a share (AUC: itself)."""
        return 100.0 if self.kind == "san_rate" else 1.0

    def bounds(self, evidence: Mapping[str, Any], confidence: float, method: str) -> tuple[float, float]:
        """One-sided ``(lower, upper)`` confidence bounds of the metric at ``confidence``, in the
        metric's units: from ``k`` of ``n`` (rates, by ``method``) or from DeLong's ``se`` (AUC).

        Raises:
            DataError: the evidence has neither (an evaluation written before intervals existed).
        """
        if self.kind == "clean_auc":
            se, point = evidence.get("se"), evidence.get("point")
            if se is None or point is None:
                raise DataError(f"{self.name}: the evaluation recorded no DeLong standard error; re-run it")
            z = float(z_value(confidence, "lower"))
            return max(0.0, float(point) - z * float(se)), min(1.0, float(point) + z * float(se))
        k, n = evidence.get("k"), evidence.get("n")
        if k is None or n is None:
            raise DataError(f"{self.name}: the evaluation recorded no sample count (k of n); re-run it")
        lo = proportion_interval(int(k), int(n), level=confidence, method=method, sided="lower").lower
        hi = proportion_interval(int(k), int(n), level=confidence, method=method, sided="upper").upper
        return lo * self.scale, hi * self.scale

    def decide(self, lower: float, upper: float) -> str:
        """``pass`` when the whole one-sided bound is on the good side of the threshold, ``fail``
        when it is wholly on the bad side, ``inconclusive`` otherwise."""
        if self.op == ">=":
            return "pass" if lower >= self.threshold else "fail" if upper < self.threshold else "inconclusive"
        return "pass" if upper <= self.threshold else "fail" if lower > self.threshold else "inconclusive"


@dataclass(frozen=True)
class GateSettings:
    """A job's criteria, the primary criterion (champion promotion) and the tolerances."""

    criteria: tuple[Criterion, ...]
    primary: str
    alpha: float  # champion promotion and PR regressions: one-sided exact McNemar at this level
    max_clean_auc_drop: float
    regression: dict[str, float]
    model_name: str
    confidence: float = 0.95  # one-sided confidence of every bound the gate decides on
    method: str = "clopper-pearson"  # rates' bounds: clopper-pearson | wilson
    power: float = 0.8  # planner: chance to decide a model `margin` better than the threshold
    margin: Mapping[str, float] = field(default_factory=dict)  # planner: per criterion kind

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
                                 "san_rate", f"SAN/N (%) under {attack} NPS noise at {mas:g} mAs",
                                 white_box=attack == "optimized"))
    acc = {str(k): v for k, v in (cfg.min_robust_accuracy or {}).items()}
    for norm in NORMS:
        for eps, t in _levels(acc.get(norm)):
            out.append(Criterion(f"robust_{norm}_acc_eps{eps:g}", ensemble_accuracy_name(norm, eps), ">=", t,
                                 "robust_accuracy",
                                 f"{NORM_LABEL[norm]} robust accuracy at ε={eps:g} (worst case over the attacks)",
                                 norm=norm, eps=float(eps), white_box=True))
    if cfg.sanity:
        out.append(Criterion("sanity", SANITY_PASSED, ">=", 1.0, "sanity", "all evaluation sanity checks pass",
                             white_box=True))
    return out


def gated_eps(settings: GateSettings) -> dict[str, list[float]]:
    """Per norm, the ε of the robust-accuracy criteria (where the evaluation runs the whole attack
    ensemble under ``robustness.pgd.ensemble_eps: gated``)."""
    out: dict[str, list[float]] = {}
    for c in settings.criteria:
        if c.kind == "robust_accuracy" and c.norm is not None and c.eps is not None:
            out.setdefault(c.norm, []).append(c.eps)
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
        alpha=cfg.champion.alpha, max_clean_auc_drop=cfg.champion.max_clean_auc_drop,
        regression={k: float(regression.get(k, 0.0)) for k in KINDS},
        model_name=name, confidence=cfg.confidence, method=cfg.method, power=cfg.plan.power,
        margin={str(k): float(v) for k, v in cfg.plan.margin.items()},
    )


def _samples_to_decide(c: Criterion, point: float, evidence: Mapping[str, Any], settings: GateSettings
                       ) -> int | None:
    """Samples that would decide an inconclusive criterion if the observed rate were the true one."""
    if c.kind == "clean_auc":
        return auc_samples_needed(c.threshold, point, float(evidence.get("se") or 0.0), int(evidence.get("n") or 0),
                                  confidence=settings.confidence, power=settings.power)
    rate, t = point / c.scale, c.threshold / c.scale
    if not (0.0 <= rate <= 1.0 and 0.0 <= t <= 1.0):
        return None
    return samples_needed(c.op, t, rate, confidence=settings.confidence, power=settings.power,
                          method=settings.method)


def decide_criterion(c: Criterion, value: float | None, evidence: Mapping[str, Any] | None,
                     settings: GateSettings) -> dict[str, Any]:
    """One criterion's gate row: point, one-sided bounds, k, n, decision (and for an inconclusive
    one the samples that would decide it at the observed rate).

    A metric the evaluation did not measure fails; so does a rate without its sample count (the
    gate never decides on a number whose uncertainty it cannot state). ``sanity`` is pass/fail.
    """
    row: dict[str, Any] = {"metric": c.metric, "description": c.description, "op": c.op, "threshold": c.threshold,
                           "value": value, "kind": c.kind, "lower": None, "upper": None, "k": None, "n": None,
                           "confidence": settings.confidence, "method": None, "samples_to_decide": None}
    if value is None or not math.isfinite(value):
        return {**row, "decision": "fail", "passed": False, "note": "not measured"}
    if c.kind == "sanity":
        ok = c.passes(value)
        return {**row, "decision": "pass" if ok else "fail", "passed": ok, "note": None}
    ev = dict(evidence or {})
    try:
        lower, upper = c.bounds(ev, settings.confidence, settings.method)
    except DataError as exc:
        return {**row, "decision": "fail", "passed": False, "note": str(exc)}
    decision = c.decide(lower, upper)
    row.update(lower=lower, upper=upper, k=ev.get("k"), n=ev.get("n"),
               method="delong" if c.kind == "clean_auc" else settings.method)
    if decision == "inconclusive":
        row["samples_to_decide"] = _samples_to_decide(c, value, ev, settings)
    return {**row, "decision": decision, "passed": decision == "pass", "note": None}


#: The note of a robust-accuracy criterion that a black-box attack alone could not fail.
UPPER_BOUND_NOTE = ("black-box attack only (no gradients): this accuracy is an upper bound of the robust "
                    "accuracy, so it can fail the criterion but not pass it")


def decide_black_box(c: Criterion, headline: Mapping[str, float], evidence: Mapping[str, Mapping[str, Any]],
                     settings: GateSettings) -> dict[str, Any]:
    """A white-box criterion's row for a model without input gradients (see the module docstring):
    robust accuracy from the Square-only accuracy (fail or inconclusive), anything else
    inconclusive and :data:`~ctharden.evaluation.headline.NO_GRADIENTS`."""
    if c.kind == "robust_accuracy" and c.norm is not None and c.eps is not None:
        metric = blackbox_accuracy_name(c.norm, c.eps)
        raw = headline.get(metric)
        if raw is not None:
            row = decide_criterion(replace(c, metric=metric), float(raw), evidence.get(metric), settings)
            if row["decision"] == "fail":
                return row
            return {**row, "decision": "inconclusive", "passed": False, "samples_to_decide": None,
                    "note": UPPER_BOUND_NOTE}
    row = decide_criterion(c, None, None, settings)
    return {**row, "decision": "inconclusive", "passed": False, "note": NO_GRADIENTS}


def check(headline: Mapping[str, float], settings: GateSettings,
          evidence: Mapping[str, Mapping[str, Any]] | None = None, *, white_box: bool = True) -> dict[str, Any]:
    """Decide every criterion on one model's headline metrics and their evidence (the evaluation's
    ``intervals``: ``{metric: {point, k, n, se, ...}}``). ``white_box=False``: the model has no
    input gradients; its white-box criteria are decided by :func:`decide_black_box`.

    Returns ``{"verdict": pass|fail|inconclusive, "passed", "failed": [names], "inconclusive":
    [names], "criteria": {name: row}, "primary": {criterion, metric, value}, "confidence",
    "method"}`` (rows from :func:`decide_criterion`; ``"white_box": False`` added for a model
    without gradients). The verdict is ``fail`` when any criterion
    fails, else ``inconclusive`` when any is, else ``pass``; ``passed`` is ``verdict == "pass"``.
    """
    rows: dict[str, Any] = {}
    for c in settings.criteria:
        if c.white_box and not white_box:
            rows[c.name] = decide_black_box(c, headline, evidence or {}, settings)
            continue
        raw = headline.get(c.metric)
        value = float(raw) if raw is not None else None
        rows[c.name] = decide_criterion(c, value, (evidence or {}).get(c.metric), settings)
    failed = [n for n, r in rows.items() if r["decision"] == "fail"]
    open_ = [n for n, r in rows.items() if r["decision"] == "inconclusive"]
    verdict = "fail" if failed else "inconclusive" if open_ else "pass"
    p = rows[settings.primary]
    return {"verdict": verdict, "passed": verdict == "pass", "failed": failed, "inconclusive": open_,
            "criteria": rows, "confidence": settings.confidence, "method": settings.method,
            "primary": {"criterion": settings.primary, "metric": p["metric"], "value": p["value"]},
            **({} if white_box else {"white_box": False})}


def _fmt_value(r: Mapping[str, Any]) -> str:
    if r["value"] is None:
        return "n/a" if r.get("note") == NO_GRADIENTS else "not measured"
    return f"{r['value']:.4g}"


def _fmt_n(r: Mapping[str, Any]) -> str:
    if r.get("n") is None:
        return ""
    return f"{r['k']}/{r['n']}" if r.get("k") is not None else f"n={r['n']}"


def reasons(verdict: Mapping[str, Any]) -> str:
    """One line naming every failed and inconclusive criterion with its value, bound and threshold."""
    parts = []
    for name in [*verdict["failed"], *verdict.get("inconclusive", [])]:
        r = verdict["criteria"][name]
        what = r.get("decision", "fail")
        bound = f", {int(100 * r['confidence'])} % bound {bound_text(r)}" if r.get("lower") is not None else ""
        n = f" on {_fmt_n(r)}" if r.get("n") is not None else ""
        more = f"; ~{r['samples_to_decide']} samples would decide it" if r.get("samples_to_decide") else ""
        note = f" ({r['note']})" if r.get("note") and r["note"] != "not measured" else ""
        parts.append(f"{name} {what}: {_fmt_value(r)}{n}{bound} (needs {r['op']} {r['threshold']:g}){more}{note}")
    return "; ".join(parts) or "all criteria passed"


#: A verdict as a word (tags, messages): ``passed`` / ``failed`` / ``inconclusive``.
VERDICT_WORD = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive"}
DECISION_MD = {"pass": "pass", "fail": "**FAIL**", "inconclusive": "*inconclusive*"}
VERDICT_MD = {"pass": "**PASSED**", "fail": "**FAILED**", "inconclusive": "**INCONCLUSIVE**"}


def gate_markdown(gated: Mapping[str, Mapping[str, Any]]) -> str:
    """The gate table (markdown): one row per criterion and model, with the point value, the
    one-sided bound the decision rests on, k/n and the decision."""
    lines = ["| job | model | criterion | value | bound | k/n | threshold | decision |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, entries in gated.items():
        for job, rec in entries.items():
            for name, r in rec["criteria"].items():
                extra = f" (~{r['samples_to_decide']} samples decide it)" if r.get("samples_to_decide") else ""
                lines.append(f"| {job} | {variant} | {r['description']} (`{name}`) | {_fmt_value(r)} | "
                             f"{bound_text(r)} | {_fmt_n(r)} | {r['op']} {r['threshold']:g} | "
                             f"{DECISION_MD[r.get('decision', 'pass' if r['passed'] else 'fail')]}{extra} |")
            conf = rec.get("confidence")
            bounds = f" ({int(100 * conf)} % one-sided bounds)" if conf else ""
            lines.append(f"| {job} | {variant} | **gate**{bounds}"
                         + f" | | | | | {VERDICT_MD[verdict_of(rec)]} |")
    return "\n".join(lines)


def verdict_of(rec: Mapping[str, Any]) -> str:
    """A gate record's verdict (records written before the tri-state gate: pass/fail)."""
    return str(rec.get("verdict") or ("pass" if rec["passed"] else "fail"))


def failures(gated: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``"job (variant) verdict: reasons"`` for every gated model that did not pass."""
    return [f"{job} ({variant}) {verdict_of(rec)}: {reasons(rec)}" for variant, entries in gated.items()
            for job, rec in entries.items() if not rec["passed"]]
