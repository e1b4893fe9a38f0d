"""A training job: k-fold cross-validation of one architecture on one validated dataset, tracked in MLflow.

Protocol (shen 2020, section 2.6): the dataset's held-out test split is never touched during
training; for each fold k the model trains on the other training folds and is selected on fold k
(best validation AUC by default); each fold's selected model is then evaluated on the test split
and the test metrics are reported as mean ± std over folds (Table 1). The job's final model (what
evaluation, hardening and the registry use) is the fold model with the best validation score.

MLflow: one parent run per job (all resolved params, dataset version, system metrics, the final
model in pt2 format with signature and input example, its state_dict model file, plots) and one
nested run per fold (per-epoch metrics, the fold's model file). Outputs on disk:
``artifacts/models/<job>/`` (model files), ``artifacts/checkpoints/<job>/`` (resumable state, git-ignored and not a DVC
output so that DVC never deletes it before a re-run),
``reports/train/<job>/`` (PNG plots, Table-1-style markdown), ``plots/train/<job>/`` (ROC and
predictions CSV for ``dvc plots``), ``metrics/train/<job>.json``.

Steps: :func:`prepare_training` (config, validated data, parent run) -> :func:`train_one_fold` per
fold (seeded by ``init_seed(seed, k)``, so folds are independent and may run in other processes:
:func:`ctharden.flows.fanout.train_fanout`) -> :func:`finish_training` (selection, final model,
plots, summary; ends the parent run). :func:`run_training_job` runs the folds one after another.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctharden.config.jobs import job_config
from ctharden.config.params import section
from ctharden.config.paths import dataset_dir, train_paths, validation_dir
from ctharden.config.schema import TrainJob as JobSchema
from ctharden.config.schema import validate_section
from ctharden.core.device import select_runtime, set_threads
from ctharden.core.io import atomic_write_json, atomic_write_text
from ctharden.core.seeding import init_seed
from ctharden.data.arrays import ArraySet, load_arrayset
from ctharden.data.dataset import read_info, task_spec
from ctharden.data.validation import require_validated
from ctharden.data.version import data_version
from ctharden.evaluation.clean import aggregate_folds, binary_metrics, format_table, labels_from_scores
from ctharden.models import build_model
from ctharden.models.files import load_model, save_model
from ctharden.models.predict import predict_scores
from ctharden.models.wrapper import DEFAULT_WINDOW_HU
from ctharden.reporting.plots import plot_confusion, plot_roc, write_dvc_plots
from ctharden.stages.result import TrainResult
from ctharden.tracking.runs import MODEL_FILE_ARTIFACT, configure, flatten, log_pytorch_model, tracking_from_params
from ctharden.training.loop import TrainConfig, selection_score, train_fold

log = logging.getLogger(__name__)
STAGE = "train"
_LOOP_KEYS = set(TrainConfig.__dataclass_fields__) - {"seed"}


def build_job_model(cfg: dict[str, Any], task: str, seed: int) -> torch.nn.Module:
    """The job's architecture for ``task``, initialised from ``seed``."""

    torch.manual_seed(seed)
    spec = task_spec(task)
    window = cfg.get("window_hu", DEFAULT_WINDOW_HU if spec.units == "HU" else None)
    return build_model(
        cfg["arch"], spatial_dims=spec.ndim,
        window_hu=tuple(window) if window is not None else None, **(cfg.get("arch_kwargs") or {}),
    )


def _loop_config(cfg: dict[str, Any], seed: int) -> TrainConfig:
    """The loop knobs of a merged job config, validated by the schema
    (:class:`~ctharden.config.schema.TrainJob`); keys the job does not set keep :class:`TrainConfig`'s defaults."""
    job = validate_section(JobSchema, cfg, ("train",))
    return TrainConfig(seed=seed, **job.model_dump(include=_LOOP_KEYS & job.model_fields_set))


def _evaluate(model: torch.nn.Module, data: ArraySet, runtime: Any) -> tuple[dict[str, Any], np.ndarray]:
    _, scores = predict_scores(model, data.x, runtime)
    return binary_metrics(data.y.numpy(), scores), scores


