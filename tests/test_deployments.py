"""The scheduled deployments: their definitions (Python and prefect.yaml), and a real Prefect server
this module starts on 127.0.0.1 with ``flows/serve.py`` serving them, triggering the nightly
champion re-evaluation of a champion registered on the smoke profile."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SmokeTree, free_port, stage_overrides, wait_healthy

from ctharden.flows.deployments import NIGHTLY_CRON, NIGHTLY_NAME, WEEKLY_CRON, WEEKLY_NAME, deployments
from ctharden.flows.pipeline import harden_pipeline, reevaluate_champion

BIN = Path(sys.executable).parent
NIGHTLY = f"reevaluate-champion/{NIGHTLY_NAME}"
WEEKLY = f"harden-pipeline/{WEEKLY_NAME}"
POOL = "ctharden-process"


def test_deployments_schedule_both_flows_with_their_parameters(tmp_path: Path) -> None:
    from prefect.flows import load_flow_from_entrypoint

    nightly, weekly = deployments("smoke", str(REPO / "params.yaml"), "0 1 * * *", weekly_cron="0 4 * * 6",
                                  overrides=["seed=3"], jobs=["nodule3d"])
    assert (nightly.name, nightly.flow_name) == (NIGHTLY_NAME, "reevaluate-champion")
    assert (weekly.name, weekly.flow_name) == (WEEKLY_NAME, "harden-pipeline")
    for dep, cron in ((nightly, "0 1 * * *"), (weekly, "0 4 * * 6")):
        (sched,) = dep.schedules
        assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == (cron, "UTC", True)
        assert dep.parameters["profile"] == "smoke" and dep.parameters["overrides"] == ["seed=3"]
        assert dep.parameters["params_path"] == str(REPO / "params.yaml") and "ctharden" in dep.tags
    assert nightly.parameters["jobs"] == ["nodule3d"] and "jobs" not in weekly.parameters
    assert load_flow_from_entrypoint(nightly.entrypoint) is reevaluate_champion
    assert load_flow_from_entrypoint(weekly.entrypoint) is harden_pipeline

    # defaults: the documented crons, a relative params file made absolute, every job
    os.chdir(tmp_path)
    try:
        nightly, weekly = deployments()
    finally:
        os.chdir(REPO)
    assert [d.schedules[0].schedule.cron for d in (nightly, weekly)] == [NIGHTLY_CRON, WEEKLY_CRON]
    assert nightly.parameters == {"profile": None, "params_path": str(tmp_path / "params.yaml"),
                                  "overrides": [], "jobs": None}


def test_serve_script_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("ctharden_serve_script", REPO / "flows" / "serve.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(script, "serve_deployments", lambda *a, **kw: seen.update(args=a, kwargs=kw))
    script.main(["--profile", "smoke", "--params", "p.yaml", "--set", "a=1", "--set", "b.c=2",
                 "--nightly-cron", "5 1 * * *", "--job", "nodule3d"])
    assert seen["args"] == ("smoke", "p.yaml", "5 1 * * *", WEEKLY_CRON)
    assert seen["kwargs"] == {"overrides": ["a=1", "b.c=2"], "timezone": "UTC", "jobs": ["nodule3d"],
                              "limit": 1}


def test_prefect_yaml_declares_both_scheduled_deployments() -> None:
    """prefect.yaml parses with Prefect's own model, and each entrypoint resolves to the flow."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)
    by_name = {d.name: d for d in model.deployments}
    assert set(by_name) == {NIGHTLY_NAME, WEEKLY_NAME}
    expected = ((NIGHTLY_NAME, "flows/pipeline.py:reevaluate_champion", reevaluate_champion, NIGHTLY_CRON),
                (WEEKLY_NAME, "flows/pipeline.py:harden_pipeline", harden_pipeline, WEEKLY_CRON))
    for name, entrypoint, flow_, cron in expected:
        dep = by_name[name]
        assert dep.entrypoint == entrypoint
        assert load_flow_from_entrypoint(str(REPO / entrypoint)) is flow_
        (sched,) = dep.schedules
        assert (sched.cron, sched.timezone) == (cron, "UTC")
        assert dep.work_pool and dep.work_pool.name == POOL
        assert {"profile", "params_path", "overrides"} <= set(dep.parameters)
        assert set(dep.parameters) <= set(flow_.parameters.properties), "parameters the flow does not take"
    assert by_name[NIGHTLY_NAME].parameters["jobs"] is None
    assert model.pull and "prefect.deployments.steps.set_working_directory" in model.pull[0]


# --- a real server, flows/serve.py, and one nightly run ---------------------------------------


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_WAIT_POLICY="PASSIVE",
               PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``prefect server start`` on a free port of 127.0.0.1 with its own PREFECT_HOME; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect_server")
    port = free_port()
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=_env(home, PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING"),
            stdout=out, stderr=subprocess.STDOUT, cwd=home)
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_healthy(f"{url}/health", proc, log, "prefect server")  # measured 11-17 s
        yield url
    finally:
        _stop(proc)


