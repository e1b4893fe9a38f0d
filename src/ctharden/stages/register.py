"""The ``register`` stage: put every gated model that passed into the MLflow registry.

For each job it takes the gate's records from ``metrics/gate.json`` (baseline first, then
hardened) and hands each to :func:`ctharden.tracking.promotion.register_record` (verify, reject or
register, aliases). Writes ``metrics/register.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import mlflow

from ctharden.config.paths import gate_path, registration_record_path
from ctharden.core.errors import DataError
from ctharden.core.io import atomic_write_json, load_json
from ctharden.gate.criteria import gate_settings
from ctharden.stages.result import RegisterResult
from ctharden.tracking.promotion import CHAMPION, ORDER, alias_version, register_record
from ctharden.tracking.runs import configure, tracking_from_params

STAGE = "register"


def register(params: Mapping[str, Any], jobs: Iterable[str] | None = None,
             variants: Iterable[str] = ORDER) -> dict[str, Any]:
    """Register every gated model of ``jobs`` (default: every job in ``metrics/gate.json``).

    Returns (and writes to ``metrics/register.json``) ``{job: [outcome per variant]}`` plus
    ``champions`` (``{job: "models:/name@champion" version or None}``)."""
    path = gate_path(params)
    if not path.is_file():
        raise DataError(f"{path} not found: run `ctharden gate` before registering")
    gated = load_json(path)
    variants = [v for v in ORDER if v in set(variants)]
    names = list(jobs) if jobs else sorted({j for v in variants for j in (gated.get(v) or {})})
    records = {job: [gated[v][job] for v in variants if job in (gated.get(v) or {})] for job in names}
    missing = [job for job, recs in records.items() if not recs]
    if missing:
        raise DataError(f"{path} has no gate record of {missing}: run `ctharden gate` for them")
    configure(tracking_from_params(params))
    client = mlflow.MlflowClient()
    outcomes = {job: [register_record(params, rec, client) for rec in recs] for job, recs in records.items()}
    champions = {}
    for job in outcomes:
        name = gate_settings(params, job).model_name
        mv = alias_version(client, name, CHAMPION)
        champions[job] = {"name": name, "version": str(mv.version) if mv else None,
                          "uri": f"models:/{name}@{CHAMPION}" if mv else None}
    prior = registration_record_path(params)
    merged = load_json(prior) if prior.is_file() else {}
    summary = {"jobs": {**(merged.get("jobs") or {}), **outcomes},
               "champions": {**(merged.get("champions") or {}), **champions}}
    atomic_write_json(prior, summary)
    return summary


def run(params: dict[str, Any], name: str = "all", variants: Iterable[str] = ORDER) -> RegisterResult:
    """The register stage for job ``name`` (``all``: every gated job)."""
    summary = register(params, None if name == "all" else [name], variants)
    return RegisterResult(STAGE, name, summary, registration_record_path(params))
