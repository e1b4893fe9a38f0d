"""The ``gate`` stage: every evaluated model against its job's criteria (``params.yaml`` ``gate``).

Reads ``metrics/robustness.json`` (baselines) and/or ``metrics/robustness_hardened.json``, writes
``metrics/gate.json`` (every criterion with its metric, value, threshold and verdict, per variant
and job; entries of other variants and jobs are kept). ``ctharden stage gate`` prints the table and
exits non-zero when a gated model fails (unless ``--no-fail``, what ``dvc.yaml`` runs: a failing
baseline is an expected outcome, not a broken pipeline).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctharden.config.paths import VARIANTS, evaluation_paths, gate_path
from ctharden.core.errors import ConfigError, DataError
from ctharden.core.io import atomic_write_json, load_json, sha256_file
from ctharden.gate.criteria import check, failures, gate_settings
from ctharden.stages.result import StageResult

STAGE = "gate"


@dataclass(frozen=True)
class GateResult(StageResult):
    """The verdicts of the gated models, ``{variant: {job: record}}`` (merged into
    ``metrics/gate.json``)."""

    @property
    def failures(self) -> list[str]:
        """``"job (variant): reasons"`` for every gated model that failed."""
        return failures(self.record)

    @property
    def passed(self) -> bool:
        return not self.failures


def resolve_variants(params: Mapping[str, Any], variant: str) -> list[str]:
    """``baseline``, ``hardened``, ``all`` (both) or ``auto`` (hardened when evaluated, else baseline)."""

    if variant == "all":
        return list(VARIANTS)
    if variant == "auto":
        return ["hardened"] if evaluation_paths(params, "hardened")["metrics"].is_file() else ["baseline"]
    if variant not in VARIANTS:
        raise ConfigError(f"unknown gate variant {variant!r} (choose from auto, all, {', '.join(VARIANTS)})")
    return [variant]


def gate_model(params: Mapping[str, Any], job: str, variant: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The gate's record for one evaluated model: verdict plus what it was measured on."""

    settings = gate_settings(params, job)
    verdict = check(result["headline"], settings, result.get("intervals"))
    model_file = Path(result["model"]["file"])
    if not model_file.is_file():
        raise DataError(f"{job} ({variant}): evaluated model {model_file} no longer exists; re-run the evaluation")
    return {
        "job": job, "variant": variant, **verdict,
        "model": {"file": str(model_file), "sha256": sha256_file(model_file), "arch": result["model"]["arch"],
                  "mlflow_run_id": result["model"].get("mlflow_run_id"),
                  "selected_fold": result["model"].get("selected_fold")},
        "hardening": result.get("hardening"),
        "dataset": result["dataset"], "dataset_hash": result["dataset_hash"],
        "evaluation": {"metrics": str(evaluation_paths(params, variant)["metrics"]),
                       "report": str(evaluation_paths(params, variant)["reports"] / "index.html")},
        "registered_model": settings.model_name,
    }


def gate_variants(params: Mapping[str, Any], variant: str = "auto", jobs: Iterable[str] | None = None
                  ) -> dict[str, Any]:
    """Gate every evaluated model of ``variant`` (see :func:`resolve_variants`) and update
    ``metrics/gate.json`` (other variants' and jobs' entries are kept). Returns the gated entries
    as ``{variant: {job: record}}`` (see :func:`gate_model`)."""

    gated: dict[str, dict[str, Any]] = {}
    for v in resolve_variants(params, variant):
        path = evaluation_paths(params, v)["metrics"]
        if not path.is_file():
            stage = "ctharden stage evaluate" + (" --hardened" if v == "hardened" else "")
            raise DataError(f"no {v} evaluation to gate: {path} not found (run `{stage}`)")
        evaluated = load_json(path)
        names = list(jobs) if jobs else list(evaluated)
        missing = [j for j in names if j not in evaluated]
        if missing:
            raise DataError(f"{path} has no evaluation of {missing}")
        gated[v] = {job: gate_model(params, job, v, evaluated[job]) for job in names}
    out_path = gate_path(params)
    merged: dict[str, Any] = load_json(out_path) if out_path.is_file() else {}
    for v, entries in gated.items():
        merged[v] = {**(merged.get(v) or {}), **entries}
    atomic_write_json(out_path, merged)
    return gated


def run(params: dict[str, Any], name: str = "auto", jobs: Iterable[str] | None = None) -> GateResult:
    """Gate every evaluated model of variant ``name`` (``baseline``, ``hardened``, ``all`` or
    ``auto``, see :func:`resolve_variants`) of ``jobs`` (default: every evaluated job)."""
    return GateResult(STAGE, name, gate_variants(params, name, jobs), gate_path(params))