def prepare_champion(smoke_tree: SmokeTree, tmp: Path) -> dict[str, Any]:
    """The library on the smoke profile, every output under ``tmp``: data -> train -> evaluate (a copy
    of the session's smoke tree) -> gate -> register nodule3d (the champion the nightly run re-evaluates)."""
    from ctharden.config.paths import dataset_names
    from ctharden.stages import gate as gate_stage
    from ctharden.stages import register as register_stage

    tree = smoke_tree.copy_to(tmp)
    params = tree.params
    assert set(tree.validate) == set(dataset_names(params)) and "nodule3d" in tree.evaluate.jobs
    gated = gate_stage.run(params, "baseline", ["nodule3d"]).record
    assert gated["baseline"]["nodule3d"]["passed"], "the smoke profile's lenient gate passes the baseline"
    summary = register_stage.run(params, "nodule3d", ["baseline"]).record
    (outcome,) = summary["jobs"]["nodule3d"]
    assert outcome["status"] == "registered" and outcome["promoted"], outcome
    assert summary["champions"]["nodule3d"]["version"] == outcome["version"]
    return {"params": params, "name": outcome["name"], "version": outcome["version"]}


async def _wait_for_deployments(names: list[str], timeout: float, serve: subprocess.Popen, log: Path
                                ) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline and len(found) < len(names):
            if serve.poll() is not None:
                pytest.fail(f"flows/serve.py exited ({serve.returncode}):\n{log.read_text()[-6000:]}")
            for name in names:
                if name not in found:
                    try:
                        found[name] = await client.read_deployment_by_name(name)
                    except ObjectNotFound:
                        pass
            await asyncio.sleep(1)
    missing = set(names) - set(found)
    if missing:
        pytest.fail(f"deployments {missing} never appeared:\n{log.read_text()[-6000:]}")
    return found


async def _artifact(key: str, flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return arts


@pytest.mark.slow
def test_served_nightly_deployment_reevaluates_the_champion(server: str, smoke_tree: SmokeTree, tmp_path: Path) -> None:
    import mlflow
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ctharden.tracking.runs import configure, tracking_from_params

    champion = prepare_champion(smoke_tree, tmp_path)
    log = tmp_path / "serve.log"
    serve = None
    try:
        with log.open("w") as out:
            serve = subprocess.Popen(
                [sys.executable, str(REPO / "flows" / "serve.py"), "--profile", "smoke",
                 "--params", str(REPO / "params.yaml"),
                 *[a for o in stage_overrides(tmp_path) for a in ("--set", o)]],
                env=_env(tmp_path / "prefect_serve", PREFECT_API_URL=server,
                         PREFECT_RUNNER_POLL_FREQUENCY="2"),
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        with temporary_settings({PREFECT_API_URL: server}):
            # hang guards: the deployments appeared after 13 s, the nightly run took 29 s (2-core CPU)
            found = asyncio.run(_wait_for_deployments([NIGHTLY, WEEKLY], 300, serve, log))
            for name, cron in ((NIGHTLY, NIGHTLY_CRON), (WEEKLY, WEEKLY_CRON)):
                (sched,) = found[name].schedules
                assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == (cron, "UTC", True)
                assert found[name].parameters["profile"] == "smoke"
                assert found[name].parameters["overrides"] == stage_overrides(tmp_path)

            run = run_deployment(NIGHTLY, parameters={"jobs": ["nodule3d"]}, timeout=600, poll_interval=2,
                                 as_subflow=False)
            assert run.state is not None and run.state.is_completed(), (
                f"nightly run ended {run.state}:\n{log.read_text()[-8000:]}")
            arts = asyncio.run(_artifact("champion-reevaluation", run.id))
        assert arts and "nodule3d" in arts[0].data and f"version {champion['version']}" in arts[0].data
    finally:
        _stop(serve)

    out = json.loads((tmp_path / "metrics" / "champion" / "nodule3d.json").read_text())
    assert (out["name"], out["version"]) == (champion["name"], champion["version"])
    assert out["gate"]["passed"]
    configure(tracking_from_params(champion["params"]))
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = mlflow.MlflowClient().get_model_version(champion["name"], champion["version"]).tags
    assert tags["ctharden.reevaluation_gate"] == "passed"
    assert tags["ctharden.reevaluated_at"] == out["reevaluated_at"]


@pytest.mark.slow
def test_prefect_yaml_deploys_to_a_process_work_pool(server: str, tmp_path: Path) -> None:
    """``prefect deploy --all`` accepts prefect.yaml against the real server (the flow runs are
    the served test's business): both deployments on the work pool, with their cron schedules."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = (REPO / "prefect.yaml").read_bytes()
    env = _env(tmp_path / "prefect_cli", PREFECT_API_URL=server, PWD=str(REPO))  # as from a shell in the repo
    with temporary_settings({PREFECT_API_URL: server}):
        async def pool() -> None:
            async with get_client() as client:
                await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        asyncio.run(pool())
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=180)  # a hang guard: measured 12 s
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

        async def read() -> dict[str, Any]:
            async with get_client() as client:
                return {n: await client.read_deployment_by_name(n) for n in (NIGHTLY, WEEKLY)}
        found = asyncio.run(read())
    assert (REPO / "prefect.yaml").read_bytes() == before, "prefect deploy must not rewrite prefect.yaml"
    for name, cron, entrypoint in ((NIGHTLY, NIGHTLY_CRON, "flows/pipeline.py:reevaluate_champion"),
                                   (WEEKLY, WEEKLY_CRON, "flows/pipeline.py:harden_pipeline")):
        dep = found[name]
        assert (dep.work_pool_name, dep.entrypoint) == (POOL, entrypoint)
        crons = [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules]
        assert crons == [(cron, "UTC")], crons
        assert dep.parameters["params_path"] == "params.yaml"
        (step,) = dep.pull_steps
        assert step == {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        assert not dep.paused, "redeploying resumes the deployment the served test left paused"
