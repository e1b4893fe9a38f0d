"""Clean evaluation of a trained model on any dataset (external validation, e.g. domain shift).

``evaluate_model("models:/nodule@champion", "artifacts/datasets/ucsd")`` loads the model from any
reference (:func:`ctharden.tracking.runs.load_model_ref`), refuses a dataset that is invalid (its
validation record, or a fresh Great Expectations run into a temporary directory), checks that the
model fits the dataset's task, and computes AUC, accuracy, sensitivity and specificity.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ctharden.config.params import section
from ctharden.core.device import select_runtime
from ctharden.core.errors import DataError
from ctharden.data.arrays import load_arrayset
from ctharden.data.dataset import read_info
from ctharden.data.validation import ensure_valid, require_validated, validate_dataset
from ctharden.evaluation.clean import binary_metrics, labels_from_scores
from ctharden.evaluation.units import evaluate_robustness
from ctharden.models.predict import predict_scores
from ctharden.noise.config import noise_model
from ctharden.reporting.plots import plot_confusion, plot_roc, write_dvc_plots
from ctharden.stages.evaluate import evaluation_settings, write_job_figures, write_report
from ctharden.tracking.runs import load_model_ref

SPLITS = ("all", "train", "test")


def ensure_dataset_valid(dataset_dir: Path, validation_dir: Path | None) -> dict[str, Any]:
    """Return the dataset's validation record; validate it now (in a temp dir) when none is given."""

    if validation_dir is not None:
        return require_validated(dataset_dir, validation_dir)
    with tempfile.TemporaryDirectory(prefix="ctharden-validate-") as tmp:
        report = validate_dataset(dataset_dir, Path(tmp))
        ensure_valid(report)
        return {"success": True, "content_hash": report.content_hash}


def evaluate_model(
    model_ref: str,
    dataset_dir: str | Path,
    *,
    split: str = "all",
    validation_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "auto",
    plots_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Clean metrics of ``model_ref`` on ``dataset_dir`` (optionally one split); plots if ``plots_dir``."""

    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    dataset_dir = Path(dataset_dir)
    validation = ensure_dataset_valid(dataset_dir, Path(validation_dir) if validation_dir else None)
    info = read_info(dataset_dir)
    model, meta = load_model_ref(model_ref)
    ndim = len(info["shape"])
    if model.spatial_dims != ndim:
        raise DataError(
            f"model {model_ref} ({model.arch}, {model.spatial_dims}-D) does not fit dataset {dataset_dir} "
            f"({info['task']}, {ndim}-D arrays)"
        )
    data = load_arrayset(dataset_dir, model)
    if split != "all":
        data = data.subset(data.split == split)
        if len(data) == 0:
            raise DataError(f"{dataset_dir}: split {split!r} is empty")
    runtime = select_runtime(device, precision)
    _, scores = predict_scores(model, data.x, runtime)
    metrics = binary_metrics(data.y.numpy(), scores)
    result = {
        "model": str(model_ref), "model_meta": meta, "arch": model.arch, "dataset": str(dataset_dir),
        "task": info["task"], "dataset_hash": info["content_hash"], "validated": validation.get("success"),
        "split": split, "runtime": runtime.name, "metrics": metrics,
    }
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        labels = [info["label_names"][k] for k in sorted(info["label_names"], key=int)]
        y = data.y.numpy()
        plot_roc({Path(str(model_ref)).name: (y, scores)}, plots_dir / "roc.png",
                 title=f"{model.arch} on {dataset_dir.name}")
        plot_confusion(y, labels_from_scores(scores), plots_dir / "confusion.png", labels=labels)
        write_dvc_plots(plots_dir, y, scores, sample_ids=data.sample_ids)
        result["plots"] = str(plots_dir)
    return result


def evaluate_model_robustness(
    model_ref: str,
    dataset_dir: str | Path,
    params: dict[str, Any],
    *,
    validation_dir: str | Path | None = None,
    settings_of: str | None = None,
    report_dir: str | Path,
) -> dict[str, Any]:
    """Robustness evaluation of any model on any (validated) dataset, with a report in ``report_dir``.

    Settings: ``robustness.defaults`` merged with ``robustness.jobs.<settings_of>`` when given,
    with that job's gate ε and sample plan (``gate.defaults`` without one), as the evaluate stage.
    """

    dataset_dir = Path(dataset_dir)
    ensure_dataset_valid(dataset_dir, Path(validation_dir) if validation_dir else None)
    model, meta = load_model_ref(model_ref)
    data = load_arrayset(dataset_dir, model)
    # the job's settings as its evaluate stage uses them: the gate's ε (where the whole attack
    # ensemble runs) and the planner's sample caps, so a re-evaluation measures what the gate reads
    settings = evaluation_settings(params, settings_of or "", int(data.raw.shape[-1]))
    result, visuals = evaluate_robustness(model, data, settings, seed=int(section(params, "seed")),
                                          nps=noise_model(params))
    name = Path(str(model_ref)).name
    result.update({
        "job": name, "dataset": dataset_dir.name, "dataset_dir": str(dataset_dir),
        "dataset_hash": data.info["content_hash"],
        "model": {"file": str(model_ref), "arch": model.arch, "mlflow_run_id": meta.get("mlflow_run_id"),
                  "config": model.config()},
    })
    report_dir = Path(report_dir)
    figures = write_job_figures(result, visuals, model, report_dir / "plots", report_dir / "figures")
    report = write_report(report_dir, {name: result}, {name: figures}, params.get("profile"))
    result["report"] = str(report["html"])
    return result
