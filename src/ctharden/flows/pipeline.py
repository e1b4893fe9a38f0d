"""Prefect flows: the same stages as dvc.yaml, each task calling one stage's ``run``.

- ``data_flow``: ingest and validate every dataset (:mod:`ctharden.stages.ingest`,
  :mod:`ctharden.stages.validate`);
- ``harden_pipeline``: ``data_flow`` -> train every job (:mod:`ctharden.stages.train`) -> evaluate
  (:mod:`ctharden.stages.evaluate`) -> gate (:mod:`ctharden.stages.gate`) -> tune ε
  (:mod:`ctharden.stages.tune`) -> harden (:mod:`ctharden.stages.harden`) -> evaluate the hardened
  models -> gate -> register (:mod:`ctharden.stages.register`), with a markdown artifact per stage
  and a final summary artifact. Tasks return the stages' typed results
  (:mod:`ctharden.stages.result`);
- ``reevaluate_champion``: re-run the robustness evaluation and the gate on each job's registered
  ``champion`` with the current data (the nightly deployment, :mod:`ctharden.flows.deployments`).

Run without a server (Prefect starts a temporary local API):

    python flows/pipeline.py                       # the whole pipeline, embedded default profile
    python flows/pipeline.py --profile smoke --only data
    python flows/pipeline.py --runner dask         # training folds and evaluation units on Dask

Caching: every stage task is cached on its inputs (Prefect ``INPUTS + TASK_SOURCE``). The inputs
are the resolved params, the stage's upstream results (content hashes, MLflow run ids) and a
fingerprint of the package source and of the raw data, so re-running with unchanged data, params
and code returns the cached results at once, and a change anywhere upstream re-runs what depends
on it. A task whose output files are gone is re-run (``refresh_cache``). The gate and registration
are cheap and never cached (the registry is external state).

I/O tasks retry on transient OS errors only; bad input (a CthardenError) fails at once, since
retrying a corrupt file cannot help. The flow publishes a markdown artifact summarising the
validation of every dataset and fails if any dataset is invalid, before anything downstream runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from ctharden.config.jobs import job_config, job_names
from ctharden.config.params import load_params, section
from ctharden.config.paths import (
    dataset_dir,
    dataset_names,
    evaluation_paths,
    harden_paths,
    metrics_path,
    train_paths,
    tune_paths,
    validation_dir,
)
from ctharden.core.errors import DataError, GateFailed, ValidationFailed
from ctharden.core.io import load_json, tree_sha256
from ctharden.flows.fanout import evaluate_fanout, task_runner, train_fanout
from ctharden.flows.retry import transient
from ctharden.gate.criteria import gate_markdown, reasons
from ctharden.stages import evaluate as evaluate_stage
from ctharden.stages import gate as gate_stage
from ctharden.stages import harden as harden_stage
from ctharden.stages import ingest as ingest_stage
from ctharden.stages import reevaluate as reevaluate_stage
from ctharden.stages import register as register_stage
from ctharden.stages import train as train_stage
from ctharden.stages import tune as tune_stage
from ctharden.stages import validate as validate_stage
from ctharden.stages.gate import GateResult
from ctharden.stages.harden import curves_markdown
from ctharden.stages.result import (
    EvaluateResult,
    HardenResult,
    IngestResult,
    RegisterResult,
    StageResult,
    TrainResult,
    TuneResult,
    ValidateResult,
)
from ctharden.stages.summary import pipeline_summary
from ctharden.stages.summary import summary_markdown as run_summary_markdown
from ctharden.stages.tune import trials_markdown
from ctharden.tracking.promotion import register_markdown

CACHE = INPUTS + TASK_SOURCE


def code_fingerprint() -> str:
    """SHA-256 of the package's source files: a code change invalidates every cached stage."""
    return tree_sha256(Path(__file__).resolve().parents[1], "*.py")  # the ctharden package directory


def source_fingerprint(params: dict[str, Any], name: str) -> str:
    """SHA-256 of dataset ``name``'s raw source files (paths and bytes); "" for generated data."""
    spec = section(params, "datasets").get(name) or {}
    root = Path(spec.get("root", "")) if spec.get("root") else None
    if root is None or not root.exists():
        return ""
    return tree_sha256(root)


def fresh(task_: Any, *outputs: Path | str) -> Any:
    """``task_`` set to recompute (and re-cache) when any of its output files is missing."""
    return task_.with_options(refresh_cache=not all(Path(o).exists() for o in outputs))


@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=transient, task_run_name="ingest-{name}",
      cache_policy=CACHE, persist_result=True)
