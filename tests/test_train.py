"""Baseline training: it learns, resumes exactly, tracks everything in MLflow, and refuses bad data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, stage_overrides

from ctharden.config.params import load_params
from ctharden.config.paths import dataset_dir, validation_dir
from ctharden.core.device import select_runtime
from ctharden.core.errors import DataError, ValidationFailed
from ctharden.data.arrays import load_arrayset
from ctharden.data.dataset import DatasetWriter, read_info
from ctharden.stages import validate as validate_stage
from ctharden.training.loop import TrainConfig, train_fold


def toy_cubes(out: Path, n: int = 64, seed: int = 0, size: int = 32) -> None:
    """Separable nodule3d data: malignant cubes hold a bright soft-tissue ball, benign ones a faint speck."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size] - (size - 1) / 2
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    with DatasetWriter(out, "nodule3d", shape=(size,) * 3, test_fraction=0.25, n_folds=2, seed=seed) as w:
        for i in range(n):
            label = i % 2
            cube = -850 + 30 * rng.standard_normal((size,) * 3)
            radius = rng.uniform(6, 9) if label else rng.uniform(1.5, 2.5)
            cube[r < radius] = 40 + 20 * rng.standard_normal()
            w.add({"sample_id": f"toy{i:03d}", "label": label, "patient_id": f"p{i:03d}", "source": "synthetic",
                   "malignancy_mean": 4.5 if label else 1.5, "spacing_mm": 1.0}, cube.astype(np.float32))


