"""Sample sizes per gate criterion of a job: what ``ctharden gate plan`` prints and what the
evaluation uses where a sample cap is ``plan`` (``robustness.*.max_samples: plan``).

For each criterion the *expected* rate is, in this order: one the user states
(``--expected NAME=VALUE``), the last evaluation's point value, or the policy's planning
assumption ``gate.plan.margin`` on the good side of the threshold (a model that is ``margin``
better than required). :func:`ctharden.gate.planner.samples_needed` then gives the ``n`` that
decides the criterion with probability ``gate.plan.power`` at the gate's confidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctharden.gate.criteria import Criterion, GateSettings
from ctharden.gate.planner import auc_samples_needed, samples_needed


def planning_rate(c: Criterion, settings: GateSettings) -> float:
    """The policy's planning assumption for ``c``: the threshold moved by ``gate.plan.margin`` to
    the good side (metric units), clipped to the metric's range."""
    margin = float(settings.margin.get(c.kind, 0.0))
    top = 100.0 if c.kind == "san_rate" else 1.0
    rate = c.threshold + margin if c.op == ">=" else c.threshold - margin
    return min(max(rate, 0.0), top)


def plan_criterion(c: Criterion, settings: GateSettings, expected: float,
                   observed: Mapping[str, Any] | None = None) -> int | None:
    """Samples that decide ``c`` for a model whose true value is ``expected`` (metric units).
    AUC criteria need an observed DeLong standard error (``observed``: the evaluation's interval
    entry) to extrapolate from; without one they return None."""
    if c.kind == "sanity":
        return None
    if c.kind == "clean_auc":
        if not observed or observed.get("se") is None:
            return None
        return auc_samples_needed(c.threshold, expected, float(observed["se"]), int(observed["n"]),
                                  confidence=settings.confidence, power=settings.power)
    return samples_needed(c.op, c.threshold / c.scale, min(max(expected / c.scale, 0.0), 1.0),
                          confidence=settings.confidence, power=settings.power, method=settings.method)


def plan_job(settings: GateSettings, *, intervals: Mapping[str, Mapping[str, Any]] | None = None,
             expected: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per criterion: threshold, the expected value and where it came from, the samples
    that decide it, and the last evaluation's ``n`` (from its ``intervals``) when given."""
    rows = []
    for c in settings.criteria:
        if c.kind == "sanity":
            continue
        seen = (intervals or {}).get(c.metric)
        if expected and c.name in expected:
            rate, source = float(expected[c.name]), "given"
        elif seen and seen.get("point") is not None:
            rate, source = float(seen["point"]), "last evaluation"
        else:
            rate, source = planning_rate(c, settings), f"policy margin {settings.margin.get(c.kind, 0):g}"
        rows.append({"criterion": c.name, "metric": c.metric, "op": c.op, "threshold": c.threshold, "kind": c.kind,
                     "expected": rate, "expected_from": source, "needed": plan_criterion(c, settings, rate, seen),
                     "evaluated_n": seen.get("n") if seen else None, "confidence": settings.confidence,
                     "power": settings.power})
    return rows


def planned_cap(settings: GateSettings, attack: str) -> int | None:
    """The sample cap ``plan`` means for an attack's subset: the largest planner ``n`` over the
    job's criteria on that attack (``optimized``: SAN/N under the optimised NPS attack; ``pgd``:
    robust accuracy) at the policy's planning assumption; None (no cap: every sample) when the job
    gates nothing on it."""
    want = {"optimized": ("san_rate", "_optimized_"), "pgd": ("robust_accuracy", "_pgd_")}[attack]
    caps = [plan_criterion(c, settings, planning_rate(c, settings)) for c in settings.criteria
            if c.kind == want[0] and want[1] in c.metric]
    known = [n for n in caps if n is not None]
    return max(known) if known else None


def plan_markdown(job: str, rows: list[dict[str, Any]]) -> str:
    """The plan as a markdown table."""
    lines = [f"### Sample plan: {job}", "", "| criterion | threshold | expected | from | samples needed | last n |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        needed = "—" if r["needed"] is None else str(r["needed"])
        lines.append(f"| `{r['criterion']}` | {r['op']} {r['threshold']:g} | {r['expected']:.4g} "
                     f"| {r['expected_from']} "
                     f"| {needed} | {'' if r['evaluated_n'] is None else r['evaluated_n']} |")
    if rows:
        lines.append(f"\n{int(100 * rows[0]['confidence'])} % one-sided bounds; a model at the expected value is "
                     f"decided with probability {rows[0]['power']:g}.")
    return "\n".join(lines)
