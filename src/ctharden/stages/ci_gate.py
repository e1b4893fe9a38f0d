"""The pull-request check (``ctharden ci-gate --base REF``), what CI runs after ``dvc repro``:
the gate stage on the working tree plus a regression check of every gated metric against the
same model's metric committed at ``REF`` (see :mod:`ctharden.gate.pr_check`). Where both
revisions hold per-sample outcomes (``metrics/outcomes/``), a rate regresses only when the paired
exact McNemar test says the head is worse (``gate.champion.alpha``): a run on another CPU that
moves a sample or two is not a regression."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctharden.config.paths import evaluation_paths, gate_path, outcomes_path
from ctharden.core.errors import DataError
from ctharden.gate.champion import paired_regression, survived
from ctharden.gate.criteria import gate_markdown, gate_settings
from ctharden.gate.pr_check import committed_json, dvc_metrics_diff, regressions
from ctharden.stages.gate import gate_variants


def paired_rows(params: Mapping[str, Any], repo: Path, base: str, variant: str, job: str,
                rows: list[dict[str, Any]]) -> None:
    """Where both revisions have per-sample outcomes of ``job``, re-decide every per-sample rate's
    regression by the paired test (:func:`ctharden.gate.champion.paired_regression`) instead of
    the tolerance on two point values (in place: ``row["paired"]``, ``row["regressed"]``)."""
    path = outcomes_path(params, variant, job)
    old = committed_json(repo, base, path)
    if old is None or not path.is_file():
        return
    new = json.loads(path.read_text())
    gs = gate_settings(params, job)
    for r in rows:
        c = gs.criterion(r["criterion"])
        if survived(new, c) is None or survived(old, c) is None:
            continue
        try:
            r["paired"] = paired_regression(new, old, c, alpha=gs.alpha)
        except DataError as exc:  # e.g. another dataset: keep the tolerance rule, say why
            r["paired_note"] = str(exc)
            continue
        r["regressed"] = r["paired"]["regressed"]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def ci_gate(params: Mapping[str, Any], base: str, *, variant: str = "auto", repo: str | Path = ".") -> dict[str, Any]:
    """Run the gate and the regression check against ``base``; returns ``{"passed", "gated",
    "regressions": {variant: {job: rows}}, "failures": [...], "markdown"}``."""

    repo = Path(repo)
    gated = gate_variants(params, variant)
    failures = [f"{job} ({v}) fails the gate" for v, entries in gated.items() for job, r in entries.items()
                if not r["passed"]]
    compared: dict[str, dict[str, list[dict[str, Any]]]] = {}
    notes = []
    for v, entries in gated.items():
        path = evaluation_paths(params, v)["metrics"]
        base_metrics = committed_json(repo, base, path)
        head_metrics = json.loads(Path(path).read_text())
        compared[v] = {}
        for job in entries:
            if not base_metrics or job not in base_metrics:
                notes.append(f"{job} ({v}): no committed evaluation at {base}; regression check skipped")
                continue
            rows = regressions(params, job, base_metrics[job]["headline"], head_metrics[job]["headline"])
            paired_rows(params, repo, base, v, job, rows)
            compared[v][job] = rows
            failures += [f"{job} ({v}): {r['criterion']} regressed {r['base']:.4g} -> {r['head']:.4g} "
                         + (f"(paired McNemar p = {r['paired']['p_value']:.3g} < {r['paired']['alpha']:g})"
                            if r.get("paired") else f"(tolerance {r['tolerance']:g})")
                         for r in rows if r["regressed"]]
    md = ["## ctharden robustness gate", "", gate_markdown(gated), "", f"### Gated metrics vs `{base}`", "",
          "| job | model | criterion | base | head | worse by | test | verdict |",
          "|---|---|---|---|---|---|---|---|"]
    for v, jobs in compared.items():
        for job, rows in jobs.items():
            for r in rows:
                test = (f"paired: {r['paired']['new_only']} only head / {r['paired']['old_only']} only base "
                        f"of {r['paired']['n']}, McNemar p = {r['paired']['p_value']:.3g}"
                        if r.get("paired") else f"tolerance {r['tolerance']:g}")
                md.append(f"| {job} | {v} | `{r['criterion']}` | {_fmt(r['base'])} | {_fmt(r['head'])} | "
                          f"{_fmt(r['worse_by'])} | {test} | "
                          f"{'**REGRESSED**' if r['regressed'] else 'ok'} |")
    md += [f"- {n}" for n in notes]
    md += ["", f"### `dvc metrics diff {base}`", "", dvc_metrics_diff(repo, base), "",
           f"**{'PASSED' if not failures else 'FAILED'}**" + ("" if not failures else ": " + "; ".join(failures)),
           f"\n(gate record: `{gate_path(params)}`)"]
    return {"passed": not failures, "gated": gated, "regressions": compared, "failures": failures,
            "markdown": "\n".join(md) + "\n"}
