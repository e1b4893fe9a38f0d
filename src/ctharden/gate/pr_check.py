"""The pull-request check's parts: committed metrics at a git revision, the regression rule and
``dvc metrics diff``. :mod:`ctharden.stages.ci_gate` runs them (``ctharden ci-gate --base REF``):

1. Gate the working tree's evaluation (the gate stage; default: the hardened models when
   evaluated, else the baselines) and write ``metrics/gate.json``.
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

from ctharden.core.errors import DataError
from ctharden.gate.criteria import gate_settings


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
        committed: dict[str, Any] = json.loads(shown.stdout)  # a metrics file holds one JSON object
        return committed
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
        reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        return f"(dvc metrics diff failed: {reason})"
    return out.stdout.strip() or "(no metric changed)"