def toy_params(tmp: Path, **train: Any) -> dict[str, Any]:
    overrides = [
        *stage_overrides(tmp),
        "datasets.toy={kind: synthetic, task: nodule3d, n: 64}",
        "train.jobs.toy={dataset: toy, arch: nodule3d, arch_kwargs: {width: 8}}",
        "train.defaults.epochs=12", "train.defaults.batch_size=8", "train.defaults.lr=0.003",
        "train.defaults.folds=2", "train.defaults.precision=fp32",
    ]
    overrides += [f"train.defaults.{k}={v}" for k, v in train.items()]
    return load_params(REPO / "params.yaml", "default", overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """One real training job (2 folds) on separable toy cubes, with validation and MLflow."""
    from ctharden.stages import train as train_stage

    tmp = tmp_path_factory.mktemp("train")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    params = toy_params(tmp)
    toy_cubes(dataset_dir(params, "toy"))
    validate_stage.run(params, "toy")
    summary = train_stage.run(params, "toy", progress=False).record
    return params, summary, tmp


@pytest.mark.slow  # the module's training job (`trained`): ~85 s on a 2-core CPU
def test_training_learns_separable_data(trained: tuple[dict, dict, Path]) -> None:
    _, summary, _ = trained
    assert len(summary["folds"]) == 2
    for fold in summary["folds"]:
        assert fold["test"]["auc"] > 0.9, fold["test"]  # chance is 0.5: fails if training is broken
    agg = summary["test_mean_std"]
    assert agg["auc"]["n"] == 2 and agg["accuracy"]["mean"] > 0.8
    assert summary["final_test"]["auc"] > 0.9
    assert Path(summary["model_file"]).is_file()


@pytest.mark.slow  # the module's training job (`trained`): ~85 s on a 2-core CPU
def test_outputs_on_disk(trained: tuple[dict, dict, Path]) -> None:
    _, summary, tmp = trained
    assert (tmp / "metrics" / "train" / "toy.json").is_file()
    for f in ("roc_folds.png", "confusion.png", "table.md"):
        assert (tmp / "reports" / "train" / "toy" / f).is_file()
    assert "mean ± std" in (tmp / "reports" / "train" / "toy" / "table.md").read_text()
    for f in ("roc.csv", "predictions.csv"):
        assert (tmp / "plots" / "train" / "toy" / f).is_file()


@pytest.mark.slow  # the module's training job (`trained`): ~85 s on a 2-core CPU
def test_mlflow_run_content(trained: tuple[dict, dict, Path]) -> None:
    import mlflow

    params, summary, _ = trained
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    info = read_info(dataset_dir(params, "toy"))
    assert parent.data.tags["ctharden.dataset_hash"] == info["content_hash"]
    assert parent.data.params["arch"] == "nodule3d" and parent.data.params["lr"] == "0.003"
    assert parent.data.params["arch_kwargs.width"] == "8"
    assert "test_auc_mean" in parent.data.metrics and "final_test_auc" in parent.data.metrics
    assert any(k.startswith("system/") for k in parent.data.metrics), "system metrics are logged"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"model_file", "plots", "params_resolved.json", "dataset.json", "summary.json"} <= artifacts
    assert "model_file/model.pt" in {a.path for a in client.list_artifacts(parent.info.run_id, "model_file")}

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(12)), "one point per epoch"
        assert "test_auc" in child.data.metrics and "val_auc" in child.data.metrics

    # The logged MLflow model (pt2, with signature) gives the same outputs as the model file.
    from ctharden.models.files import load_model

    model, _ = load_model(summary["model_file"])
    logged = mlflow.pytorch.load_model(f"runs:/{parent.info.run_id}/model")
    x = torch.rand(3, 32, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(logged(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the module's training job (`trained`): ~85 s on a 2-core CPU
def test_evaluate_by_file_and_run_id(trained: tuple[dict, dict, Path]) -> None:
    from ctharden.stages.evaluate_external import evaluate_model
    from ctharden.tracking.runs import configure, tracking_from_params

    params, summary, _ = trained
    ds = dataset_dir(params, "toy")
    by_file = evaluate_model(summary["model_file"], ds, split="test", validation_dir=validation_dir(params, "toy"))
    assert by_file["metrics"]["auc"] == pytest.approx(summary["final_test"]["auc"])
    configure(tracking_from_params(params))
    by_run = evaluate_model(summary["mlflow"]["run_id"], ds, split="test")  # validates the dataset itself
    assert by_run["metrics"] == by_file["metrics"] and by_run["validated"]


@pytest.mark.slow  # the module's training job (`trained`): ~85 s on a 2-core CPU
def test_evaluate_refuses_mismatched_task(trained: tuple[dict, dict, Path], tmp_path: Path) -> None:
    from ctharden.stages.evaluate_external import evaluate_model

    _, summary, _ = trained
    ds = tmp_path / "slices"
    with DatasetWriter(ds, "covid2d", shape=(32, 32), seed=0) as w:
        for i in range(6):
            w.add({"sample_id": f"s{i}", "label": i % 2, "patient_id": f"p{i}", "source": "synthetic"},
                  np.full((32, 32), 0.5, np.float32))
    with pytest.raises(DataError, match="does not fit dataset"):
        evaluate_model(summary["model_file"], ds)


def test_training_refuses_unvalidated_or_changed_data(tmp_path: Path) -> None:
    from ctharden.stages import train as train_stage

    params = toy_params(tmp_path)
    ds = dataset_dir(params, "toy")
    toy_cubes(ds, n=16)
    with pytest.raises(ValidationFailed):
        train_stage.run(params, "toy", progress=False)
    validate_stage.run(params, "toy")
    shutil.rmtree(ds)
    toy_cubes(ds, n=16, seed=1)  # different content after validation
    with pytest.raises(ValidationFailed):
        train_stage.run(params, "toy", progress=False)
    assert not (tmp_path / "artifacts" / "models" / "toy").exists()


def _fresh(seed: int = 0) -> torch.nn.Module:
    from ctharden.models import build_model

    torch.manual_seed(seed)
    return build_model("nodule3d_dropout0.1", width=4)


def test_resume_after_interrupt_gives_the_same_weights(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    toy_cubes(ds, n=24)
    data = load_arrayset(ds, _fresh())
    split = data.manifest["fold"].to_numpy()
    train, val = data.subset(split == 0), data.subset(split == 1)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=1e-3, seed=7)
    rt = select_runtime("cpu", "fp32")

    ref_model = _fresh()
    ref = train_fold(ref_model, train, val, cfg, rt, tmp_path / "ref" / "last.pt", progress=False)

    class Killed(Exception):
        pass

    def kill_after_second(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Killed  # like a SIGKILL right after the epoch's checkpoint hit the disk

    model = _fresh()
    with pytest.raises(Killed):
        train_fold(model, train, val, cfg, rt, tmp_path / "run" / "last.pt", on_epoch=kill_after_second, progress=False)
    resumed_model = _fresh(seed=123)  # a new process would start from other random weights
    resumed = train_fold(resumed_model, train, val, cfg, rt, tmp_path / "run" / "last.pt", progress=False)
    assert resumed.resumed_from_epoch == 2
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=0, atol=0)
    assert resumed.best_epoch == ref.best_epoch
    for k, v in ref.best_state.items():
        torch.testing.assert_close(resumed.best_state[k], v, rtol=0, atol=0)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in ref.history]

    # A checkpoint written under another configuration is not resumed from.
    other = train_fold(_fresh(), train, val, TrainConfig(epochs=1, batch_size=8, lr=1e-3, seed=8), rt,
                       tmp_path / "run" / "last.pt", progress=False)
    assert other.resumed_from_epoch == 0


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    toy_cubes(ds, n=16)
    data = load_arrayset(ds, _fresh())
    fold = data.manifest["fold"].to_numpy()
    train, val = data.subset(fold == 0), data.subset(fold == 1)
    # A step far too small to change the validation loss: no epoch after the first improves.
    cfg = TrainConfig(epochs=10, batch_size=8, lr=1e-12, select_on="val_loss", early_stopping_patience=2, seed=0)
    result = train_fold(_fresh(), train, val, cfg, select_runtime("cpu", "fp32"), tmp_path / "last.pt", progress=False)
    assert [h["epoch"] for h in result.history] == [0, 1, 2] and result.best_epoch == 0
