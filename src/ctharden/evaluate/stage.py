"""The ``evaluate`` stage: robustness evaluation of every trained job, one report for all of them.

What ``ctharden stage evaluate`` / ``ctharden evaluate`` / the flow's evaluate task run::

    results = run_evaluation(params)               # every job in train.jobs (or a list)

For each job: load its selected model (and the other fold models when ``models: folds``) from
``artifacts/models/<job>``, refuse a dataset whose validation record does not match it, run
:func:`~ctharden.evaluate.robustness.evaluate_robustness`, write the job's DVC plot data and
figures, and log metrics and files to the job's MLflow training run. Then, for all jobs together:
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

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctharden import pipeline
from ctharden.config import section
from ctharden.errors import DataError
from ctharden.evaluate.robustness import EvalData, evaluate_robustness, load_eval_data, model_set
from ctharden.evaluate.settings import RobustnessSettings, job_settings
from ctharden.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
ROBUSTNESS_ARTIFACTS = "robustness"
VARIANTS = ("baseline", "hardened")


def evaluation_paths(params: dict[str, Any], variant: str = "baseline") -> dict[str, Path]:
    """Where the stage writes: metrics JSON, plot data root, report directory (``robustness`` for
    the baselines, ``robustness_hardened`` for the hardened models)."""
    if variant not in VARIANTS:
        raise DataError(f"unknown evaluation variant {variant!r} (choose from {list(VARIANTS)})")
    name = "robustness" if variant == "baseline" else "robustness_hardened"
    return {
        "metrics": Path(section(params, "paths.metrics")) / f"{name}.json",
        "plots": Path(section(params, "paths.plots")) / name,
        "reports": Path(section(params, "paths.reports")) / name,
    }


def noise_model(params: dict[str, Any]) -> Any:
    """The NPS model configured under ``robustness.noise``."""
    from ctharden.noise import NoiseConfig

    return NoiseConfig.from_params(section(params, "robustness").get("noise")).build()


def load_job_models(params: dict[str, Any], job: str, variant: str = "baseline"
                    ) -> tuple[torch.nn.Module, list[torch.nn.Module], dict[str, Any]]:
    """The job's selected model, its other fold models and its training summary; for
    ``variant="hardened"`` the hardened model and the harden stage's summary (no fold models)."""
    from ctharden.checkpoint import load_model
    from ctharden.train.job import job_dirs

    if variant == "hardened":
        from ctharden.train.harden_stage import harden_paths

        path = harden_paths(params, job)["metrics"]
        if not path.is_file():
            raise DataError(f"job {job!r} has not been hardened: {path} not found (run `ctharden stage harden {job}`)")
        summary = pipeline.load_json(path)
        model_file = Path(summary["model_file"])
        if not model_file.is_file():
            raise DataError(f"job {job!r}: hardened model {model_file} not found (re-run `ctharden stage harden {job}`)")
        return load_model(model_file)[0], [], summary
    dirs = job_dirs(params, job)
    if not dirs["metrics"].is_file():
        raise DataError(f"job {job!r} has not been trained: {dirs['metrics']} not found (run `ctharden stage train {job}`)")
    summary = pipeline.load_json(dirs["metrics"])
    model_file = Path(summary["model_file"])
    if not model_file.is_file():
        raise DataError(f"job {job!r}: model file {model_file} not found (re-run `ctharden stage train {job}`)")
    model, _ = load_model(model_file)
    others = []
    for f in summary["folds"]:
        if f["fold"] != summary["selected_fold"]:
            path = dirs["models"] / f"fold{f['fold']}" / "model.pt"
            if path.is_file():
                others.append(load_model(path)[0])
    return model, others, summary


@dataclass
class EvalJob:
    """What one job's evaluation needs, loaded and checked (see :func:`prepare_job`)."""

    job: str
    variant: str
    dataset: str
    dataset_dir: Path
    model: torch.nn.Module  # the selected (or hardened) model
    fold_models: list[torch.nn.Module]
    summary: dict[str, Any]  # the training (or harden) stage's summary
    data: EvalData
    settings: RobustnessSettings
    seed: int
    nps: Any  # NPSModel
    profile: str | None

    @property
    def models(self) -> list[torch.nn.Module]:
        """The NPS attacks' models, the selected one first."""
        return model_set(self.model, self.fold_models, self.settings)


