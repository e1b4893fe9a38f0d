"""Fan-out: the evaluation's units assemble to the serial result in any order, and a Prefect flow
on a 2-worker Dask LocalCluster trains and evaluates a job with exactly the serial results."""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, SmokeTree, stage_overrides
from torch import nn

from ctharden.config.robustness import parse_settings
from ctharden.core.errors import ConfigError
from ctharden.data.arrays import load_arrayset
from ctharden.data.synthetic import generate_synthetic
from ctharden.evaluation.units import (
    assemble,
    evaluate_robustness,
    evaluation_units,
    run_nps_attacks,
    run_unit,
)
from ctharden.models import build_model

SETTINGS = {
    "mas_levels": [10, 100, 500],
    "splits": ["train", "test"],
    "models": "folds",
    "max_samples": None,
    "spacing_mm": 1.0,
    "examples": 1,
    "random": {"k": 2},
    "optimized": {"restarts": 1, "n_iter": 2, "max_samples": 4},
    "pgd": {"steps": 5, "linf": [0.003, 0.02], "l2": [0.3], "max_samples": 6, "n_random": 2},
}
IGNORED = {"seconds", "mlflow_run_id", "run_id", "experiment_id", "tracking_uri"}


def _comparable(x: Any, root: Path) -> Any:
    """``x`` without timings and run ids, with ``root`` in paths replaced."""
    if isinstance(x, dict):
        return {k: _comparable(v, root) for k, v in x.items() if k not in IGNORED}
    if isinstance(x, list):
        return [_comparable(v, root) for v in x]
    return re.sub(re.escape(str(root)), "<root>", x) if isinstance(x, str) else x


def _same_arrays(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_arrays(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_arrays(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_units_in_any_order_assemble_to_the_serial_result(tmp_path: Path) -> None:
    generate_synthetic("nodule3d", tmp_path / "synth", n=24, seed=3, n_folds=2, test_fraction=0.25)
    models: list[nn.Module] = []
    for seed in (0, 1):  # the selected model and one more "fold" model
        torch.manual_seed(seed)
        models.append(build_model("nodule3d", spatial_dims=3, window_hu=(-1000.0, 400.0), width=4).eval())
    data = load_arrayset(tmp_path / "synth", models[0])
    settings = parse_settings(SETTINGS)
    serial, visuals = evaluate_robustness(models[0], data, settings, seed=7, fold_models=models[1:])

    units = evaluation_units(settings, 2)
    assert len(units) == 1 + 2 * (2 + 2 * 3) + 2 + 1
    assert len({u.name for u in units}) == len(units)
    order = list(range(len(units)))
    random.Random(0).shuffle(order)
    torch.manual_seed(12345)  # a different global RNG state: units seed themselves
    done = {i: run_unit(units[i], models, data, settings, seed=7) for i in order}
    result, visuals2 = assemble([units[i] for i in order], [done[i] for i in order], settings, 2)
    assert json.loads(json.dumps(_comparable(result, tmp_path))) == _comparable(serial, tmp_path)
    assert set(result["seconds"]) == {"clean", "nps", "pgd", "examples", "total"}
    assert _same_arrays(visuals, visuals2)
    # run_nps_attacks is the same units
    rnd, opt = run_nps_attacks(models, data, settings, seed=7)
    assert (rnd, opt) == (serial["random_nps"], serial["optimized_nps"])
    with pytest.raises(Exception, match="without a result"):
        assemble(units[:-1], [done[i] for i in range(len(units) - 1)], settings, 2)


def test_task_runner_choices() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from ctharden.flows.fanout import task_runner

    assert isinstance(task_runner("serial"), ThreadPoolTaskRunner)
    local = task_runner("dask", n_workers=2)
    assert isinstance(local, DaskTaskRunner)
    assert local.cluster_kwargs == {"n_workers": 2, "threads_per_worker": 1, "processes": True}
    assert task_runner("dask", address="tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError, match="unknown task runner 'ray'"):
        task_runner("ray")


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a hang guard: the server started in 13-23 s
        yield


def _smoke_params(datasets: SmokeTree, tmp: Path) -> dict[str, Any]:
    """Smoke profile under ``tmp`` (a copy of the session's ingested and validated datasets),
    nodule3d with 2 folds (2 fold tasks, 2 models per NPS attack)."""
    from ctharden.config.params import load_params

    datasets.copy_to(tmp)
    return load_params(REPO / "params.yaml", "smoke", [*stage_overrides(tmp), "train.jobs.nodule3d.folds=2"])


@pytest.mark.slow
def test_dask_flow_gives_the_serial_results(harness: None, smoke_datasets: SmokeTree, tmp_path: Path) -> None:
    import mlflow
    from prefect import flow

    from ctharden.flows.fanout import evaluate_fanout, task_runner, train_fanout
    from ctharden.models.files import load_model
    from ctharden.stages import evaluate as evaluate_stage
    from ctharden.stages import train as train_stage

    serial_dir, dask_dir = tmp_path / "serial", tmp_path / "dask"
    params = _smoke_params(smoke_datasets, serial_dir)
    serial_summary = train_stage.run(params, "nodule3d", progress=False).record
    serial_eval = evaluate_stage.run(params, "baseline", ["nodule3d"])

    @flow(task_runner=task_runner("dask", n_workers=2, threads_per_worker=1))
    def fanout_flow(params: dict[str, Any]) -> tuple[Any, Any]:
        return train_fanout(params, "nodule3d"), evaluate_fanout(params, jobs=["nodule3d"])

    dparams = _smoke_params(smoke_datasets, dask_dir)
    env = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    trained, evaluated = fanout_flow(dparams)
    summary = trained.record
    assert {k: os.environ.get(k) for k in env} == env, "the flow process's environment is restored"

    for rel in ("fold0/model.pt", "fold1/model.pt", "model.pt"):
        a = load_model(serial_dir / "artifacts" / "models" / "nodule3d" / rel)[0].state_dict()
        b = load_model(dask_dir / "artifacts" / "models" / "nodule3d" / rel)[0].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert _comparable(summary, dask_dir) == _comparable(serial_summary, serial_dir)
    on_disk = {d: json.loads((d / "metrics" / "robustness.json").read_text()) for d in (serial_dir, dask_dir)}
    assert on_disk[dask_dir]["nodule3d"]["headline"] == on_disk[serial_dir]["nodule3d"]["headline"]
    assert _comparable(on_disk[dask_dir], dask_dir) == _comparable(on_disk[serial_dir], serial_dir)
    assert _comparable(evaluated.jobs, dask_dir) == _comparable(serial_eval.jobs, serial_dir)
    assert on_disk[dask_dir]["nodule3d"]["n_models"] == 2
    assert (dask_dir / "reports" / "robustness" / "index.html").is_file()

    # the fold runs are nested under the job's run, which ended normally
    client = mlflow.MlflowClient(tracking_uri=summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["nodule3d-fold0", "nodule3d-fold1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {f["mlflow_run_id"] for f in summary["folds"]} == {c.info.run_id for c in children}
