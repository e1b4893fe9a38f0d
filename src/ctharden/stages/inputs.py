"""What several stages share: a job's trained (or hardened) models and the one check that its
dataset is validated and unchanged since the model was trained on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ctharden.config.jobs import job_config
from ctharden.config.paths import dataset_dir, harden_paths, train_paths, validation_dir
from ctharden.core.errors import DataError
from ctharden.core.io import load_json
from ctharden.data.arrays import ArraySet, load_arrayset
from ctharden.data.dataset import read_info
from ctharden.data.validation import require_validated
from ctharden.models import CTClassifier
from ctharden.models.files import load_model


def trained_dataset(params: dict[str, Any], job: str, summary: dict[str, Any]) -> tuple[str, Path, dict[str, Any]]:
    """``(name, directory, dataset.json)`` of the job's dataset, after checking that it passed its
    validation as it is now and is the dataset the model was trained on (``summary["dataset_hash"]``)."""
    name = job_config(params, job)["dataset"]
    ds_dir = dataset_dir(params, name)
    require_validated(ds_dir, validation_dir(params, name))
    info = read_info(ds_dir)
    if info["content_hash"] != summary["dataset_hash"]:
        raise DataError(f"job {job!r} was trained on dataset {summary['dataset_hash'][:12]} but {ds_dir} is now "
                        f"{info['content_hash'][:12]}: re-run `ctharden stage train {job}` first")
    return name, ds_dir, info


def load_job_models(params: dict[str, Any], job: str, variant: str = "baseline"
                    ) -> tuple[CTClassifier, list[CTClassifier], dict[str, Any]]:
    """The job's selected model, its other fold models and its training summary; for
    ``variant="hardened"`` the hardened model and the harden stage's summary (no fold models)."""
    if variant == "hardened":
        path = harden_paths(params, job)["metrics"]
        if not path.is_file():
            raise DataError(f"job {job!r} has not been hardened: {path} not found (run `ctharden stage harden {job}`)")
        summary = load_json(path)
        model_file = Path(summary["model_file"])
        if not model_file.is_file():
            raise DataError(f"job {job!r}: hardened model {model_file} not found "
                            f"(re-run `ctharden stage harden {job}`)")
        return load_model(model_file)[0], [], summary
    dirs = train_paths(params, job)
    if not dirs["metrics"].is_file():
        raise DataError(f"job {job!r} has not been trained: {dirs['metrics']} not found "
                        f"(run `ctharden stage train {job}`)")
    summary = load_json(dirs["metrics"])
    model_file = Path(summary["model_file"])
    if not model_file.is_file():
        raise DataError(f"job {job!r}: model file {model_file} not found (re-run `ctharden stage train {job}`)")
    model, _ = load_model(model_file)
    others: list[CTClassifier] = []
    for f in summary["folds"]:
        if f["fold"] != summary["selected_fold"]:
            path = dirs["models"] / f"fold{f['fold']}" / "model.pt"
            if path.is_file():
                others.append(load_model(path)[0])
    return model, others, summary




def load_baseline(params: dict[str, Any], job: str) -> tuple[nn.Module, dict[str, Any], ArraySet]:
    """The job's selected baseline model, its training summary and its whole dataset in the
    model's input units, loaded once (checked with :func:`trained_dataset`)."""
    model, _, summary = load_job_models(params, job)
    _, ds_dir, _ = trained_dataset(params, job, summary)
    return model, summary, load_arrayset(ds_dir, model)

