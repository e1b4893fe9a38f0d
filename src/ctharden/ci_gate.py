"""The pull-request robustness gate (``ctharden ci-gate --base REF``), what CI runs after ``dvc repro``.

1. Gate the working tree's evaluation (:func:`ctharden.evaluate.gate.run_gate`, default: the
   hardened models when evaluated, else the baselines) and write ``metrics/gate.json``.
2. Compare every gated metric with the same model's metric committed at ``REF`` (``git show
   REF:metrics/...``): a metric that got worse by more than ``gate.regression.<kind>`` is a
   regression, even when it still clears its threshold.
3. Render a markdown summary: the gate table, the regressions table and ``dvc metrics diff REF``
   (appended to ``--summary``, e.g. ``$GITHUB_STEP_SUMMARY``).

The check fails (``GateFailed``, exit 1) when a gated model fails the gate or any metric regresses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctharden.errors import DataError
from ctharden.evaluate.gate import gate_markdown, gate_path, gate_settings, run_gate


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise DataError(f"git is needed for ci-gate: {exc}") from None


def committed_json(repo: Path, ref: str, path: Path) -> dict[str, Any] | None:
    """The JSON file ``path`` as committed at ``ref`` (None when it did not exist there)."""
    if _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        raise DataError(f"base revision {ref!r} not found in {repo} (fetch it, e.g. `git fetch origin {ref}`)")
    rel = Path(path).resolve().relative_to(repo.resolve()).as_posix()
    shown = _git(repo, "show", f"{ref}:{rel}")
    if shown.returncode != 0:
        return None
    try:
        return json.loads(shown.stdout)
    except json.JSONDecodeError:
        raise DataError(f"{rel} at {ref} is not valid JSON") from None


def regressions(params: Mapping[str, Any], job: str, base: Mapping[str, float], head: Mapping[str, float]
                ) -> list[dict[str, Any]]:
    """Every gated metric of ``job`` with its base and head values; ``regressed`` when it got worse
    than base by more than the tolerance of its kind (``gate.regression``)."""
    settings = gate_settings(params, job)
    rows = []
    for c in settings.criteria:
        old, new = base.get(c.metric), head.get(c.metric)
        tol = settings.regression[c.kind]
        worse = c.worse_by(float(old), float(new)) if old is not None and new is not None else None
        rows.append({"criterion": c.name, "metric": c.metric, "base": old, "head": new, "tolerance": tol,
                     "worse_by": worse, "regressed": worse is not None and worse > tol + 1e-12})
    return rows


def dvc_metrics_diff(repo: Path, ref: str) -> str:
    """``dvc metrics diff REF --md`` in ``repo`` (its output, or the reason it could not run)."""
    sibling = Path(sys.executable).parent / "dvc"  # the dvc installed with ctharden, even when not on PATH
    dvc = str(sibling) if sibling.is_file() else (shutil.which("dvc") or "dvc")
    try:
        out = subprocess.run([dvc, "metrics", "diff", ref, "--md"], cwd=repo, capture_output=True, text=True,
                             timeout=300)
    except OSError as exc:
        return f"(dvc metrics diff could not run: {exc})"
    if out.returncode != 0:
        return f"(dvc metrics diff failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode})"
    return out.stdout.strip() or "(no metric changed)"


def ci_gate(params: Mapping[str, Any], base: str, *, variant: str = "auto", repo: str | Path = ".") -> dict[str, Any]:
    """Run the gate and the regression check against ``base``; returns ``{"passed", "gated",
    "regressions": {variant: {job: rows}}, "failures": [...], "markdown"}``."""
    from ctharden.evaluate.stage import evaluation_paths

    repo = Path(repo)
    gated = run_gate(params, variant)
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
            compared[v][job] = rows
            failures += [f"{job} ({v}): {r['criterion']} regressed {r['base']:.4g} -> {r['head']:.4g} "
                         f"(tolerance {r['tolerance']:g})" for r in rows if r["regressed"]]
    md = ["## ctharden robustness gate", "", gate_markdown(gated), "", f"### Gated metrics vs `{base}`", "",
          "| job | model | criterion | base | head | worse by | tolerance | verdict |",
          "|---|---|---|---|---|---|---|---|"]
    for v, jobs in compared.items():
        for job, rows in jobs.items():
            for r in rows:
                fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
                md.append(f"| {job} | {v} | `{r['criterion']}` | {fmt(r['base'])} | {fmt(r['head'])} | "
                          f"{fmt(r['worse_by'])} | {r['tolerance']:g} | {'**REGRESSED**' if r['regressed'] else 'ok'} |")
    md += [f"- {n}" for n in notes]
    md += ["", f"### `dvc metrics diff {base}`", "", dvc_metrics_diff(repo, base), "",
           f"**{'PASSED' if not failures else 'FAILED'}**" + ("" if not failures else ": " + "; ".join(failures)),
           f"\n(gate record: `{gate_path(params)}`)"]
    return {"passed": not failures, "gated": gated, "regressions": compared, "failures": failures,
            "markdown": "\n".join(md) + "\n"}
