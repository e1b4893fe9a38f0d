"""Prefect flows: the same stages as dvc.yaml, calling the same library functions.

- ``data_flow``: ingest and validate every dataset (:mod:`ctharden.pipeline`);
- ``pipeline_flow``: ``data_flow``, then every training job (:mod:`ctharden.train.job`), the
  robustness evaluation of every trained job (:mod:`ctharden.evaluate.stage`) with its report, the
  ε search (:mod:`ctharden.tune`), hardening (:mod:`ctharden.train.harden_stage`) and the
  evaluation of the hardened models next to their baselines.

Run without a server (Prefect starts a temporary local API):

    python flows/pipeline.py                       # the whole pipeline, embedded default profile
    python flows/pipeline.py --profile smoke --only data

I/O tasks retry on transient OS errors only; bad input (a CthardenError) fails at once, since
retrying a corrupt file cannot help. The flow publishes a markdown artifact summarising the
validation of every dataset and fails if any dataset is invalid, before anything downstream runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from ctharden import pipeline
from ctharden.config import load_params
from ctharden.errors import CthardenError, ValidationFailed


def _transient(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only errors that a retry can fix (I/O), never bad input."""
    try:
        state.result()
    except CthardenError:
        return False
    except OSError:
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug: do not retry
        return False
    return False


@task(name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient, task_run_name="ingest-{name}")
def ingest_task(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Build one configured dataset (see :func:`ctharden.pipeline.ingest`)."""
    return pipeline.ingest(params, name)


@task(name="validate", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient,
      task_run_name="validate-{name}")
def validate_task(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Validate one dataset; returns its summary, with ``success`` False rather than raising."""
    try:
        return pipeline.validate(params, name)
    except ValidationFailed as exc:
        summary = pipeline.load_json(pipeline.metrics_path(params, "validate", name))
        summary["message"] = str(exc)
        return summary


@flow(name="ctharden-data")
def data_flow(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Ingest and validate every dataset in params.yaml; fail if any is invalid."""
    params = load_params(params_path, profile, list(overrides))
    names = pipeline.dataset_names(params)
    ingested = {name: ingest_task.submit(params, name) for name in names}
    results = {name: validate_task.submit(params, name, wait_for=[ingested[name]]) for name in names}
    for fut in ingested.values():
        fut.result()  # re-raises an ingest error as itself (it names the bad file)
    summaries = {name: fut.result() for name, fut in results.items()}
    create_markdown_artifact(
        key="data-validation",
        markdown="# Data validation\n\n" + pipeline.summarize_validation(summaries),
        description=f"Great Expectations results per dataset (profile {params['profile']})",
    )
    failed = [name for name, s in summaries.items() if not s["success"]]
    if failed:
        raise ValidationFailed(f"datasets failed validation: {', '.join(failed)}; nothing downstream runs")
    return summaries


@task(name="train", task_run_name="train-{job}")
def train_task(params: dict[str, Any], job: str) -> dict[str, Any]:
    """Run one training job (see :func:`ctharden.train.job.run_training_job`); its MLflow run is its own."""
    from ctharden.train.job import run_training_job

    return run_training_job(params, job, progress=False)


@task(name="evaluate", retries=1, retry_delay_seconds=2, retry_condition_fn=_transient)
def evaluate_task(params: dict[str, Any], variant: str = "baseline") -> dict[str, Any]:
    """Robustness evaluation of every trained (or hardened) job (see
    :func:`ctharden.evaluate.stage.run_evaluation`); publishes the report's summary (Table 2, PGD,
    sanity verdicts, baseline vs hardened) as a markdown artifact."""
    from pathlib import Path

    from ctharden.evaluate.stage import run_evaluation

    out = run_evaluation(params, variant=variant)
    create_markdown_artifact(
        key="robustness" if variant == "baseline" else "robustness-hardened",
        markdown=Path(out["report"]["summary"]).read_text(),
        description=f"NPS attacks (SAN/N %), 100-PGD robust accuracy and sanity checks; report {out['report']['html']}",
    )
    return out


@task(name="tune", task_run_name="tune-{job}")
def tune_task(params: dict[str, Any], job: str) -> dict[str, Any]:
    """The job's training ε by Optuna, seeded by IMA's margins (see :func:`ctharden.tune.tune_job`)."""
    from ctharden.tune import trials_markdown, tune_job

    out = tune_job(params, job)
    if out.get("trials"):
        create_markdown_artifact(key=f"tune-{job.lower()}", markdown=trials_markdown(out),
                                 description=f"Optuna trials for {job}'s hardening ε")
    return out


@task(name="harden", task_run_name="harden-{job}")
def harden_task(params: dict[str, Any], job: str) -> dict[str, Any]:
    """Harden the job's baseline and compare methods (see :func:`ctharden.train.harden_stage.harden_job`)."""
    from ctharden.train.harden_stage import curves_markdown, harden_job

    out = harden_job(params, job)
    create_markdown_artifact(key=f"harden-{job.lower()}", markdown=f"# {job}: hardening methods\n\n"
                             + curves_markdown(out["curves"], out["norm"]),
                             description=f"100-PGD accuracy vs ε of every hardening method for {job}")
    return out


@flow(name="ctharden-pipeline")
def pipeline_flow(
    profile: str | None = None, params_path: str = "params.yaml", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Ingest + validate every dataset, train every configured job (sequentially: CPU-bound),
    evaluate their robustness, tune ε, harden, and evaluate the hardened models."""
    from ctharden.train.job import job_names

    data = data_flow(profile=profile, params_path=params_path, overrides=overrides)
    params = load_params(params_path, profile, list(overrides))
    trained = {job: train_task(params, job) for job in job_names(params)}
    rows = ["| job | dataset | test AUC (mean ± std) | accuracy | MLflow run |", "|---|---|---|---|---|"]
    for job, s in trained.items():
        auc, acc = s["test_mean_std"]["auc"], s["test_mean_std"]["accuracy"]
        auc_txt = f"{auc['mean']:.3f} ± {auc['std']:.3f}" if auc["mean"] is not None else "n/a"
        rows.append(f"| {job} | {s['dataset']} | {auc_txt} | {acc['mean']:.3f} | {s['mlflow']['run_id']} |")
    create_markdown_artifact(key="training", markdown="# Training\n\n" + "\n".join(rows),
                             description="clean test metrics over folds per training job")
    evaluated = evaluate_task(params)
    tuned = {job: tune_task(params, job) for job in trained}
    hardened = {job: harden_task(params, job) for job in trained}
    evaluated_hardened = evaluate_task(params, "hardened")
    return {"data": data, "train": trained, "evaluate": evaluated, "tune": tuned, "harden": hardened,
            "evaluate_hardened": evaluated_hardened}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--only", choices=["data", "all"], default="all")
    args = parser.parse_args(argv)
    run = data_flow if args.only == "data" else pipeline_flow
    run(profile=args.profile, params_path=args.params, overrides=args.overrides)


if __name__ == "__main__":
    main()
