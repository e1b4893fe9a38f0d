"""The Prefect flow runs the same stages as dvc.yaml, ephemerally (no server), under the test harness."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COVID_SAMPLE, REPO, stage_overrides

from ctharden.flows.pipeline import data_flow, harden_pipeline, ingest_task


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a hang guard: the server started in 13-23 s
        yield


@pytest.mark.slow
def test_harden_pipeline_end_to_end_then_cached(harness: None, tmp_path: Path) -> None:
    """ingest -> validate -> train -> evaluate -> gate -> tune -> harden -> evaluate -> gate -> register,
    then the same flow again: every stage comes from Prefect's cache (same MLflow runs, no retraining)."""
    from prefect.client.orchestration import get_client

    result = harden_pipeline(profile="smoke", params_path=str(REPO / "params.yaml"),
                             overrides=stage_overrides(tmp_path))
    summaries = result["data"]
    assert set(summaries) == {"lidc", "lidc2d", "covid", "synthetic_nodule3d"}
    assert set(result["train"]) == {"nodule2d", "nodule3d", "covid2d"}
    for trained in result["train"].values():
        assert trained.model_file.is_file() and trained.run_id
        assert trained.record["dataset_hash"] == summaries[trained.record["dataset"]].content_hash
    assert all(s.success for s in summaries.values())
    for name in summaries:
        metrics = json.loads((tmp_path / "metrics" / "ingest" / f"{name}.json").read_text())
        assert metrics["n_samples"] == summaries[name].record["n_samples"] > 0
        assert (tmp_path / "validation" / name / "validation.json").is_file()

    import asyncio

    async def artifact() -> str:
        async with get_client() as client:
            arts = await client.read_artifacts()
        return next(a.data for a in arts if a.key == "data-validation")

    md = asyncio.run(artifact())
    assert "| lidc | 1 | passed |" in md and "synthetic_nodule3d" in md

    # the evaluate task: same metrics file as the stage, and its markdown artifact
    evaluated = result["evaluate"].jobs
    assert set(evaluated) == {"nodule2d", "nodule3d", "covid2d"}
    on_disk = json.loads((tmp_path / "metrics" / "robustness.json").read_text())
    assert on_disk["nodule3d"]["headline"] == evaluated["nodule3d"]["headline"]

    async def robustness_artifact() -> str:
        async with get_client() as client:
            arts = await client.read_artifacts()
        return next(a.data for a in arts if a.key == "robustness")

    rmd = asyncio.run(robustness_artifact())
    assert "## nodule3d" in rmd and "## covid2d" in rmd and "10 mAs" in rmd

    # tune -> harden -> evaluate the hardened models: same files as the stages, one artifact each
    for job in ("nodule2d", "nodule3d", "covid2d"):
        tuned, hardened = result["tune"][job], result["harden"][job]
        assert tuned.eps == json.loads((tmp_path / "metrics" / "tune" / f"{job}.json").read_text())["eps"]
        assert hardened.eps == pytest.approx(tuned.eps) and hardened.model_file.is_file()
    hmetrics = result["evaluate_hardened"].jobs
    assert {m["variant"] for m in hmetrics.values()} == {"hardened"}

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert {"tune-nodule3d", "harden-covid2d", "robustness-hardened", "gate-baseline", "gate-hardened", "registry",
            "pipeline-summary"} <= asyncio.run(keys())

    # gate both variants, register what passed (the smoke profile's thresholds are lenient)
    gate = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    assert set(gate) == {"baseline", "hardened"} and set(gate["hardened"]) == {"nodule2d", "nodule3d", "covid2d"}
    assert result["gate_hardened"].record["hardened"]["nodule3d"]["passed"] == gate["hardened"]["nodule3d"]["passed"]
    reg = result["register"].record
    for job in ("nodule2d", "nodule3d", "covid2d"):
        statuses = {o["variant"]: o["status"] for o in reg["jobs"][job]}
        assert statuses == {"baseline": "registered", "hardened": "registered"}, reg["jobs"][job]
        assert reg["champions"][job]["version"] in ("1", "2")

    async def summary() -> str:
        async with get_client() as client:
            return next(a.data for a in await client.read_artifacts() if a.key == "pipeline-summary")

    assert "| nodule3d | baseline | PASSED |" in asyncio.run(summary())

    # re-run with unchanged data, params and code: cached, nothing retrained or re-registered
    state = harden_pipeline(profile="smoke", params_path=str(REPO / "params.yaml"), overrides=stage_overrides(tmp_path),
                            return_state=True)
    again = state.result()
    for job in ("nodule2d", "nodule3d", "covid2d"):
        assert again["train"][job].run_id == result["train"][job].run_id
        assert again["harden"][job].run_id == result["harden"][job].run_id
        assert {o["status"] for o in again["register"].record["jobs"][job]} == {"already registered"}

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_states() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        return {r.name: r.state.name for r in runs}

    states = asyncio.run(task_states())
    for name in ("train-nodule3d", "train-covid2d", "evaluate-baseline", "tune-nodule3d", "harden-covid2d",
                 "evaluate-hardened"):
        assert states[name] == "Cached", states


@pytest.mark.slow
def test_flow_fails_on_bad_input_without_retrying(harness: None, tmp_path: Path) -> None:
    root = tmp_path / "covid"
    shutil.copytree(COVID_SAMPLE, root)
    victim = sorted((root / "COVID").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:500])
    overrides = [*stage_overrides(tmp_path), f"datasets.covid.root={root}"]
    state = data_flow(
        profile="smoke", params_path=str(REPO / "params.yaml"), overrides=overrides, return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match=victim.name.replace("(", r"\(").replace(")", r"\)")):
        state.result()
    assert not (tmp_path / "datasets" / "covid").exists(), "nothing half-written"

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def ingest_runs() -> list:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        return [r for r in runs if r.name == "ingest-covid"]

    (run,) = asyncio.run(ingest_runs())
    assert run.run_count == 1, "a DataError is bad input: retrying cannot help"


def test_task_is_the_library_function(tmp_path: Path) -> None:
    """Unit level: the task body is the ingest stage's run (no second implementation)."""
    from ctharden.config.params import load_params

    params = load_params(REPO / "params.yaml", "smoke", stage_overrides(tmp_path))
    report = ingest_task.fn(params, "synthetic_nodule3d")
    assert report.n_samples == params["datasets"]["synthetic_nodule3d"]["n"]