@dataclass
class TrainJob:
    """A training job's resolved inputs: config, validated data, folds; after
    :func:`prepare_training` also its parent MLflow run (``run_id``) and start time."""

    job: str
    cfg: dict[str, Any]
    seed: int
    dataset: str
    info: dict[str, Any]  # dataset.json
    validation: dict[str, Any]
    loop_cfg: TrainConfig
    runtime: Any  # ctharden.core.device.Runtime
    threads: int
    dirs: dict[str, Path]
    data: ArraySet  # the whole dataset in model-input units
    split: np.ndarray  # (N,) "train"/"test"
    fold_col: np.ndarray  # (N,) fold of each training sample
    test: ArraySet
    n_folds: int
    folds: list[int]  # the folds this job trains
    profile: str | None
    data_version: dict[str, Any] | None = None
    run_id: str = ""  # the parent MLflow run, once started
    experiment_id: str | None = None
    tracking_uri: str | None = None
    t0: float = 0.0

    @property
    def task(self) -> str:
        return str(self.info["task"])


@dataclass
class FoldRecord:
    """One trained fold: its summary row (``fold``, ``best_epoch``, ``val``/``test`` metrics,
    ``mlflow_run_id``, ``history``) and its model's positive scores on the test split ``(n_test,)``."""

    info: dict[str, Any]
    test_scores: np.ndarray


def load_train_job(params: dict[str, Any], job: str) -> TrainJob:
    """Resolve job ``job``'s config and load its validated dataset (no MLflow); sets torch's threads."""
    cfg = job_config(params, job)
    seed = int(section(params, "seed"))
    ds_name = str(cfg["dataset"])
    ds_dir = dataset_dir(params, ds_name)
    validation = require_validated(ds_dir, validation_dir(params, ds_name))
    info = read_info(ds_dir)
    loop_cfg = _loop_config(cfg, seed)
    runtime = select_runtime(str(cfg.get("device", "auto")), str(cfg.get("precision", "auto")))
    threads = set_threads(cfg.get("threads", "auto"))
    probe = build_job_model(cfg, info["task"], seed)
    data = load_arrayset(ds_dir, probe)
    split = data.split
    n_folds = int(info["split"]["n_folds"])
    want = cfg.get("folds", "all")
    return TrainJob(
        job=job, cfg=cfg, seed=seed, dataset=ds_name, info=info, validation=validation, loop_cfg=loop_cfg,
        runtime=runtime, threads=threads, dirs=train_paths(params, job), data=data, split=split,
        fold_col=data.fold, test=data.subset(split == "test"), n_folds=n_folds,
        folds=list(range(n_folds if want == "all" else min(int(want), n_folds))), profile=params.get("profile"),
    )


def prepare_training(params: dict[str, Any], job: str) -> TrainJob:
    """:func:`load_train_job`, then start the job's parent MLflow run (left active in the calling
    thread) and log its params, tags and dataset record. End it with :func:`finish_training` or
    :func:`abort_training`."""
    import mlflow

    ctx = load_train_job(params, job)
    ctx.data_version = data_version(params)
    tracking = tracking_from_params(params)
    ctx.experiment_id, ctx.tracking_uri = configure(tracking), tracking.uri
    ctx.t0 = time.perf_counter()
    cfg, info = ctx.cfg, ctx.info
    parent = mlflow.start_run(run_name=f"train-{job}", log_system_metrics=bool(cfg.get("log_system_metrics", True)))
    ctx.run_id = parent.info.run_id
    try:
        mlflow.log_params(flatten({"job": job, **cfg, "seed": ctx.seed, "profile": params.get("profile")}))
        mlflow.log_dict(params, "params_resolved.json")
        mlflow.set_tags({
            "ctharden.job": job, "ctharden.task": ctx.task, "ctharden.dataset": ctx.dataset,
            "ctharden.dataset_hash": info["content_hash"],
            "ctharden.data_dvc_md5": str(ctx.data_version["data_dvc_md5"]),
            "ctharden.runtime": ctx.runtime.name, "ctharden.threads": str(ctx.threads),
            "ctharden.validated": str(ctx.validation.get("success")),
        })
        mlflow.log_dict(info, "dataset.json")
    except BaseException:
        abort_training(ctx)
        raise
    return ctx