def ingest_task(params: dict[str, Any], name: str, fingerprint: str = "") -> IngestResult:
    """Build one configured dataset (:func:`ctharden.stages.ingest.run`); ``fingerprint`` (raw data
    and code) only keys the cache."""
    return ingest_stage.run(params, name)


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=transient,
      task_run_name="validate-{name}", cache_policy=CACHE, persist_result=True)
def validate_task(params: dict[str, Any], name: str, ingested: IngestResult | None = None) -> ValidateResult:
    """Validate one dataset (:func:`ctharden.stages.validate.run`); a failed validation is returned
    (``success`` False, with the message) rather than raised."""
    try:
        return validate_stage.run(params, name)
    except ValidationFailed as exc:
        path = metrics_path(params, validate_stage.STAGE, name)
        return ValidateResult(validate_stage.STAGE, name, {**load_json(path), "message": str(exc)}, path)


@flow(name="ctharden-data")
def data_flow(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = ()
) -> dict[str, ValidateResult]:
    """Ingest and validate every dataset in params.yaml; fail if any is invalid."""
    params = load_params(params_path, profile, list(overrides))
    names = dataset_names(params)
    code = code_fingerprint()
    ingested = {}
    for name in names:
        out = [metrics_path(params, "ingest", name), dataset_dir(params, name) / "dataset.json"]
        ingested[name] = fresh(ingest_task, *out).submit(params, name, code + source_fingerprint(params, name))
    results = {}
    for name in names:
        out = [metrics_path(params, "validate", name), validation_dir(params, name) / "validation.json"]
        results[name] = fresh(validate_task, *out).submit(params, name, ingested[name])
    for fut in ingested.values():
        fut.result()  # re-raises an ingest error as itself (it names the bad file)
    summaries = {name: fut.result() for name, fut in results.items()}
    create_markdown_artifact(
        key="data-validation",
        markdown="# Data validation\n\n" + validate_stage.summarize({n: s.to_json() for n, s in summaries.items()}),
        description=f"Great Expectations results per dataset (profile {params['profile']})",
    )
    failed = [name for name, s in summaries.items() if not s.success]
    if failed:
        raise ValidationFailed(f"datasets failed validation: {', '.join(failed)}; nothing downstream runs")
    return summaries


@task(name="train", task_run_name="train-{job}", cache_policy=CACHE, persist_result=True)
def train_task(params: dict[str, Any], job: str, upstream: Any = None) -> TrainResult:
    """Run one training job (:func:`ctharden.stages.train.run`); its MLflow run is its own.
    ``upstream`` (the validated dataset's summary, the code fingerprint) only keys the cache."""
    return train_stage.run(params, job, progress=False)


@task(name="evaluate", retries=1, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=CACHE,
      persist_result=True, task_run_name="evaluate-{variant}")
def evaluate_task(params: dict[str, Any], variant: str = "baseline", upstream: Any = None) -> EvaluateResult:
    """Robustness evaluation of every trained (or hardened) job (:func:`ctharden.stages.evaluate.run`);
    publishes the report's summary (Table 2, PGD, sanity verdicts, baseline vs hardened) as a
    markdown artifact."""
    out = evaluate_stage.run(params, variant)
    publish_evaluation(out)
    return out


def publish_evaluation(out: EvaluateResult) -> None:
    """The evaluation's markdown summary as a Prefect artifact."""
    create_markdown_artifact(
        key="robustness" if out.name == "baseline" else "robustness-hardened",
        markdown=Path(out.report["summary"]).read_text(),
        description=f"NPS attacks (SAN/N %), 100-PGD robust accuracy and sanity checks; report {out.html}",
    )


@task(name="tune", task_run_name="tune-{job}", cache_policy=CACHE, persist_result=True)
def tune_task(params: dict[str, Any], job: str, upstream: Any = None) -> TuneResult:
    """The job's training ε by Optuna, seeded by IMA's margins (:func:`ctharden.stages.tune.run`)."""
    out = tune_stage.run(params, job)
    if out.record.get("trials"):
        create_markdown_artifact(key=f"tune-{job.lower()}", markdown=trials_markdown(out.to_json()),
                                 description=f"Optuna trials for {job}'s hardening ε")
    return out


@task(name="harden", task_run_name="harden-{job}", cache_policy=CACHE, persist_result=True)
def harden_task(params: dict[str, Any], job: str, upstream: Any = None) -> HardenResult:
    """Harden the job's baseline and compare methods (:func:`ctharden.stages.harden.run`)."""
    out = harden_stage.run(params, job)
    create_markdown_artifact(key=f"harden-{job.lower()}", markdown=f"# {job}: hardening methods\n\n"
                             + curves_markdown(out.record["curves"], out.record["norm"]),
                             description=f"100-PGD accuracy vs ε of every hardening method for {job}")
    return out


