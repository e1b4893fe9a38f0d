"""The tune and harden stages and the hardened evaluation, end to end on the smoke profile (nodule3d)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SmokeTree, stage_overrides

from ctharden.config.params import load_params
from ctharden.core.errors import ConfigError, DataError

JOB = "nodule3d"


def _params(tmp: Path, *extra: str) -> dict[str, Any]:
    return load_params(REPO / "params.yaml", "smoke", [*stage_overrides(tmp), *extra])


@pytest.fixture(scope="module")
def trained(smoke_tree: SmokeTree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-profile nodule3d baseline, trained and evaluated, in a temp tree: a copy of the
    session's smoke tree (the module tunes, hardens and evaluates into it)."""
    tmp = tmp_path_factory.mktemp("harden")
    tree = smoke_tree.copy_to(tmp)
    assert tree.train[JOB].model_file.is_relative_to(tmp) and tree.evaluate.jobs[JOB]["n_models"] >= 1
    return tmp


@pytest.fixture(scope="module")
def tuned(trained: Path) -> dict[str, Any]:
    from ctharden.stages import tune as tune_stage

    return tune_stage.run(_params(trained, "tune.defaults.n_trials=3"), JOB).record


@pytest.mark.slow
def test_tune_enqueues_ima_suggestion_and_anchors_then_tpe(tuned: dict[str, Any], trained: Path) -> None:
    import optuna

    ima = tuned["ima"]
    assert ima is not None and 0 < ima["suggested_eps"] <= ima["eps_max"]
    assert (trained / "reports" / "tune" / JOB / "ima_margins.png").is_file()
    assert (trained / "artifacts" / "tune" / JOB / "ima_margins.csv").is_file()
    study = optuna.load_study(study_name=tuned["study"]["name"], storage=f"sqlite:///{tuned['study']['storage']}")
    eps = [t.params["eps"] for t in study.trials]
    assert len(eps) == 3
    suggested = min(max(ima["suggested_eps"], 0.002), 0.05)
    assert eps[0] == pytest.approx(suggested) and eps[1] == pytest.approx(0.01)  # IMA first, then the anchor
    floor = tuned["objective"]["auc_floor"]  # default: the baseline's validation AUC - 0.05
    assert floor == pytest.approx(tuned["baseline"]["clean_auc"] - 0.05)
    for t in study.trials:  # every trial carries its clean-AUC constraint, stored by Optuna
        rec = next(r for r in tuned["trials"] if r["number"] == t.number)
        acc_floor = tuned["objective"]["accuracy_floor"]
        assert t.constraints == {"clean_auc": pytest.approx(floor - rec["clean_auc"]),
                                 "clean_accuracy": pytest.approx(acc_floor - rec["clean_accuracy"])}
        assert rec["feasible"] == (rec["clean_auc"] >= floor and rec["clean_accuracy"] >= acc_floor)
    metrics = json.loads((trained / "metrics" / "tune" / f"{JOB}.json").read_text())
    assert metrics["eps"] == tuned["eps"] == tuned["best_trial"]["eps"]


@pytest.mark.slow
def test_tune_trials_are_nested_mlflow_runs(tuned: dict[str, Any], trained: Path) -> None:
    import mlflow

    from ctharden.tracking.runs import tracking_from_params

    mlflow.set_tracking_uri(tracking_from_params(_params(trained)).uri)  # MLFLOW_TRACKING_URI may override the db
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string=f"tags.mlflow.parentRunId = '{tuned['mlflow_run_id']}'")
    assert len(runs) == len(tuned["trials"])
    parent = mlflow.get_run(tuned["mlflow_run_id"])
    assert parent.data.metrics["chosen_eps"] == pytest.approx(tuned["eps"])


def test_auc_floor_combines_absolute_and_relative() -> None:
    from ctharden.config.hardening import TuneSettings
    from ctharden.stages.tune import auc_floor

    assert auc_floor(TuneSettings(min_clean_auc=None, max_auc_drop=0.05), 0.7) == pytest.approx(0.65)
    assert auc_floor(TuneSettings(min_clean_auc=0.9, max_auc_drop=0.05), 0.7) == pytest.approx(0.9)
    assert auc_floor(TuneSettings(min_clean_auc=0.5, max_auc_drop=None), 0.99) == pytest.approx(0.5)