def train_one_fold(params: dict[str, Any], job: str, fold: int, parent_run_id: str, *, progress: bool = False,
                   context: TrainJob | None = None) -> FoldRecord:
    """Train fold ``fold`` of job ``job`` (trains on the other training folds, selects on this one),
    save ``<models>/fold<k>/model.pt`` and log a nested MLflow run under ``parent_run_id``.

    Runs in any thread or process: the parent run is named explicitly (MLflow's active run is per
    thread). ``context``: the job's :class:`TrainJob` when already loaded in this process."""
    import mlflow

    if context is None:
        context = load_train_job(params, job)
        configure(tracking_from_params(params))
    ctx = context
    info, split, test = ctx.info, ctx.split, ctx.test
    if ctx.n_folds == 1:
        tr, va = ctx.data.subset(split == "train"), None
    else:
        tr = ctx.data.subset((split == "train") & (ctx.fold_col != fold))
        va = ctx.data.subset((split == "train") & (ctx.fold_col == fold))
    model = build_job_model(ctx.cfg, ctx.task, init_seed(ctx.seed, fold))
    with mlflow.start_run(run_name=f"{job}-fold{fold}", nested=True, parent_run_id=parent_run_id) as fold_run:
        mlflow.log_params({"fold": fold, "n_train": len(tr), "n_val": len(va) if va else 0, "n_test": len(test)})
        result = train_fold(
            model, tr, va, ctx.loop_cfg, ctx.runtime, ctx.dirs["checkpoints"] / f"fold{fold}" / "last.pt",
            fold=fold, data_hash=info["content_hash"], progress=progress,
            on_epoch=lambda e, m: _log_epoch(m, e),
        )
        model.load_state_dict(result.best_state)
        val_m = _evaluate(model, va, ctx.runtime)[0] if va else None
        test_m, test_scores = _evaluate(model, test, ctx.runtime)
        model_path = save_model(ctx.dirs["models"] / f"fold{fold}" / "model.pt", model,
                                meta={"job": job, "fold": fold, "dataset_hash": info["content_hash"],
                                      "best_epoch": result.best_epoch, "mlflow_run_id": fold_run.info.run_id})
        mlflow.log_artifact(str(model_path), MODEL_FILE_ARTIFACT)
        final = {f"test_{n}": v for n, v in test_m.items() if isinstance(v, (int, float))}
        if val_m:
            final.update({f"val_{n}": v for n, v in val_m.items() if isinstance(v, (int, float))})
        mlflow.log_metrics({**final, "best_epoch": result.best_epoch})
    row = {"fold": fold, "best_epoch": result.best_epoch, "resumed_from_epoch": result.resumed_from_epoch,
           "val": val_m, "test": test_m, "mlflow_run_id": fold_run.info.run_id, "history": result.history}
    return FoldRecord(row, test_scores)



def _log_epoch(metrics: dict[str, float], epoch: int) -> None:
    """One epoch's finite metrics to the active (fold) MLflow run."""
    import mlflow

    mlflow.log_metrics({n: v for n, v in metrics.items() if np.isfinite(v)}, step=epoch)


@contextlib.contextmanager
def _parent_run(ctx: TrainJob) -> Iterator[Any]:
    """The job's parent run as the active run of this thread, ended (FINISHED, or FAILED on an
    error) when the block exits."""
    import mlflow

    active = mlflow.active_run()
    run = active if active is not None and active.info.run_id == ctx.run_id else mlflow.start_run(run_id=ctx.run_id)
    with run:
        yield run