@task(name="gate", task_run_name="gate-{variant}")
def gate_task(params: dict[str, Any], variant: str, upstream: Any = None) -> GateResult:
    """Decide every gate criterion for the evaluated ``variant`` (:func:`ctharden.stages.gate.run`),
    never raising on a failed gate (registration refuses it); publishes the gate table."""
    gated = gate_stage.run(params, variant)
    create_markdown_artifact(key=f"gate-{variant}", markdown=f"# Robustness gate ({variant})\n\n"
                             + gate_markdown(gated.record),
                             description=f"every gate criterion of the {variant} models: value, threshold, verdict")
    return gated


@task(name="register", retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def register_task(params: dict[str, Any], upstream: Any = None) -> RegisterResult:
    """Register every model that passed its gate (:func:`ctharden.stages.register.run`); publishes the outcome."""
    summary = register_stage.run(params)
    create_markdown_artifact(key="registry", markdown="# Model registry\n\n" + register_markdown(summary.record),
                             description="gate verdict and registry outcome per job and model")
    return summary


def _training_markdown(trained: dict[str, TrainResult]) -> str:
    rows = ["| job | dataset | test AUC (mean ± std) | accuracy | MLflow run |", "|---|---|---|---|---|"]
    for job, s in trained.items():
        auc, acc = s.test_mean_std["auc"], s.test_mean_std["accuracy"]
        auc_txt = f"{auc['mean']:.3f} ± {auc['std']:.3f}" if auc["mean"] is not None else "n/a"
        rows.append(f"| {job} | {s.record['dataset']} | {auc_txt} | {acc['mean']:.3f} | {s.run_id} |")
    return "# Training\n\n" + "\n".join(rows)


def summary_markdown(result: dict[str, Any], params: dict[str, Any]) -> str:
    """The final summary: :func:`ctharden.stages.summary.pipeline_summary` (per job and model the
    verdict, the primary criterion with its bound, clean AUC, registry outcome, report) and the
    tuned training ε per job."""
    eps = ", ".join(f"{job} {'n/a' if t.eps is None else f'{t.eps:.4g}'}" for job, t in result["tune"].items())
    return (f"# ctharden pipeline (profile {params.get('profile')})\n\n"
            + run_summary_markdown(pipeline_summary(params)) + f"\n\nTuned training ε: {eps}.")


def _train_and_evaluate(params: dict[str, Any], data: dict[str, ValidateResult], code: str, runner: str
                        ) -> tuple[dict[str, TrainResult], EvaluateResult]:
    """Train every job, then evaluate them: stage tasks (serial) or fold/unit tasks (dask)."""
    jobs = job_names(params)
    if runner == "dask":
        trained = {job: train_fanout(params, job) for job in jobs}
        evaluated = evaluate_fanout(params, "baseline")
        publish_evaluation(evaluated)
        return trained, evaluated
    trained = {}
    for job in jobs:  # sequentially: each job uses every core
        ds = data[job_config(params, job)["dataset"]]
        trained[job] = fresh(train_task, train_paths(params, job)["metrics"]).submit(
            params, job, {"code": code, "dataset": ds.content_hash}).result()
    upstream = {"code": code, "runs": {j: s.run_id for j, s in trained.items()}}
    evaluated = fresh(evaluate_task, evaluation_paths(params)["metrics"]).submit(params, "baseline", upstream).result()
    return trained, evaluated


@flow(name="harden-pipeline")
def harden_pipeline(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = (),
    runner: str = "serial",
) -> dict[str, Any]:
    """ingest -> validate -> train -> evaluate -> gate -> tune ε -> harden -> evaluate -> gate -> register.

    ``runner="dask"``: CV folds and evaluation units run as separate tasks on the flow's task
    runner (give the flow a ``DaskTaskRunner``: see :func:`run_pipeline`)."""

    data = data_flow(profile=profile, params_path=params_path, overrides=overrides)
    params = load_params(params_path, profile, list(overrides))
    code = code_fingerprint()
    trained, evaluated = _train_and_evaluate(params, data, code, runner)
    create_markdown_artifact(key="training", markdown=_training_markdown(trained),
                             description="clean test metrics over folds per training job")
    gate_baseline = gate_task(params, "baseline", {j: r["headline"] for j, r in evaluated.jobs.items()})
    tuned, hardened = {}, {}
    for job, s in trained.items():
        up = {"code": code, "run": s.run_id}
        tuned[job] = fresh(tune_task, tune_paths(params, job)["metrics"]).submit(params, job, up).result()
        hardened[job] = fresh(harden_task, harden_paths(params, job)["metrics"]).submit(
            params, job, {**up, "eps": tuned[job].eps}).result()
    upstream = {"code": code, "runs": {j: h.run_id for j, h in hardened.items()},
                "baseline": {j: r["headline"] for j, r in evaluated.jobs.items()}}
    evaluated_hardened = fresh(evaluate_task, evaluation_paths(params, "hardened")["metrics"]).submit(
        params, "hardened", upstream).result()
    gate_hardened = gate_task(params, "hardened", {j: r["headline"] for j, r in evaluated_hardened.jobs.items()})
    registered = register_task(params, gate_hardened)
    result = {"data": data, "train": trained, "evaluate": evaluated, "gate_baseline": gate_baseline, "tune": tuned,
              "harden": hardened, "evaluate_hardened": evaluated_hardened, "gate_hardened": gate_hardened,
              "register": registered}
    create_markdown_artifact(key="pipeline-summary", markdown=summary_markdown(result, params),
                             description="gate verdicts, tuned ε and registry outcome per job")
    return result


@task(name="reevaluate-champion", task_run_name="reevaluate-{job}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient)
def reevaluate_champion_task(params: dict[str, Any], job: str) -> StageResult | None:
    """Evaluate and gate the job's registered champion on the current data
    (:func:`ctharden.stages.reevaluate.run`); None when the job has no champion."""
    return reevaluate_stage.run(params, job)


@flow(name="reevaluate-champion")
def reevaluate_champion(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = (),
    jobs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The nightly check: ingest + validate the current data, then evaluate and gate every job's
    ``champion``; tags each champion version with the verdict and fails if any champion now fails."""

    data_flow(profile=profile, params_path=params_path, overrides=overrides)
    params = load_params(params_path, profile, list(overrides))
    results = {job: reevaluate_champion_task(params, job) for job in (jobs or job_names(params))}
    checked = {job: r.record for job, r in results.items() if r is not None}
    if not checked:
        raise DataError(f"no registered champion for {', '.join(results)}: run the harden pipeline first")
    create_markdown_artifact(
        key="champion-reevaluation",
        markdown="# Nightly re-evaluation of the champions\n\n" + gate_markdown(
            {"champion": {job: r["gate"] for job, r in checked.items()}})
        + "".join(f"\n\n- {job}: {r['model_uri']} (version {r['version']}), report {r['report']}"
                  for job, r in checked.items()),
        description="robustness gate of every registered champion on the current data")
    failed = [f"{job}: {reasons(r['gate'])}" for job, r in checked.items() if not r["gate"]["passed"]]
    if failed:
        raise GateFailed("champion no longer passes the gate: " + " | ".join(failed))
    return results


def run_pipeline(profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = (),
                 runner: str = "serial", address: str | None = None, n_workers: int | None = None) -> dict[str, Any]:
    """Run :func:`harden_pipeline` with the task runner ``runner`` ("serial" or "dask"; ``address``
    of an existing Dask scheduler, else a LocalCluster, also from params ``dask.address``)."""
    if runner == "serial":
        return harden_pipeline(profile=profile, params_path=params_path, overrides=overrides)

    params = load_params(params_path, profile, list(overrides))
    cfg = params.get("dask") or {}
    tr = task_runner(runner, address=address or cfg.get("address"), n_workers=n_workers or cfg.get("n_workers"))
    return harden_pipeline.with_options(task_runner=tr)(
        profile=profile, params_path=params_path, overrides=overrides, runner=runner)



def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--only", choices=["data", "all", "champion"], default="all",
                        help="data: ingest + validate; all: the harden pipeline; champion: re-evaluate the champions")
    parser.add_argument(
        "--runner", choices=["serial", "dask"], default="serial",
        help="dask: CV folds and evaluation units on a Dask cluster (params dask.address or a LocalCluster)",
    )
    parser.add_argument("--dask-address", default=None, help="scheduler address of an existing Dask cluster")
    args = parser.parse_args(argv)
    if args.only == "data":
        data_flow(profile=args.profile, params_path=args.params, overrides=args.overrides)
    elif args.only == "champion":
        reevaluate_champion(profile=args.profile, params_path=args.params, overrides=args.overrides)
    else:
        run_pipeline(args.profile, args.params, args.overrides, args.runner, args.dask_address)


if __name__ == "__main__":
    main()
