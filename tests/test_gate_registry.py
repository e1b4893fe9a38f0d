"""The robustness gate on fixed metric files, MLflow registry promotion against real backends
(the embedded SQLite store and a tracking server this module starts on 127.0.0.1), and the
pull-request check ``ctharden ci-gate`` on a git repository with two commits."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, free_port, stage_overrides, wait_healthy

from ctharden.config.params import load_params
from ctharden.core.errors import ConfigError, DataError
from ctharden.core.io import atomic_write_json
from ctharden.evaluation.intervals import proportion_interval
from ctharden.gate.criteria import gate_settings
from ctharden.stages import gate as gate_stage

FIXTURES = Path(__file__).parent / "fixtures" / "gate"  # headline metrics measured on the default run
CLI = [str(Path(sys.executable).parent / "ctharden")]
SHAPE = (32, 32, 32)
#: The registry and ci-gate tests state the measured rates as if on 400 samples per rate, so that the
#: gate can decide them (at the run's own 16-48 samples most criteria are inconclusive; see
#: test_at_the_runs_own_sample_sizes_most_criteria_are_inconclusive).
SAMPLES = 400


def fixture(variant: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{variant}.json").read_text())


def tiny_model(seed: int) -> torch.nn.Module:
    from ctharden.models import build_model

    torch.manual_seed(seed)
    return build_model("nodule3d", spatial_dims=3, window_hu=(-1000.0, 400.0), width=2).eval()


def write_model(tmp: Path, name: str, seed: int, *, log: bool = False, params: dict[str, Any] | None = None
                ) -> tuple[Path, str | None]:
    """A real (tiny) nodule model file; with ``log`` also an MLflow run holding it (model file + pt2)."""
    from ctharden.models.files import save_model

    model = tiny_model(seed)
    path = save_model(tmp / "models" / name / "model.pt", model, meta={"job": "nodule3d"})
    if not log:
        return path, None
    import mlflow

    from ctharden.tracking.runs import MODEL_FILE_ARTIFACT, configure, log_pytorch_model, tracking_from_params

    configure(tracking_from_params(params))
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_artifact(str(path), MODEL_FILE_ARTIFACT)
        log_pytorch_model(model, torch.rand(2, *SHAPE))
    return path, run.info.run_id


def with_samples(entry: dict[str, Any], samples: int | None) -> None:
    """The entry's evidence re-stated for its headline values: with ``samples``, every rate as if
    measured on that many samples (``k = rate × samples``; the AUC's se scaled by sqrt(n/samples)) —
    a test scenario of a better-sampled evaluation, not a measurement; without, at the run's own n."""
    for metric, iv in entry["intervals"].items():
        value = entry["headline"][metric]
        if iv.get("k") is None:  # AUC
            if samples:
                iv["se"] *= (iv["n"] / samples) ** 0.5
                iv["n"] = samples
            iv["point"] = value
            continue
        scale = 100.0 if iv.get("unit") == "%" else 1.0
        n = samples or iv["n"]
        k = round(value / scale * n)
        assert abs(k / n * scale - value) < 1e-9 * scale or samples, (metric, value, n)
        iv.update(k=k, n=n, point=value)


def write_evaluation(params: dict[str, Any], variant: str, job: str, model_file: Path, run_id: str | None,
                     samples: int | None = SAMPLES, **changes: float) -> None:
    """metrics/robustness[_hardened].json with the fixture's ``job`` entry for ``model_file``; ``changes``
    overwrite headline metrics; the evidence is stated for ``samples`` per rate (:func:`with_samples`;
    None: the run's own sample sizes)."""
    from ctharden.config.paths import evaluation_paths

    path = evaluation_paths(params, variant)["metrics"]
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    entry = copy.deepcopy(fixture(variant)[job])
    entry["model"].update({"file": str(model_file), "mlflow_run_id": run_id})
    entry["headline"].update(changes)
    with_samples(entry, samples)
    metrics[job] = entry
    atomic_write_json(path, metrics)


def default_params(tmp: Path) -> dict[str, Any]:
    return load_params(REPO / "params.yaml", "default", stage_overrides(tmp))


# -- the gate ---------------------------------------------------------------------------------------


def test_gate_decides_the_measured_metrics_on_bounds(tmp_path: Path) -> None:
    params = default_params(tmp_path)
    for variant in ("baseline", "hardened"):
        for job in ("nodule3d", "covid2d"):
            write_evaluation(params, variant, job, write_model(tmp_path, f"{variant}-{job}", 1)[0], None)
    gated = gate_stage.run(params, "all").record
    for job in ("nodule3d", "covid2d"):
        base = gated["baseline"][job]
        assert base["verdict"] == "fail", base["failed"]
        # the undefended baseline fails on robustness, not on clean accuracy or sanity
        assert base["criteria"]["clean_auc"]["passed"] and base["criteria"]["sanity"]["passed"]
        assert "optimized_san_mas500" in base["failed"]
    assert gated["hardened"]["nodule3d"]["verdict"] == "pass"
    # hardened covid2d: PGD L∞ accuracy 0.375 at 7 HU is far below the policy's 0.70; 29 % optimised SAN > 25
    assert gated["hardened"]["covid2d"]["failed"] == ["optimized_san_mas500", "robust_linf_acc_eps0.005",
                                                      "robust_l2_acc_eps0.5"]
    on_disk = json.loads((tmp_path / "metrics" / "gate.json").read_text())
    row = on_disk["baseline"]["nodule3d"]["criteria"]["robust_l2_acc_eps1"]
    lower = proportion_interval(150, 400, sided="lower").lower
    upper = proportion_interval(150, 400, sided="upper").upper
    assert row == {"metric": "robust_ensemble_l2_acc_eps1", "description": row["description"], "op": ">=",
                   "threshold": 0.7, "value": 0.375, "passed": False, "kind": "robust_accuracy", "decision": "fail",
                   "lower": pytest.approx(lower), "upper": pytest.approx(upper), "k": 150, "n": 400,
                   "confidence": 0.95, "method": "clopper-pearson", "samples_to_decide": None, "note": None}
    assert on_disk["hardened"]["covid2d"]["primary"]["criterion"] == "robust_linf_acc_eps0.005"


def test_at_the_runs_own_sample_sizes_most_criteria_are_inconclusive(tmp_path: Path) -> None:
    """The fixture's own n (16-48 attacked samples): 0 flips of 48 cannot show SAN/N <= 5 %, and
    the hardened nodule3d model, a pass at 400 samples, is inconclusive — never a lucky pass."""
    params = default_params(tmp_path)
    write_evaluation(params, "hardened", "nodule3d", write_model(tmp_path, "m", 1)[0], None, samples=None)
    rec = gate_stage.run(params, "hardened").record["hardened"]["nodule3d"]
    assert rec["verdict"] == "inconclusive" and not rec["passed"] and not rec["failed"]
    row = rec["criteria"]["random_san_mas100"]
    assert (row["k"], row["n"], row["decision"]) == (0, 48, "inconclusive")
    assert row["samples_to_decide"] == 59  # 0 of 59: the one-sided 95 % upper bound drops below 5 %
    assert proportion_interval(0, 59, sided="upper").upper < 0.05 < proportion_interval(0, 58, sided="upper").upper


def test_gate_cli_prints_the_table_and_exits_by_verdict(tmp_path: Path) -> None:
    params = default_params(tmp_path)
    for variant in ("baseline", "hardened"):
        write_evaluation(params, variant, "nodule3d", write_model(tmp_path, variant, 1)[0], None)
    args = ["--params", str(REPO / "params.yaml"), *sum((["--set", o] for o in stage_overrides(tmp_path)), [])]
    env = {**os.environ, "COLUMNS": "200"}

    def gate(*extra: str) -> subprocess.CompletedProcess[str]:
        # a hang guard: `ctharden gate` was measured at 1 s
        return subprocess.run([*CLI, *args, "gate", *extra], capture_output=True, text=True, env=env, timeout=120)

    r = gate("--variant", "baseline")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "robust_l2_acc_eps1" in r.stdout and "150/400" in r.stdout and "FAIL" in r.stdout and "FAILED" in r.stdout
    assert r.stderr.strip().startswith("error: gate failed: nodule3d (baseline) fail") and "Traceback" not in r.stderr
    assert gate("--variant", "baseline", "--no-fail").returncode == 0
    r = gate()  # auto: the hardened models, since they were evaluated
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout + r.stderr
    assert set(json.loads((tmp_path / "metrics" / "gate.json").read_text())) == {"baseline", "hardened"}
    r = subprocess.run([*CLI, *args, "gate", "plan", "nodule3d", "--expected", "robust_linf_acc_eps0.005=0.8"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| `robust_linf_acc_eps0.005` | >= 0.7 | 0.8 | given |" in r.stdout
    assert "last evaluation" not in r.stdout or "| 400 |" in r.stdout
    r = subprocess.run([*CLI, *args, "gate", "plan", "--expected", "nope=1"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "unknown criteria ['nope']" in r.stderr


def test_unmeasured_metric_fails_its_criterion(tmp_path: Path) -> None:
    params = default_params(tmp_path)
    model = write_model(tmp_path, "m", 1)[0]
    write_evaluation(params, "hardened", "nodule3d", model, None)
    metrics = tmp_path / "metrics" / "robustness_hardened.json"
    data = json.loads(metrics.read_text())
    del data["nodule3d"]["headline"]["robust_ensemble_l2_acc_eps1"]  # e.g. an ε missing from the PGD grid
    metrics.write_text(json.dumps(data))
    rec = gate_stage.run(params, "hardened").record["hardened"]["nodule3d"]
    assert not rec["passed"] and rec["failed"] == ["robust_l2_acc_eps1"]
    assert rec["criteria"]["robust_l2_acc_eps1"]["value"] is None


def test_gate_settings_are_validated(tmp_path: Path) -> None:
    params = default_params(tmp_path)
    params["gate"]["jobs"]["nodule3d"]["primary"] = "nope"
    with pytest.raises(ConfigError, match="primary"):
        gate_settings(params, "nodule3d")
    params = default_params(tmp_path)
    params["gate"]["defaults"]["min_robust_accuracy"]["linf2"] = {0.1: 0.5}
    with pytest.raises(ConfigError, match="unknown norms"):
        gate_settings(params, "nodule3d")
    params = default_params(tmp_path)
    params["gate"]["defaults"]["max_san_rate"]["optimized"][100] = "high"
    with pytest.raises(ConfigError, match="must be a number"):
        gate_settings(params, "nodule3d")
    # null disables a criterion
    params = default_params(tmp_path)
    params["gate"]["jobs"]["nodule3d"]["min_robust_accuracy"]["l2"][1.0] = None
    assert "robust_l2_acc_eps1" not in [c.name for c in gate_settings(params, "nodule3d").criteria]


# -- registry promotion -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite backend) on 127.0.0.1, for the duration of the module."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, root / "server.log", "mlflow server")  # measured 19-47 s
    except BaseException:
        proc.kill()
        raise
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)  # exits within a second when idle
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["sqlite", "server"])
def registry_params(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Default params under ``tmp_path``; MLflow is the embedded SQLite store or the test server."""
    if request.param == "server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("mlflow_server"))
        # one server for the module: each test registers under its own model names
        suffix = tmp_path.name.replace("_", "-")
        overrides = [*stage_overrides(tmp_path), f"gate.defaults.model_name=ctharden-{{job}}-{suffix}"]
        return load_params(REPO / "params.yaml", "default", overrides)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return default_params(tmp_path)


def _client(params: dict[str, Any]) -> Any:
    import mlflow

    from ctharden.tracking.runs import configure, tracking_from_params

    configure(tracking_from_params(params))
    return mlflow.MlflowClient()


def write_outcomes(params: dict[str, Any], variant: str, model: Path, run_id: str | None, acc: float,
                   scores: str = "good") -> None:
    """Per-sample outcomes of a nodule3d evaluation on SAMPLES test samples, written where the
    evaluation writes them and logged to the model's run: the PGD L∞ survivors at ε 0.005 are the
    first ``acc × SAMPLES`` samples (a better model survives a superset), clean scores either
    ``good`` (the same for every model) or ``random`` (AUC about 0.5)."""
    import mlflow
    import numpy as np

    from ctharden.config.paths import outcomes_path
    from ctharden.core.io import sha256_file
    from ctharden.tracking.runs import OUTCOMES_ARTIFACT

    ids = [f"s{i:03d}" for i in range(SAMPLES)]
    y = [i % 2 for i in range(SAMPLES)]
    rng = np.random.default_rng(0 if scores == "good" else 1)
    score = (0.35 * np.array(y) + 0.65 * rng.random(SAMPLES)) if scores == "good" else rng.random(SAMPLES)
    k = round(acc * SAMPLES)
    out = {"job": "nodule3d", "variant": variant, "dataset_hash": fixture(variant)["nodule3d"]["dataset_hash"],
           "model_sha256": sha256_file(model), "clean": {"ids": ids, "y": y, "score": score.tolist()},
           "ensemble_linf": {"ids": ids, "broken": {"0.005": [i >= k for i in range(SAMPLES)]}}}
    path = atomic_write_json(outcomes_path(params, variant, "nodule3d"), out)
    if run_id is not None:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict(json.loads(path.read_text()), OUTCOMES_ARTIFACT)


def write_outcome_file(params: dict[str, Any], variant: str, model: Path, acc: float) -> None:
    """:func:`write_outcomes` without an MLflow run (the pull-request check reads the file)."""
    write_outcomes(params, variant, model, None, acc)


def _gate_and_register(params: dict[str, Any], variant: str, model: Path, run_id: str, scores: str = "good",
                       **changes: float) -> dict[str, Any]:
    from ctharden.stages import register as register_stage

    write_evaluation(params, variant, "nodule3d", model, run_id, **changes)
    acc = changes.get("robust_ensemble_linf_acc_eps0.005", fixture(variant)["nodule3d"]["headline"][
        "robust_ensemble_linf_acc_eps0.005"])
    _client(params)  # the tracking store of these params
    write_outcomes(params, variant, model, run_id, acc, scores)
    gate_stage.run(params, variant, ["nodule3d"])
    return register_stage.run(params, "nodule3d", [variant]).record


@pytest.mark.slow
def test_failed_gate_registers_nothing(registry_params: dict[str, Any], tmp_path: Path) -> None:
    params = registry_params
    model, run_id = write_model(tmp_path, "baseline", 1, log=True, params=params)
    out = _gate_and_register(params, "baseline", model, run_id)
    (o,) = out["jobs"]["nodule3d"]
    assert o["status"] == "rejected" and "robust_l2_acc_eps1 fail: 0.375 on 150/400" in o["reason"], o["reason"]
    client = _client(params)
    name = gate_settings(params, "nodule3d").model_name
    assert client.search_model_versions(f"name = '{name}'") == []
    assert client.get_run(run_id).data.tags["ctharden.gate"] == "rejected"
    assert out["champions"]["nodule3d"]["version"] is None
    # the CLI says why and exits non-zero
    args = ["--params", str(REPO / "params.yaml"), *sum((["--set", o] for o in stage_overrides(tmp_path)), [])]
    if "ctharden-{job}-" in str(params["gate"]["defaults"]["model_name"]):
        args += ["--set", f"gate.defaults.model_name={params['gate']['defaults']['model_name']}"]
    r = subprocess.run([*CLI, *args, "register", "nodule3d", "--variant", "baseline"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})  # hang guard; measured 9-12 s
    assert r.returncode == 1 and "nothing registered for nodule3d: gate failed" in r.stderr, r.stdout + r.stderr
    assert client.search_model_versions(f"name = '{name}'") == []
    # the main job (dvc.yaml's register stage) reports the verdict and goes on; still nothing registered
    r = subprocess.run([*CLI, *args, "stage", "register", "--no-fail"], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})  # hang guard
    assert r.returncode == 0 and "nothing registered for nodule3d (the gate's verdict, reported)" in r.stdout, (
        r.stdout + r.stderr)
    assert client.search_model_versions(f"name = '{name}'") == []
    # make run's last line: the verdict, the primary criterion with its bound, the registry outcome
    r = subprocess.run([*CLI, *args, "summary"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| nodule3d | baseline |"))
    assert "| FAILED |" in row and "robust_linf_acc_eps0.005 0.781 (312/400), bound ≥ 0.7432 vs >= 0.7" in row, row
    assert "FAIL optimized_san_mas500, FAIL robust_l2_acc_eps1 |" in row
    assert "| not registered |" in row and "Reports: " in r.stdout


@pytest.mark.slow
def test_inconclusive_gate_registers_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctharden.stages import register as register_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = default_params(tmp_path)
    model, run_id = write_model(tmp_path, "m", 1, log=True, params=params)
    write_evaluation(params, "hardened", "nodule3d", model, run_id, samples=None)  # the run's own 16-48 samples
    gate_stage.run(params, "hardened", ["nodule3d"])
    (o,) = register_stage.run(params, "nodule3d", ["hardened"]).record["jobs"]["nodule3d"]
    assert o["status"] == "rejected" and o["verdict"] == "inconclusive"
    assert o["reason"].startswith("gate inconclusive: ") and "samples would decide it" in o["reason"]
    client = _client(params)
    assert client.get_run(run_id).data.tags["ctharden.gate"] == "inconclusive"
    assert client.search_model_versions("name = 'ctharden-nodule3d'") == []


@pytest.mark.slow
def test_promotion_rules_idempotence_and_champion_loads(registry_params: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    from ctharden.tracking.promotion import params_hash
    from ctharden.tracking.runs import load_model_ref

    params = registry_params
    name = gate_settings(params, "nodule3d").model_name
    client = _client(params)
    m1, r1 = write_model(tmp_path, "v1", 1, log=True, params=params)
    out = _gate_and_register(params, "hardened", m1, r1)  # measured: PGD L∞ acc 0.969 @ 0.005, AUC 0.9905
    (o,) = out["jobs"]["nodule3d"]
    assert o["status"] == "registered" and o["version"] == "1" and o["aliases"] == ["challenger", "champion"]
    mv = client.get_model_version(name, "1")
    tags = mv.tags
    low = proportion_interval(388, 400, sided="lower").lower
    assert tags["ctharden.gate"] == "passed"
    want = f"0.96875 (one-sided 95 % bound {low:.4g}, 388/400) >= 0.7: pass"
    assert tags["ctharden.gate.robust_linf_acc_eps0.005"] == want
    assert tags["ctharden.gate.optimized_san_mas500"].startswith("12.5 (one-sided 95 % bound 15.")
    assert tags["ctharden.dataset_hash"] == fixture("hardened")["nodule3d"]["dataset_hash"]
    assert len(tags["ctharden.git_sha"]) == 40 and tags["ctharden.params_hash"] == params_hash(params)
    assert tags["ctharden.report"].endswith("robustness_hardened/index.html")
    assert tags["ctharden.report_artifact"] == f"runs:/{r1}/robustness/index.html"
    assert "passing the robustness gate" in mv.description and "Robustness report" in mv.description
    assert client.get_run(r1).data.tags["ctharden.registered"] == f"models:/{name}/1"

    # idempotent: the same run again registers nothing new
    again = _gate_and_register(params, "hardened", m1, r1)
    assert again["jobs"]["nodule3d"][0]["status"] == "already registered"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    # better on the primary criterion by the paired test (6 samples only it survives, none only the
    # champion: exact McNemar p = 0.5^6), same clean scores: champion moves
    m2, r2 = write_model(tmp_path, "v2", 2, log=True, params=params)
    o2 = _gate_and_register(params, "hardened", m2, r2, **{"robust_ensemble_linf_acc_eps0.005": 0.985,
                                                          "robust_clean_test_auc": 0.985})["jobs"]["nodule3d"][0]
    assert o2["version"] == "2" and o2["promoted"] and o2["aliases"] == ["challenger", "champion"]
    assert "6 samples only the new version survives, 0 only the champion, of 400" in o2["champion_decision"]
    # a better point value that the paired test cannot tell from chance (2 discordant pairs): kept
    m3, r3 = write_model(tmp_path, "v3", 3, log=True, params=params)
    o3 = _gate_and_register(params, "hardened", m3, r3, **{"robust_ensemble_linf_acc_eps0.005": 0.99,
                                                          "robust_clean_test_auc": 0.985})["jobs"]["nodule3d"][0]
    assert o3["version"] == "3" and not o3["promoted"] and o3["aliases"] == ["challenger"]
    assert "not significantly better" in o3["champion_decision"]
    # significantly better on the primary criterion but clean scores no better than chance: kept
    m4, r4 = write_model(tmp_path, "v4", 4, log=True, params=params)
    o4 = _gate_and_register(params, "hardened", m4, r4, scores="random",
                            **{"robust_ensemble_linf_acc_eps0.005": 1.0})["jobs"]["nodule3d"][0]
    assert o4["version"] == "4" and not o4["promoted"] and "not non-inferior" in o4["champion_decision"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"  # nothing beat v2
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "4"

    # models:/<name>@champion loads and predicts: the pt2 model and the state_dict model file
    x = torch.rand(3, *SHAPE)
    graph = mlflow.pytorch.load_model(f"models:/{name}@champion")
    model, meta = load_model_ref(f"models:/{name}@champion")
    assert meta["mlflow_run_id"] == r2
    with torch.no_grad():
        expected = tiny_model(2)(x)
        assert torch.allclose(model.eval()(x), expected, atol=1e-5)
        assert torch.allclose(graph(x), expected, atol=1e-5)


@pytest.mark.slow
def test_stale_gate_record_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ctharden.stages import register as register_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = default_params(tmp_path)
    model, run_id = write_model(tmp_path, "m", 1, log=True, params=params)
    write_evaluation(params, "hardened", "nodule3d", model, run_id)
    gate_stage.run(params, "hardened")
    write_evaluation(params, "hardened", "nodule3d", model, run_id, **{"robust_ensemble_linf_acc_eps0.005": 0.95})
    with pytest.raises(DataError, match="re-run `ctharden gate`"):
        register_stage.run(params)
    gate_stage.run(params, "hardened")
    shutil.copyfile(write_model(tmp_path, "other", 7)[0], model)  # the model changed after the gate
    with pytest.raises(DataError, match="changed or vanished since it was gated"):
        register_stage.run(params)
    assert _client(params).search_model_versions("name = 'ctharden-nodule3d'") == []


# -- ci-gate ----------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


@pytest.mark.slow
def test_ci_gate_on_a_two_commit_repository(tmp_path: Path) -> None:
    """Commit 1 (base): the measured hardened metrics. Commit 2: PGD robust accuracy drops from 0.969
    to 0.875: still decided above the 0.70 threshold, but a regression beyond the 0.07 tolerance."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/robustness_hardened.json\n")
    _git(repo, "init", "-q", "-b", "main")
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=repo, check=True)
    model = write_model(tmp_path, "m", 1)[0]
    old = os.getcwd()
    os.chdir(repo)
    try:
        params = load_params("params.yaml")
        write_evaluation(params, "hardened", "nodule3d", model, "r1")
        write_outcome_file(params, "hardened", model, 0.96875)
    finally:
        os.chdir(old)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")

    def ci_gate(summary: Path) -> subprocess.CompletedProcess[str]:
        # a hang guard: measured 1.3 s
        return subprocess.run([*CLI, "ci-gate", "--base", "main", "--summary", str(summary)], cwd=repo,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})

    r = ci_gate(tmp_path / "same.md")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "**PASSED**" in (tmp_path / "same.md").read_text()

    _git(repo, "checkout", "-q", "-b", "pr")
    os.chdir(repo)
    try:
        write_evaluation(params, "hardened", "nodule3d", model, "r1", **{"robust_ensemble_linf_acc_eps0.005": 0.875})
        write_outcome_file(params, "hardened", model, 0.875)
    finally:
        os.chdir(old)
    _git(repo, "commit", "-q", "-am", "regress")
    r = ci_gate(tmp_path / "pr.md")
    assert r.returncode == 1, r.stdout + r.stderr
    md = (tmp_path / "pr.md").read_text()
    # decided by the paired test on the per-sample outcomes: 38 samples only the base survives, none only the head
    assert "robust_linf_acc_eps0.005 regressed 0.9688 -> 0.875 (paired McNemar p = 3.64e-12 < 0.05)" in r.stderr
    assert ("| nodule3d | hardened | `robust_linf_acc_eps0.005` | 0.9688 | 0.875 | 0.09375 | paired: 0 only head / "
            "38 only base of 400, McNemar p = 3.64e-12 | **REGRESSED** |") in md
    assert "dvc metrics diff main" in md and "robust_ensemble_linf_acc_eps0.005" in md, md  # dvc diff table
    assert "nodule3d | hardened | **gate** (95 % one-sided bounds) | | | | | **PASSED**" in md  # the gate passes

    r = subprocess.run([*CLI, "ci-gate", "--base", "nope"], cwd=repo, capture_output=True, text=True,
                       timeout=120)  # a hang guard: measured 0.6 s
    assert r.returncode == 1 and "base revision 'nope' not found" in r.stderr
