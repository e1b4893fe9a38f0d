"""The ``evaluate`` stage: robustness evaluation of every trained job, one report for all of them.

What ``ctharden stage evaluate`` / ``ctharden evaluate`` / the flow's evaluate task run::

    results = run_evaluation(params)               # every job in train.jobs (or a list)

For each job: load its selected model (and the other fold models when ``models: folds``) from
``artifacts/models/<job>``, refuse a dataset whose validation record does not match it, run
:func:`~ctharden.evaluation.robustness.evaluate_robustness`, write the job's DVC plot data and
figures and its per-sample outcomes (``reports/robustness/<job>/outcomes.json``: which test samples each
attack broke, by sample id, for paired comparisons), and log metrics and files to the job's MLflow
training run. Every rate in the metrics carries its interval (``<job>.intervals``,
:mod:`ctharden.evaluation.evidence`). Then, for all jobs together:
``metrics/robustness.json`` (DVC metrics), ``reports/robustness/index.html`` (the report),
``reports/robustness/summary.md`` (what the Prefect artifact and CI show) and the shared figures.
Every file is written atomically; ``metrics/robustness.json`` last, so a failed run leaves the
previous metrics in place.

Steps: :func:`evaluation_plan` (checks before any work) -> per job :func:`prepare_job` (checks,
models, data, settings), the evaluation units, :func:`finish_job` (metadata) ->
:func:`write_evaluation` (every output). :func:`run_evaluation` runs the units in turn;
:func:`ctharden.flows.fanout.evaluate_fanout` runs them as tasks on a Dask cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctharden.config.hardening import tune_settings
from ctharden.config.jobs import job_names
from ctharden.config.params import section
from ctharden.config.paths import evaluation_paths, harden_paths, outcomes_path
from ctharden.config.robustness import RobustnessSettings, job_settings
from ctharden.core.errors import DataError
from ctharden.core.io import atomic_write_json, atomic_write_text, load_json, sha256_file
from ctharden.data.arrays import ArraySet, load_arrayset
from ctharden.evaluation.attention import has_conv_layers, save_attention_figure
from ctharden.evaluation.headline import headline_metrics
from ctharden.evaluation.trends import hardening_trends, nps_trends
from ctharden.evaluation.units import evaluate_robustness, model_set
from ctharden.gate.criteria import check, gate_settings, gated_eps
from ctharden.gate.plan import planned_cap
from ctharden.models import CTClassifier
from ctharden.noise.config import noise_model
from ctharden.reporting.report import (
    comparison_tables,
    plot_examples,
    plot_robust_accuracy,
    plot_san_vs_mas,
    plot_sar_curves,
    render_html,
    summary_markdown,
    write_plot_data,
)
from ctharden.stages.inputs import load_job_models, trained_dataset
from ctharden.stages.result import EvaluateResult
from ctharden.tracking.runs import OUTCOMES_ARTIFACT, configure, tracking_from_params

log = logging.getLogger(__name__)
ROBUSTNESS_ARTIFACTS = "robustness"
STAGE = {"baseline": "evaluate", "hardened": "evaluate_hardened"}  # dvc.yaml stage per variant


@dataclass
class EvalJob:
    """What one job's evaluation needs, loaded and checked (see :func:`prepare_job`)."""

    job: str
    variant: str
    dataset: str
    dataset_dir: Path
    model: CTClassifier  # the selected (or hardened) model
    fold_models: list[CTClassifier]
    summary: dict[str, Any]  # the training (or harden) stage's summary
    data: ArraySet
    settings: RobustnessSettings
    seed: int
    nps: Any  # NPSModel
    profile: str | None

    @property
    def models(self) -> list[torch.nn.Module]:
        """The NPS attacks' models, the selected one first."""
        return model_set(self.model, self.fold_models, self.settings)


def evaluation_settings(params: dict[str, Any], job: str, width: int) -> RobustnessSettings:
    """The job's robustness settings for inputs ``width`` pixels wide, with the gate's ε per norm
    (where ``pgd.ensemble_eps: gated`` runs the whole attack ensemble) and every ``plan`` sample
    cap set by the gate's planner (:func:`ctharden.gate.plan.planned_cap`: the ``n`` that decides
    the job's criteria on that attack; no cap where the job gates nothing on it)."""
    gs = gate_settings(params, job)
    settings = job_settings(params, job).for_width(width).with_gated_eps(gated_eps(gs))
    if not settings.planned:
        return settings
    return settings.with_caps({attack: planned_cap(gs, attack) for attack in settings.planned})