def abort_training(ctx: TrainJob) -> None:
    """End the job's parent run as FAILED (after an error between prepare and finish)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == ctx.run_id:
        mlflow.end_run("FAILED")
    elif ctx.run_id:
        mlflow.MlflowClient().set_terminated(ctx.run_id, "FAILED")


def finish_training(ctx: TrainJob, records: list[FoldRecord]) -> dict[str, Any]:
    """Select the fold, write the final model, plots, table and ``metrics/train/<job>.json``, log
    them to the parent run and end it; returns the job's summary. ``records`` in fold order."""
    import mlflow

    job, dirs, test, runtime = ctx.job, ctx.dirs, ctx.test, ctx.runtime
    per_fold = [r.info for r in records]
    fold_scores = {f"fold {r.info['fold']}": (test.y.numpy(), r.test_scores) for r in records}
    labels = [ctx.info["label_names"][k] for k in sorted(ctx.info["label_names"], key=int)]
    with _parent_run(ctx):
        selected = _select_fold(per_fold, ctx.loop_cfg)
        final_path = dirs["models"] / "model.pt"
        shutil.copyfile(dirs["models"] / f"fold{selected['fold']}" / "model.pt", final_path)
        final_model, _ = load_model(final_path)
        agg = aggregate_folds([f["test"] for f in per_fold])
        table = format_table([{"fold": f["fold"], **f["test"]} for f in per_fold], agg)
        final_test, final_scores = _evaluate(final_model, test, runtime)
        reports = dirs["reports"]
        plot_roc(fold_scores, reports / "roc_folds.png", title=f"{job}: test ROC per fold")
        plot_confusion(test.y.numpy(), labels_from_scores(final_scores), reports / "confusion.png", labels=labels,
                       title=f"{job}: selected model (fold {selected['fold']}) on test")
        write_dvc_plots(dirs["plots"], test.y.numpy(), final_scores, sample_ids=test.sample_ids)
        atomic_write_text(reports / "table.md", table + "\n")
        for png in ("roc_folds.png", "confusion.png", "table.md"):
            mlflow.log_artifact(str(reports / png), "plots")
        mlflow.log_artifact(str(final_path), MODEL_FILE_ARTIFACT)
        log_pytorch_model(final_model, test.x[:2])
        mlflow.log_metrics({f"test_{m}_{s}": v for m, d in agg.items() for s, v in d.items()
                            if s in ("mean", "std") and v is not None})
        mlflow.log_metrics({f"final_test_{n}": v for n, v in final_test.items() if isinstance(v, (int, float))})
        summary = {
            "job": job, "dataset": ctx.dataset, "task": ctx.task, "dataset_hash": ctx.info["content_hash"],
            "data_version": ctx.data_version, "arch": ctx.cfg["arch"], "model": final_model.config(),
            "runtime": runtime.name, "threads": ctx.threads, "profile": ctx.profile,
            "n_train_val": int((ctx.split == "train").sum()), "n_test": len(test),
            "folds": [{k: v for k, v in f.items() if k != "history"} for f in per_fold],
            "test_mean_std": agg, "selected_fold": selected["fold"], "final_test": final_test,
            "model_file": str(final_path), "seconds": round(time.perf_counter() - ctx.t0, 1),
            "mlflow": {"experiment_id": ctx.experiment_id, "run_id": ctx.run_id, "tracking_uri": ctx.tracking_uri},
        }
        mlflow.log_dict(summary, "summary.json")
    atomic_write_json(dirs["metrics"], summary)
    return summary


def run_training(params: dict[str, Any], job: str, train_folds: Callable[[TrainJob], list[FoldRecord]]
                 ) -> dict[str, Any]:
    """:func:`prepare_training`, ``train_folds(ctx)`` (every fold of ``ctx.folds``, records in that
    order), :func:`finish_training`; the parent run ends FAILED if a fold fails."""
    ctx = prepare_training(params, job)
    try:
        records = train_folds(ctx)
    except BaseException:
        abort_training(ctx)
        raise
    return finish_training(ctx, records)


def run_training_job(params: dict[str, Any], job: str, *, progress: bool = True) -> dict[str, Any]:
    """Run training job ``job`` end to end, its folds one after another; returns (and writes) its
    metrics summary. :func:`ctharden.flows.fanout.train_fanout` is the same with the folds spread
    over a Dask cluster."""
    def serial(ctx: TrainJob) -> list[FoldRecord]:
        return [train_one_fold(params, job, k, ctx.run_id, progress=progress, context=ctx) for k in ctx.folds]

    return run_training(params, job, serial)


def _select_fold(per_fold: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """The fold whose selected epoch scored best on its own validation fold, by the same rule that
    chose the epoch (:func:`~ctharden.training.loop.selection_score`); the first fold on a tie."""
    def key(f: dict[str, Any]) -> list[float]:
        best: dict[str, Any] = next((h for h in f["history"] if h["epoch"] == f["best_epoch"]), {})
        return selection_score(cfg, best)

    return max(per_fold, key=key)


def run(params: dict[str, Any], name: str, *, progress: bool = True) -> TrainResult:
    """The train stage for job ``name``: :func:`run_training_job` (folds one after another)."""
    summary = run_training_job(params, name, progress=progress)
    return TrainResult(STAGE, name, summary, train_paths(params, name)["metrics"])