def prepare_job(params: dict[str, Any], job: str, variant: str = "baseline") -> EvalJob:
    """Check that the job's dataset is validated and unchanged since training, and load its
    models, data and settings."""
    import dataclasses

    from ctharden.data.validation import require_validated
    from ctharden.train.job import job_config

    cfg = job_config(params, job)
    ds_dir = pipeline.dataset_dir(params, cfg["dataset"])
    require_validated(ds_dir, pipeline.validation_dir(params, cfg["dataset"]))
    model, fold_models, summary = load_job_models(params, job, variant)
    data = load_eval_data(ds_dir, model)
    if data.info["content_hash"] != summary["dataset_hash"]:
        raise DataError(f"job {job!r} was trained on dataset {summary['dataset_hash'][:12]} but {ds_dir} is now "
                        f"{data.info['content_hash'][:12]}: re-run `ctharden stage train {job}` first")
    settings: RobustnessSettings = job_settings(params, job).for_width(int(data.x_attack.shape[-1]))
    if variant == "hardened":  # one hardened model (of the selected fold): compare with the baseline's selected model
        settings = dataclasses.replace(settings, models="selected")
    return EvalJob(job, variant, cfg["dataset"], ds_dir, model, fold_models, summary, data, settings,
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
                 ) -> tuple[dict[str, Any], dict[str, Any], torch.nn.Module, EvalData]:
    """Evaluate one trained (or hardened) job; returns ``(result, visuals, model, data)``."""
    t0 = time.perf_counter()
    ctx = prepare_job(params, job, variant)
    result, visuals = evaluate_robustness(ctx.model, ctx.data, ctx.settings, seed=ctx.seed,
                                          fold_models=ctx.fold_models, nps=ctx.nps)
    finish_job(ctx, result)
    log.info("evaluated %s in %.0f s", job, time.perf_counter() - t0)
    return result, visuals, ctx.model, ctx.data


def write_job_figures(result: dict[str, Any], visuals: dict[str, Any], model: torch.nn.Module, plots_dir: Path,
                      report_dir: Path) -> dict[str, Path | None]:
    """The job's DVC plot CSVs and its figures (SAR curves, examples, attention)."""
    from ctharden.evaluate.attention import save_attention_figure
    from ctharden.evaluate.report import plot_examples, plot_sar_curves, write_plot_data

    name = result["job"]
    write_plot_data(result, plots_dir)
    figs: dict[str, Path | None] = {
        "SAR curves (shen 2020, Figs 7-8)": plot_sar_curves(result, report_dir / "sar_curves.png", title=name),
        "Examples: clean, NPS noise, optimised NPS perturbation, PGD": plot_examples(
            visuals, report_dir / "examples.png", spatial_dims=int(model.spatial_dims), title=name),
    }
    ex = visuals.get("examples") or []
    if ex:
        # attention on the clean sample vs its PGD example (or its optimised NPS image)
        e = next((e for e in ex if (e["scores"]["pgd"] > 0.5) != (e["scores"]["clean"] > 0.5)), ex[0])
        attacked = e["pgd"] if (e["scores"]["pgd"] > 0.5) != (e["scores"]["clean"] > 0.5) else e["optimized"]
        figs["Attention (shen 2020, section 2.4): clean vs attacked"] = save_attention_figure(
            model, e["clean"][None], attacked[None], report_dir / "attention.png",
            titles=("clean", "attacked"),
        )
    return figs


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of one job (MLflow metric names; the gate reads the same values)."""
    out: dict[str, float] = {}
    for key, short in (("random_nps", "random"), ("optimized_nps", "optimized")):
        for split, block in result[key].items():
            for lv in block["levels"].values():
                out[f"robust_{short}_{split}_san_rate_mas{lv['mas']:g}"] = float(lv["san_rate"])
    for norm, c in result["pgd"].items():
        out[f"robust_pgd_{norm}_auc"] = float(c["auc"])
        for e, a in zip(c["eps"], c["accuracy"], strict=True):
            out[f"robust_pgd_{norm}_acc_eps{e:g}"] = float(a)
    out["robust_sanity_passed"] = float(result["sanity_passed"])
    if result["clean"].get("test", {}).get("auc") is not None:
        out["robust_clean_test_auc"] = float(result["clean"]["test"]["auc"])
    return out


def log_to_mlflow(params: dict[str, Any], result: dict[str, Any], files: list[Path]) -> str | None:
    """Log the job's headline metrics, result JSON and report files to its MLflow training run."""
    import mlflow

    from ctharden.tracking import configure, tracking_from_params

    run_id = result["model"].get("mlflow_run_id")
    if not run_id:
        return None
    configure(tracking_from_params(params))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(headline_metrics(result))
        mlflow.log_dict(result, f"{ROBUSTNESS_ARTIFACTS}/result.json")
        for f in files:
            if f is not None and Path(f).is_file():
                mlflow.log_artifact(str(f), ROBUSTNESS_ARTIFACTS)
        mlflow.set_tag("ctharden.robustness.sanity_passed", str(result["sanity_passed"]))
    return run_id


