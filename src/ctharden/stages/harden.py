"""The ``harden`` stage: harden every job's baseline with its method and tuned ε, compare methods.

For each job: the training ε comes from ``harden.eps`` or, when that is null, from the tune stage
(``metrics/tune/<job>.json``); the baseline is fine-tuned with ``harden.method``
(:func:`ctharden.hardening.methods.harden_model`) and saved to ``artifacts/hardened/<job>/model.pt``
(the ``evaluate_hardened`` stage evaluates it exactly like the baseline). Every method in
``harden.compare`` is trained the same way and, with the baseline ("ce") and the hardened model,
attacked by 100-PGD at the job's evaluation ε list on the same test samples: the accuracy-vs-ε
curves of every method on one plot (ma 2020, Figs. 6-9). Outputs: ``metrics/harden/<job>.json``
(shaped like a training summary, so the evaluation loads it the same way), the plot and a table
under ``reports/harden/<job>/``, and an MLflow run ``harden-<job>`` with the model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ctharden.attacks.pgd import normalized_area
from ctharden.attacks.sanity import pgd_accuracy
from ctharden.config.hardening import EPS_METHODS, harden_settings
from ctharden.config.jobs import job_config
from ctharden.config.params import section
from ctharden.config.paths import harden_paths, tune_paths
from ctharden.config.robustness import RobustnessSettings, job_settings
from ctharden.core.errors import DataError
from ctharden.core.io import atomic_write_json, atomic_write_text, load_json
from ctharden.core.seeding import derive_seed
from ctharden.hardening.methods import HardenData, clean_auc, harden_model, hardening_data, noise_context, subset
from ctharden.models.files import save_model
from ctharden.noise.config import noise_model
from ctharden.reporting.plots import plot_margins, plot_method_curves
from ctharden.reporting.report import markdown_table
from ctharden.stages.inputs import load_baseline
from ctharden.stages.result import HardenResult
from ctharden.tracking.runs import MODEL_FILE_ARTIFACT, configure, log_pytorch_model, tracking_from_params

log = logging.getLogger(__name__)
STAGE = "harden"
BASELINE = "ce (baseline)"


def chosen_eps(params: dict[str, Any], job: str) -> tuple[float | None, str]:
    """The training ε and where it came from (``params`` or ``tune``)."""

    hs = harden_settings(params, job)
    if hs.eps is not None or hs.method not in EPS_METHODS:
        return hs.eps, "params"
    path = tune_paths(params, job)["metrics"]
    if not path.is_file():
        raise DataError(f"job {job!r}: no training ε: set harden.eps or run `ctharden stage tune {job}` "
                        f"({path} missing)")
    tuned = load_json(path)
    if tuned.get("method") != hs.method or tuned.get("eps") is None:
        raise DataError(f"{path} tuned ε for method {tuned.get('method')!r}, not {hs.method!r}: re-run the tune stage")
    return float(tuned["eps"]), "tune"


def curves_markdown(curves: dict[str, dict[str, Any]], norm: str) -> str:
    """One row per method: clean AUC, accuracy at each ε, normalised area."""

    eps = next(iter(curves.values()))["eps"]
    rows = [[name, f"{c['eps_train']:.4g}" if c.get("eps_train") is not None else "–", f"{c['clean_auc']:.3f}",
             *[f"{a:.3f}" for a in c["accuracy"]], f"{c['auc']:.3f}"] for name, c in curves.items()]
    return markdown_table(["method", "training ε", "test AUC", *[f"{norm} {e:g}" for e in eps], "area"], rows)


def harden_job(params: dict[str, Any], job: str, *, log_mlflow: bool = True) -> dict[str, Any]:
    """Harden ``job``'s baseline and compare methods; writes ``metrics/harden/<job>.json``."""
    import mlflow

    t0 = time.perf_counter()
    hs = harden_settings(params, job)
    eps, eps_source = chosen_eps(params, job)
    seed = int(section(params, "seed"))
    paths = harden_paths(params, job)
    baseline, summary, full = load_baseline(params, job)
    data = hardening_data(full, int(summary["selected_fold"]))
    width = int(data.train.x.shape[-1])
    rs = job_settings(params, job).for_width(width)
    # a cap the evaluation leaves to the gate's planner is, in the harden stage's comparisons (the
    # adaptive-training Tables 4-5), the stage's own comparison cap
    rs = rs.with_caps(dict.fromkeys(rs.planned, hs.compare_max_samples))
    methods = list(dict.fromkeys([hs.method, *hs.compare]))
    noise = noise_context(params, job, baseline, width) if "nps" in methods else None
    adaptive_ctx = _adaptive_context(params, job, data, rs) if "adaptive" in methods else None
    eval_eps = [0.0, *getattr(rs.pgd, hs.norm)]
    test = subset(data.test, hs.compare_max_samples, derive_seed(seed, 70))

    def curve(model: torch.nn.Module, eps_train: float | None, **extra: Any) -> dict[str, Any]:
        acc = pgd_accuracy(model, test.x, test.y, eval_eps, norm=hs.norm, steps=rs.pgd.steps, loss=rs.pgd.loss,
                           autocast=rs.pgd.autocast)
        return {"eps": eval_eps, "accuracy": acc, "auc": normalized_area(eval_eps, acc), "eps_train": eps_train,
                "clean_auc": clean_auc(model, data.test), **extra}

    if log_mlflow:
        configure(tracking_from_params(params))
    parent = mlflow.start_run(run_name=f"harden-{job}") if log_mlflow else None
    try:
        curves: dict[str, dict[str, Any]] = {BASELINE: curve(baseline, None)}
        infos: dict[str, Any] = {}
        hardened = None
        for m in methods:
            # the tuned ε belongs to harden.method; a compared IMA keeps its own ε_max
            m_eps = None if (m == "ima" and m != hs.method) else eps
            model, info = harden_model(baseline, m, m_eps, data, hs, seed=seed, noise=noise,
                                       adaptive_context=adaptive_ctx)
            infos[m] = info
            label = f"{m} {info['eps']:.4g}" if info.get("eps") is not None else m
            curves[label] = curve(model, info.get("eps"), hardened=m == hs.method, method=m)
            if m == hs.method:
                hardened = model
            log.info("harden %s: %s trained in %.0f s", job, label, info["seconds"])
        assert hardened is not None
        model_file = save_model(paths["models"] / "model.pt", hardened, meta={
            "job": job, "method": hs.method, "eps": infos[hs.method].get("eps"), "norm": hs.norm,
            "dataset_hash": data.info["content_hash"], "baseline_model": summary["model_file"],
            "baseline_run_id": summary["mlflow"]["run_id"], "selected_fold": summary["selected_fold"]})
        fig = plot_method_curves(curves, paths["reports"] / f"methods_{hs.norm}.png",
                                 title=f"{job}: 100-PGD accuracy of every method ({hs.norm}, {len(test)} test samples)",
                                 baseline=BASELINE)
        table = curves_markdown(curves, hs.norm)
        atomic_write_text(paths["reports"] / "methods.md", f"# {job}: hardening methods\n\n{table}\n")
        if "adaptive" in infos:
            atomic_write_text(paths["reports"] / "adaptive.md", infos["adaptive"]["tables_markdown"] + "\n")
        if "ima" in infos:
            plot_margins([np.asarray(h) for h in infos["ima"]["margin_history"]], infos["ima"]["eps"],
                         paths["reports"] / "ima_margins.png", title=f"{job}: IMA margins per epoch")
        result = {
            "job": job, "method": hs.method, "eps": infos[hs.method].get("eps"), "eps_source": eps_source,
            "norm": hs.norm, "dataset": summary["dataset"], "dataset_hash": data.info["content_hash"],
            "arch": summary["arch"], "model_file": str(model_file), "selected_fold": summary["selected_fold"],
            "folds": [{"fold": summary["selected_fold"]}], "baseline": {
                "model_file": summary["model_file"], "mlflow_run_id": summary["mlflow"]["run_id"]},
            "n_train": len(data.train), "n_test_attacked": len(test), "curves": curves,
            "training": {m: {k: v for k, v in i.items() if k not in ("margins", "margin_history")}
                         for m, i in infos.items()},
            "settings": hs.to_dict(), "seconds": round(time.perf_counter() - t0, 1),
            "mlflow": {"run_id": parent.info.run_id if parent is not None else None},
        }
        if parent is not None:
            mlflow.log_params({"job": job, "method": hs.method, "eps": result["eps"], "eps_source": eps_source,
                               "norm": hs.norm, "epochs": hs.epochs, "lr": hs.lr})
            mlflow.set_tags({"ctharden.job": job, "ctharden.stage": "harden", "ctharden.method": hs.method,
                             "ctharden.dataset_hash": data.info["content_hash"],
                             "ctharden.baseline_run_id": summary["mlflow"]["run_id"]})
            for i, rec in enumerate(infos[hs.method].get("history") or []):
                mlflow.log_metrics({k: v for k, v in rec.items() if k != "epoch" and np.isfinite(v)}, step=i)
            for name, c in curves.items():
                key = name.split(" ")[0] if name != BASELINE else "baseline"
                mlflow.log_metric(f"compare_{key}_pgd_{hs.norm}_area", c["auc"])
            mlflow.log_artifact(str(model_file), MODEL_FILE_ARTIFACT)
            mlflow.log_artifact(str(fig), "harden")
            mlflow.log_artifact(str(paths["reports"] / "methods.md"), "harden")
            log_pytorch_model(hardened, test.x[:2])
            mlflow.log_dict(result, "harden/result.json")
    finally:
        if parent is not None:
            mlflow.end_run()
    atomic_write_json(paths["metrics"], result)
    return result


def _adaptive_context(params: dict[str, Any], job: str, data: HardenData, rs: RobustnessSettings) -> dict[str, Any]:
    """Arguments of :func:`ctharden.hardening.adaptive.adaptive_train` for this job (the whole
    dataset as the stage loaded it: no second load)."""
    cfg = job_config(params, job)
    return {"data": data.full, "settings": rs, "nps": noise_model(params), "loss": str(cfg.get("loss", "mse"))}


def run(params: dict[str, Any], name: str) -> HardenResult:
    """The harden stage for job ``name`` (bad settings fail before any work)."""
    job_config(params, name)
    harden_settings(params, name)
    return HardenResult(STAGE, name, harden_job(params, name), harden_paths(params, name)["metrics"])