def prepare_job(params: dict[str, Any], job: str, variant: str = "baseline") -> EvalJob:
    """Check that the job's dataset is validated and unchanged since training, and load its
    models, data and settings."""
    model, fold_models, summary = load_job_models(params, job, variant)
    name, ds_dir, _ = trained_dataset(params, job, summary)
    data = load_arrayset(ds_dir, model)
    settings = evaluation_settings(params, job, int(data.raw.shape[-1]))
    if variant == "hardened":  # one hardened model (of the selected fold): compare with the baseline's selected model
        settings = dataclasses.replace(settings, models="selected")
    return EvalJob(job, variant, name, ds_dir, model, fold_models, summary, data, settings,
                   int(section(params, "seed")), noise_model(params), params.get("profile"))


def finish_job(ctx: EvalJob, result: dict[str, Any]) -> dict[str, Any]:
    """Add the job, dataset, model and (hardened) hardening metadata to ``result`` (in place)."""
    summary = ctx.summary
    result.update({
        "job": ctx.job, "dataset": ctx.dataset, "dataset_dir": str(ctx.dataset_dir),
        "dataset_hash": ctx.data.info["content_hash"],
        "model": {"file": summary["model_file"], "arch": summary["arch"], "selected_fold": summary["selected_fold"],
                  "mlflow_run_id": summary["mlflow"]["run_id"], "config": ctx.model.config()},
        "profile": ctx.profile, "variant": ctx.variant,
    })
    if ctx.variant == "hardened":
        result["hardening"] = {"method": summary["method"], "eps": summary["eps"], "norm": summary["norm"],
                               "eps_source": summary["eps_source"]}
    return result


def evaluate_job(params: dict[str, Any], job: str, variant: str = "baseline"
                 ) -> tuple[dict[str, Any], dict[str, Any], CTClassifier, ArraySet]:
    """Evaluate one trained (or hardened) job; returns ``(result, visuals, model, data)``."""
    t0 = time.perf_counter()
    ctx = prepare_job(params, job, variant)
    result, visuals = evaluate_robustness(ctx.model, ctx.data, ctx.settings, seed=ctx.seed,
                                          fold_models=ctx.fold_models, nps=ctx.nps)
    finish_job(ctx, result)
    log.info("evaluated %s in %.0f s", job, time.perf_counter() - t0)
    return result, visuals, ctx.model, ctx.data


def write_job_figures(result: dict[str, Any], visuals: dict[str, Any], model: CTClassifier, plots_dir: Path,
                      report_dir: Path) -> dict[str, Path | None]:
    """The job's DVC plot CSVs and its figures (SAR curves, examples, attention)."""

    name = result["job"]
    write_plot_data(result, plots_dir)
    figs: dict[str, Path | None] = {
        "SAR curves (shen 2020, Figs 7-8)": plot_sar_curves(result, report_dir / "sar_curves.png", title=name),
        "Examples: clean, NPS noise, optimised NPS perturbation, PGD": plot_examples(
            visuals, report_dir / "examples.png", spatial_dims=int(model.spatial_dims), title=name),
    }
    ex = visuals.get("examples") or []
    if ex and "pgd" in ex[0] and has_conv_layers(model):
        # attention on the clean sample vs its PGD example (or its optimised NPS image)
        e = next((e for e in ex if (e["scores"]["pgd"] > 0.5) != (e["scores"]["clean"] > 0.5)), ex[0])
        attacked = e["pgd"] if (e["scores"]["pgd"] > 0.5) != (e["scores"]["clean"] > 0.5) else e["optimized"]
        figs["Attention (shen 2020, section 2.4): clean vs attacked"] = save_attention_figure(
            model, e["clean"][None], attacked[None], report_dir / "attention.png",
            titles=("clean", "attacked"),
        )
    return figs