def write_report(rep: Path, results: dict[str, dict[str, Any]],
                 job_figures: dict[str, dict[str, Path | None]], profile: str | None = None,
                 baselines: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
    """Shared figures, the HTML report (``rep/index.html``) and the markdown summary for all
    evaluated models (``results`` and ``job_figures`` keyed by the same names). With ``baselines``
    (hardened models), every model also gets the baseline-vs-hardened tables."""
    from ctharden.evaluate.report import comparison_tables

    from ctharden.evaluate.report import plot_robust_accuracy, plot_san_vs_mas, render_html, summary_markdown

    shared = {
        "SAN/N vs mAs": plot_san_vs_mas(results, rep / "san_vs_mas.png"),
        "Robust accuracy vs ε": plot_robust_accuracy(results, rep / "robust_accuracy.png"),
    }
    notes = [
        f"profile {profile}; NPS attacks count a sample as attacked when its fp32 label changes; "
        "PGD ε in model-input units ([0, 1]) and HU; every sanity check runs with the evaluation.",
    ]
    for name, res in results.items():
        if res["settings"].get("hu_per_unit") and res["model"]["config"].get("window_hu") is None:
            notes.append(f"{name}: images carry no HU; noise is added in HU through an assumed display window of "
                         f"{res['settings']['hu_per_unit']:g} HU per unit and {res['settings']['spacing_mm']:.3g} mm pixels.")
    comparisons = {}
    for name, res in results.items():
        if baselines and name in baselines and res.get("hardening"):
            h = res["hardening"]
            eps = f" ε={h['eps']:.4g}" if h.get("eps") is not None else ""
            comparisons[name] = comparison_tables(baselines[name], res, f"hardened ({h['method']}{eps})")
    title = "ctharden robustness report" + (": baseline vs hardened" if baselines else "")
    html_path = atomic_write_text(rep / "index.html", render_html(results, {"": shared, **job_figures}, notes=notes,
                                                                   comparisons=comparisons, title=title))
    md_path = atomic_write_text(rep / "summary.md", summary_markdown(
        results, html_path, comparisons, title="Robustness: baseline vs hardened" if baselines else "Robustness evaluation"))
    return {"html": html_path, "summary": md_path, **{k: v for k, v in shared.items() if v is not None}}


def evaluation_plan(params: dict[str, Any], jobs: list[str] | None = None, variant: str = "baseline"
                    ) -> tuple[list[str], dict[str, Any] | None]:
    """The jobs to evaluate (default: every training job) and, for ``variant="hardened"``, the
    baseline metrics they are compared with; bad settings and missing baselines fail here, before
    any work."""
    from ctharden.train.job import job_names

    names = jobs or job_names(params)
    for job in names:
        job_settings(params, job)
    evaluation_paths(params, variant)
    if variant != "hardened":
        return names, None
    base_path = evaluation_paths(params)["metrics"]
    if not base_path.is_file():
        raise DataError(f"evaluate the baselines first ({base_path} not found: run `ctharden stage evaluate`)")
    baselines = pipeline.load_json(base_path)
    missing = [j for j in names if j not in baselines]
    if missing:
        raise DataError(f"{base_path} has no baseline evaluation of {missing}: run `ctharden stage evaluate`")
    return names, baselines


def write_evaluation(params: dict[str, Any], evaluated: dict[str, tuple[dict[str, Any], dict[str, Any], torch.nn.Module]],
                     *, variant: str = "baseline", jobs: list[str] | None = None, log_mlflow: bool = True,
                     baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every output of the evaluation from ``{job: (result, visuals, model)}`` (job order
    kept): per-job plot data and figures, the report, MLflow logging, and ``metrics`` last.
    ``jobs`` (a subset was evaluated) keeps the other jobs' last metrics. Returns
    :func:`run_evaluation`'s dict."""
    paths = evaluation_paths(params, variant)
    results: dict[str, dict[str, Any]] = {}
    figures: dict[str, dict[str, Path | None]] = {}
    for job, (result, visuals, model) in evaluated.items():
        figures[job] = write_job_figures(result, visuals, model, paths["plots"] / job, paths["reports"] / job)
        if variant == "hardened":
            from ctharden.train.harden_stage import harden_paths

            reps = harden_paths(params, job)["reports"]
            for key, fname in (("Hardening methods: 100-PGD accuracy vs ε (ma 2020, Figs. 6-9)",
                                f"methods_{result['hardening']['norm']}.png"),
                               ("IMA margin distribution per epoch (ma 2020, Fig. 9)", "ima_margins.png")):
                if (reps / fname).is_file():
                    figures[job][key] = reps / fname
        results[job] = result
    report = write_report(paths["reports"], results, figures, params.get("profile"), baselines)
    if log_mlflow:
        for job, result in results.items():
            files = [report["html"], report["summary"], *figures[job].values()]
            result["mlflow_run_id"] = log_to_mlflow(params, result, files)
    metrics = {job: {"headline": headline_metrics(r), **r} for job, r in results.items()}
    if jobs and paths["metrics"].is_file():  # a subset of the jobs: keep the others' last metrics
        metrics = {**pipeline.load_json(paths["metrics"]), **metrics}
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
    evaluated = {}
    for job in names:
        result, visuals, model, _ = evaluate_job(params, job, variant)
        evaluated[job] = (result, visuals, model)
    return write_evaluation(params, evaluated, variant=variant, jobs=jobs, log_mlflow=log_mlflow,
                            baselines=baselines)