def test_choice_respects_the_constraint() -> None:
    from ctharden.stages.tune import _choose

    trials = [
        {"number": 0, "eps": 0.05, "robust_accuracy": 0.9, "clean_auc": 0.6, "feasible": False},
        {"number": 1, "eps": 0.01, "robust_accuracy": 0.5, "clean_auc": 0.95, "feasible": True},
        {"number": 2, "eps": 0.02, "robust_accuracy": 0.7, "clean_auc": 0.92, "feasible": True},
    ]
    best, ok = _choose(trials)
    assert ok and best["number"] == 2  # the most robust *feasible* trial, not trial 0
    best, ok = _choose([dict(t, feasible=False) for t in trials])
    assert not ok and best["number"] == 1  # none feasible: the highest AUC, flagged


@pytest.mark.slow
def test_harden_and_hardened_evaluation(tuned: dict[str, Any], trained: Path) -> None:
    from ctharden.stages import evaluate as evaluate_stage
    from ctharden.stages import harden as harden_stage

    params = _params(trained)
    res = harden_stage.run(params, JOB).record
    assert res["method"] == "adv" and res["eps_source"] == "tune" and res["eps"] == pytest.approx(tuned["eps"])
    assert Path(res["model_file"]).is_file()
    assert set(res["curves"]) >= {"ce (baseline)"} and any(k.startswith("adv") for k in res["curves"])
    ima_curve = next(c for k, c in res["curves"].items() if k.startswith("ima"))  # the smoke profile compares IMA
    assert ima_curve["eps_train"] == pytest.approx(0.04)  # with its own ε_max, not the tuned adv ε
    for c in res["curves"].values():
        assert c["eps"][0] == 0.0 and len(c["accuracy"]) == len(c["eps"])
        assert all(0.0 <= a <= 1.0 for a in c["accuracy"])
    reports = trained / "reports" / "harden" / JOB
    assert (reports / "methods_linf.png").is_file() and (reports / "ima_margins.png").is_file()

    out = evaluate_stage.run(params, "hardened", [JOB])
    m = out.jobs[JOB]
    assert m["variant"] == "hardened" and m["hardening"]["method"] == "adv" and m["n_models"] == 1
    summary = Path(out.report["summary"]).read_text()
    assert "baseline vs hardened" in summary and "| baseline |" in summary and "| hardened (adv" in summary
    html = Path(out.report["html"]).read_text()
    assert "Hardening methods" in html
    assert (trained / "metrics" / "robustness_hardened.json").is_file()
    baseline = json.loads((trained / "metrics" / "robustness.json").read_text())
    assert baseline[JOB].get("variant", "baseline") == "baseline"  # the baseline metrics are untouched


@pytest.mark.slow
def test_harden_needs_an_eps(trained: Path) -> None:
    from ctharden.stages import harden as harden_stage

    params = _params(trained, f"paths.metrics={trained / 'empty_metrics'}")
    with pytest.raises(DataError, match="no training ε"):
        harden_stage.run(params, JOB)


@pytest.mark.parametrize("override,message", [
    ("harden.defaults.method=magic", "harden.method"),
    ("harden.jobs.nodule3d.compare=[adv, foo]", r"compare\[1\] = 'foo'.* must be one of adv, ima"),
    ("harden.jobs.nodule3d.epochs=0", "harden.epochs"),
    ("tune.defaults.eps_low=0.1", "eps_low must be below"),
    ("tune.defaults.anchors=[0.9]", "anchors must lie"),
    ("tune.defaults.max_auc_drop=null", "clean-AUC floor"),
    ("harden.defaults.bogus=1", "unknown keys"),
])
def test_bad_settings_fail_before_work(tmp_path: Path, override: str, message: str) -> None:
    from ctharden.stages import harden as harden_stage
    from ctharden.stages import tune as tune_stage

    with pytest.raises(ConfigError, match=message):  # the params schema may refuse it already when loading
        params = _params(tmp_path, override)
        tune_stage.run(params, JOB) if override.startswith("tune") else harden_stage.run(params, JOB)


@pytest.mark.slow
def test_an_infeasible_floor_is_reported(smoke_tree: SmokeTree, tmp_path: Path) -> None:
    """On its own copy of the trained tree: it writes tune metrics."""
    from ctharden.stages import tune as tune_stage

    smoke_tree.copy_to(tmp_path)
    params = _params(tmp_path, "tune.defaults.n_trials=1", "tune.defaults.ima_seed=false",
                     "tune.defaults.min_clean_auc=1.0")
    res = tune_stage.run(params, JOB).record
    assert res["ima"] is None and len(res["trials"]) == 1
    t = res["trials"][0]
    assert res["feasible"] == t["feasible"]
    assert not t["feasible"] or t["clean_auc"] >= 1.0
