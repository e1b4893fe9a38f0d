"""The nightly ``reevaluate`` stage: the registered champion of a job, evaluated and gated again
on the job's current (validated) data."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

from ctharden.config.jobs import job_config
from ctharden.config.params import section
from ctharden.config.paths import champion_record_path, dataset_dir, validation_dir
from ctharden.core.io import atomic_write_json
from ctharden.evaluation.headline import headline_metrics
from ctharden.gate.criteria import VERDICT_WORD, check, gate_settings, reasons
from ctharden.stages.evaluate_external import evaluate_model_robustness
from ctharden.stages.result import StageResult
from ctharden.tracking.promotion import CHAMPION, TAG, alias_version
from ctharden.tracking.runs import configure, tracking_from_params

log = logging.getLogger(__name__)
STAGE = "reevaluate"


def run(params: Mapping[str, Any], name: str) -> StageResult | None:
    """Evaluate ``models:/<registered name>@champion`` of job ``name`` on the job's current
    (validated) dataset with the job's robustness settings, gate it, tag the version with the
    verdict and write ``metrics/champion/<job>.json``. Returns None when the job has no champion."""
    job = name
    configure(tracking_from_params(params))
    client = mlflow.MlflowClient()
    model_name = gate_settings(params, job).model_name
    mv = alias_version(client, model_name, CHAMPION)
    if mv is None:
        log.warning("%s: no champion registered under %s", job, model_name)
        return None
    ref = f"models:/{model_name}@{CHAMPION}"
    ds = job_config(params, job)["dataset"]
    result = evaluate_model_robustness(
        ref, dataset_dir(params, ds), dict(params), validation_dir=validation_dir(params, ds),
        settings_of=job, report_dir=Path(section(params, "paths.reports")) / "champion" / job)
    headline = headline_metrics(result)
    verdict = check(headline, gate_settings(params, job), result.get("intervals"))
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for key, value in {f"{TAG}.reevaluated_at": when,
                       f"{TAG}.reevaluation_gate": VERDICT_WORD[verdict["verdict"]],
                       f"{TAG}.reevaluation_reasons": reasons(verdict)[:5000],
                       f"{TAG}.reevaluation_dataset_hash": result["dataset_hash"]}.items():
        client.set_model_version_tag(model_name, mv.version, key, value)
    out = {"job": job, "model_uri": ref, "name": model_name, "version": str(mv.version), "reevaluated_at": when,
           "dataset_hash": result["dataset_hash"], "headline": headline, "gate": verdict, "report": result["report"]}
    path = atomic_write_json(champion_record_path(params, job), out)
    return StageResult(STAGE, job, out, path)