def log_to_mlflow(params: dict[str, Any], result: dict[str, Any], files: Sequence[Path | None],
                  outcomes: Path | None = None) -> str | None:
    """Log the job's headline metrics, result JSON, per-sample outcomes (``robustness/outcomes.json``,
    what champion promotion pairs) and report files to its MLflow training run."""
    import mlflow

    run_id = result["model"].get("mlflow_run_id")
    if not run_id:
        return None
    configure(tracking_from_params(params))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(headline_metrics(result))
        mlflow.log_dict(result, f"{ROBUSTNESS_ARTIFACTS}/result.json")
        if outcomes is not None:
            mlflow.log_dict(load_json(outcomes), OUTCOMES_ARTIFACT)
        for f in files:
            if f is not None and Path(f).is_file():
                mlflow.log_artifact(str(f), ROBUSTNESS_ARTIFACTS)
        mlflow.set_tag("ctharden.robustness.sanity_passed", str(result["sanity_passed"]))
    return str(run_id)


def write_report(rep: Path, results: dict[str, dict[str, Any]],
                 job_figures: dict[str, dict[str, Path | None]], profile: str | None = None,
                 baselines: dict[str, dict[str, Any]] | None = None,
                 verdicts: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
    """Shared figures, the HTML report (``rep/index.html``) and the markdown summary for all
    evaluated models (``results`` and ``job_figures`` keyed by the same names). With ``baselines``
    (hardened models), every model also gets the baseline-vs-hardened tables; ``verdicts`` (gate
    records, :func:`ctharden.gate.criteria.check`) open the report."""

    shared = {
        "SAN/N vs mAs": plot_san_vs_mas(results, rep / "san_vs_mas.png"),
        "Robust accuracy vs ε": plot_robust_accuracy(results, rep / "robust_accuracy.png"),
    }
    notes = [
        f"profile {profile}; NPS attacks count a sample as attacked when its fp32 label changes; "
        "PGD ε in model-input units ([0, 1]) and HU; every sanity check runs with the evaluation.",
    ]
    for name, res in results.items():
        for attack, cap in (res["settings"].get("planned_caps") or {}).items():
            notes.append(f"{name}: the {attack} attack's sample cap per split is "
                         + ("none (every sample)" if cap is None else f"{cap}") + ", set by the gate's sample planner "
                         "(the n that decides its criteria; `ctharden gate plan`).")
        if res["settings"].get("hu_per_unit") and res["model"]["config"].get("window_hu") is None:
            notes.append(f"{name}: images carry no HU; noise is added in HU through an assumed display window of "
                         f"{res['settings']['hu_per_unit']:g} HU per unit and "
                         f"{res['settings']['spacing_mm']:.3g} mm pixels.")
    comparisons = {}
    for name, res in results.items():
        if baselines and name in baselines and res.get("hardening"):
            h = res["hardening"]
            eps = f" ε={h['eps']:.4g}" if h.get("eps") is not None else ""
            comparisons[name] = comparison_tables(baselines[name], res, f"hardened ({h['method']}{eps})")
    title = "ctharden robustness report" + (": baseline vs hardened" if baselines else "")
    html_path = atomic_write_text(rep / "index.html", render_html(results, {"": shared, **job_figures}, notes=notes,
                                                                   comparisons=comparisons, title=title,
                                                                   verdicts=verdicts))
    md_path = atomic_write_text(rep / "summary.md", summary_markdown(
        results, html_path, comparisons,
        title="Robustness: baseline vs hardened" if baselines else "Robustness evaluation", verdicts=verdicts))
    return {"html": html_path, "summary": md_path, **{k: v for k, v in shared.items() if v is not None}}


def evaluation_plan(params: dict[str, Any], jobs: list[str] | None = None, variant: str = "baseline"
                    ) -> tuple[list[str], dict[str, Any] | None]:
    """The jobs to evaluate (default: every training job) and, for ``variant="hardened"``, the
    baseline metrics they are compared with; bad settings and missing baselines fail here, before
    any work."""

    names = jobs or job_names(params)
    for job in names:
        job_settings(params, job)
    evaluation_paths(params, variant)
    if variant != "hardened":
        return names, None
    base_path = evaluation_paths(params)["metrics"]
    if not base_path.is_file():
        raise DataError(f"evaluate the baselines first ({base_path} not found: run `ctharden stage evaluate`)")
    baselines = load_json(base_path)
    missing = [j for j in names if j not in baselines]
    if missing:
        raise DataError(f"{base_path} has no baseline evaluation of {missing}: run `ctharden stage evaluate`")
    return names, baselines


def write_evaluation(params: dict[str, Any], evaluated: dict[str, tuple[dict[str, Any], dict[str, Any], CTClassifier]],
                     *, variant: str = "baseline", jobs: list[str] | None = None, log_mlflow: bool = True,
                     baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every output of the evaluation from ``{job: (result, visuals, model)}`` (job order
    kept): per-job plot data and figures, the report, MLflow logging, and ``metrics`` last.
    ``jobs`` (a subset was evaluated) keeps the other jobs' last metrics. Returns
    :func:`run_evaluation`'s dict."""
    paths = evaluation_paths(params, variant)
    results: dict[str, dict[str, Any]] = {}
    figures: dict[str, dict[str, Path | None]] = {}
    headlines: dict[str, dict[str, float]] = {}
    outcome_files: dict[str, Path] = {}
    for job, (result, visuals, model) in evaluated.items():
        figures[job] = write_job_figures(result, visuals, model, paths["plots"] / job, paths["reports"] / job)
        if variant == "hardened":
            reps = harden_paths(params, job)["reports"]
            for key, fname in (("Hardening methods: 100-PGD accuracy vs ε (ma 2020, Figs. 6-9)",
                                f"methods_{result['hardening']['norm']}.png"),
                               ("IMA margin distribution per epoch (ma 2020, Fig. 9)", "ima_margins.png")):
                if (reps / fname).is_file():
                    figures[job][key] = reps / fname
        outcome_files[job] = atomic_write_json(outcomes_path(params, variant, job), {
            "job": job, "variant": variant, "dataset_hash": result["dataset_hash"],
            "model_sha256": sha256_file(result["model"]["file"]), **result.pop("outcomes", {})})
        headline, mas = headline_metrics(result), result["settings"]["mas_levels"]
        headlines[job] = headline
        result["trends"] = nps_trends(headline, mas, result["settings"]["splits"])
        if baselines and job in baselines:
            result["trends"].update(hardening_trends(baselines[job]["headline"], headline, mas,
                                                     tune_settings(params, job).max_auc_drop))
        results[job] = result
    verdicts = {job: check(headlines[job], gate_settings(params, job), r["intervals"]) for job, r in results.items()}
    report = write_report(paths["reports"], results, figures, params.get("profile"), baselines, verdicts)
    if log_mlflow:
        for job, result in results.items():
            files = [report["html"], report["summary"], *figures[job].values()]
            result["mlflow_run_id"] = log_to_mlflow(params, result, files, outcome_files[job])
    metrics = {job: {"headline": headlines[job], **r} for job, r in results.items()}
    if jobs and paths["metrics"].is_file():  # a subset of the jobs: keep the others' last metrics
        metrics = {**load_json(paths["metrics"]), **metrics}
    atomic_write_json(paths["metrics"], metrics)
    return {"metrics": metrics, "report": {k: str(v) for k, v in report.items()}}


def run_evaluation(params: dict[str, Any], jobs: list[str] | None = None, *, log_mlflow: bool = True,
                   variant: str = "baseline") -> dict[str, Any]:
    """Evaluate ``jobs`` (default: every training job) and write all outputs; returns the metrics.

    ``variant="hardened"`` evaluates the harden stage's models the same way, and the report puts
    each next to its baseline (from the baseline evaluation's metrics) with the hardening methods'
    accuracy-vs-ε plot. :func:`ctharden.flows.fanout.evaluate_fanout` is the same with the
    evaluation units spread over a Dask cluster."""
    names, baselines = evaluation_plan(params, jobs, variant)
    evaluated: dict[str, tuple[dict[str, Any], dict[str, Any], CTClassifier]] = {}
    for job in names:
        result, visuals, model, _ = evaluate_job(params, job, variant)
        evaluated[job] = (result, visuals, model)
    return write_evaluation(params, evaluated, variant=variant, jobs=jobs, log_mlflow=log_mlflow,
                            baselines=baselines)


def run(params: dict[str, Any], name: str = "baseline", jobs: list[str] | None = None, *,
        log_mlflow: bool = True) -> EvaluateResult:
    """The evaluate stage for variant ``name`` (``baseline``: the ``evaluate`` stage, ``hardened``:
    ``evaluate_hardened``) of ``jobs`` (default: every training job)."""
    out = run_evaluation(params, jobs, log_mlflow=log_mlflow, variant=name)
    return EvaluateResult(STAGE[name], name, out["metrics"], evaluation_paths(params, name)["metrics"], out["report"])
