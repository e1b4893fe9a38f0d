"""MLflow model-registry promotion: register a model only if its robustness gate passed.

``ctharden register`` (and the flows' register task) call :func:`register`, which for every job
takes the gate's records from ``metrics/gate.json`` (baseline first, then hardened) and:

- refuses a record that no longer matches what was evaluated (model file hash, headline metrics);
- for a failed or inconclusive gate (:mod:`ctharden.gate.criteria`: decided on confidence bounds)
  registers nothing, tags the model's MLflow run ``ctharden.gate=rejected`` (failed) or
  ``ctharden.gate=inconclusive`` with the reasons and reports them;
- for a passed gate registers (or finds) a version of ``gate.model_name`` from the model's run
  (the pt2 model logged by training/hardening; its run also holds ``model_file/model.pt``), tags it
  (gate verdict, every gated metric, dataset version, git sha, params hash, report links), sets a
  description, moves ``challenger`` to it, and moves ``champion`` to it only if (or if there is no
  champion) the paired tests on both evaluations' per-sample outcomes say so
  (:mod:`ctharden.gate.champion`): better on the primary criterion by an exact McNemar test at
  ``gate.champion.alpha``, clean AUC non-inferior within ``gate.champion.max_clean_auc_drop``.

Re-running is idempotent: a run already registered (tag ``ctharden.registration=complete``) is
reported as such and its aliases are left alone. Writes ``metrics/register.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ctharden.config.paths import outcomes_path
from ctharden.core.errors import DataError
from ctharden.core.io import load_json, sha256_file
from ctharden.data.version import data_version
from ctharden.evaluation.headline import CLEAN_TEST_AUC
from ctharden.gate.champion import promotion_decision
from ctharden.gate.criteria import VERDICT_WORD, GateSettings, gate_settings, reasons, verdict_of
from ctharden.tracking.runs import OUTCOMES_ARTIFACT

log = logging.getLogger(__name__)
TAG = "ctharden"
COMPLETE = f"{TAG}.registration"
CHAMPION, CHALLENGER = "champion", "challenger"
ORDER = ("baseline", "hardened")


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the resolved params (canonical JSON): what the model was produced and gated with."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def code_version(repo: str | Path = ".") -> dict[str, Any]:
    """``{"git_sha", "dirty"}`` of the checkout (None outside a git repository)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha, "dirty": bool(status) if status is not None else None}


def verify_record(params: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """Check that a gate record still describes the evaluated model; return the evaluation result.

    Raises :class:`DataError` when the model file changed since the gate, or the evaluation's
    metrics no longer equal the values the gate decided on (re-run ``ctharden gate``)."""
    job, variant = record["job"], record["variant"]
    model_file = Path(record["model"]["file"])
    if not model_file.is_file() or sha256_file(model_file) != record["model"]["sha256"]:
        raise DataError(f"{job} ({variant}): {model_file} changed or vanished since it was gated; "
                        "re-run the evaluation and `ctharden gate`")
    metrics = Path(record["evaluation"]["metrics"])
    if not metrics.is_file():
        raise DataError(f"{job} ({variant}): evaluation metrics {metrics} not found")
    result: dict[str, Any] | None = load_json(metrics).get(job)
    if result is None:
        raise DataError(f"{job} ({variant}): {metrics} has no evaluation of {job}")
    for row in record["criteria"].values():
        now = result["headline"].get(row["metric"])
        if (now is None) != (row["value"] is None) or (now is not None and float(now) != row["value"]):
            raise DataError(f"{job} ({variant}): {row['metric']} is {now} in {metrics} but the gate decided on "
                            f"{row['value']}; re-run `ctharden gate`")
    if result["model"].get("mlflow_run_id") != record["model"]["mlflow_run_id"]:
        raise DataError(
            f"{job} ({variant}): the gate's MLflow run differs from the evaluation's; re-run `ctharden gate`"
        )
    return result


def _model_uri(client: Any, run_id: str) -> str:
    """URI of the pt2 model logged in ``run_id`` (its LoggedModel), else ``runs:/<id>/model``."""
    import mlflow

    run = client.get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'", output_format="list")
    named = [m for m in found if m.name == "model"]
    if named:
        return f"models:/{named[0].model_id}"
    return f"runs:/{run_id}/model"


def version_tags(params: Mapping[str, Any], record: Mapping[str, Any], result: Mapping[str, Any],
                 run_id: str) -> dict[str, str]:
    """The tags of a registered version of a passed gate ``record`` (its evaluation ``result``,
    logged in ``run_id``): verdict, job, variant, dataset and data version, git sha, params hash,
    model sha256, primary criterion, clean AUC, report links, and every criterion with its bound."""
    data = data_version(params)
    code = code_version()
    tags = {
        f"{TAG}.gate": "passed", f"{TAG}.job": record["job"], f"{TAG}.variant": record["variant"],
        f"{TAG}.dataset": record["dataset"], f"{TAG}.dataset_hash": record["dataset_hash"],
        f"{TAG}.data_dvc_md5": str(data.get("data_dvc_md5")),
        f"{TAG}.git_sha": str(code["git_sha"]), f"{TAG}.git_dirty": str(code["dirty"]),
        f"{TAG}.params_hash": params_hash(params), f"{TAG}.profile": str(params.get("profile")),
        f"{TAG}.model_sha256": record["model"]["sha256"],
        f"{TAG}.primary": record["primary"]["criterion"],
        f"{TAG}.primary_value": repr(record["primary"]["value"]),
        f"{TAG}.clean_test_auc": repr(result["headline"].get(CLEAN_TEST_AUC)),
        f"{TAG}.report": Path(record["evaluation"]["report"]).resolve().as_uri(),
        f"{TAG}.report_artifact": f"runs:/{run_id}/robustness/index.html",
    }
    for name, row in record["criteria"].items():
        verdict = "pass" if row["passed"] else "FAIL"
        bound = ""
        if row.get("lower") is not None:
            b = row["lower"] if row["op"] == ">=" else row["upper"]
            n = f"{row['k']}/{row['n']}" if row.get("k") is not None else f"n={row['n']}"
            bound = f" (one-sided {int(100 * row['confidence'])} % bound {b:.4g}, {n})"
        tags[f"{TAG}.gate.{name}"] = f"{_fmt(row['value'])}{bound} {row['op']} {row['threshold']:g}: {verdict}"
    if record.get("hardening"):
        h = record["hardening"]
        tags[f"{TAG}.hardening"] = f"{h['method']} eps={h.get('eps')} ({h.get('norm')}, {h.get('eps_source')})"
    return tags


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.6g}"


def _description(record: Mapping[str, Any], run_id: str) -> str:
    rows = [f"- {r['description']}: {_fmt(r['value'])} ({r['op']} {r['threshold']:g}) pass"
            for r in record["criteria"].values()]
    h = record.get("hardening")
    what = f"hardened ({h['method']}, eps {h.get('eps')})" if h else "baseline"
    return (f"{record['job']} {what} model ({record['model']['arch']}), registered by ctharden after passing the "
            f"robustness gate on dataset {record['dataset']} ({record['dataset_hash'][:12]}).\n\n" + "\n".join(rows)
            + f"\n\nRobustness report: {record['evaluation']['report']} (also runs:/{run_id}/robustness/index.html)")


def champion_outcomes(client: Any, champion: Any) -> dict[str, Any] | None:
    """The per-sample outcomes of the champion's evaluation (its run's ``robustness/outcomes.json``),
    None when its run holds none (evaluated before paired tests existed)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path=OUTCOMES_ARTIFACT)
    except (MlflowException, OSError):
        return None
    found: dict[str, Any] = load_json(path)
    return found


def champion_decision(params: Mapping[str, Any], record: Mapping[str, Any], new: Any, champion: Any | None,
                      client: Any, *, outcomes: Mapping[str, Any] | None = None,
                      gate: GateSettings | None = None) -> tuple[bool, str]:
    """Should ``new`` (a model version of the gated ``record``) replace ``champion``? Returns
    ``(promote, why)``: by the paired tests of :func:`ctharden.gate.champion.promotion_decision` on
    the two evaluations' per-sample outcomes (same samples, same seeds). ``outcomes`` and ``gate``:
    the new evaluation's outcomes and the gate settings when they are not the pipeline's (the
    job's outcomes file and ``gate_settings(params, job)``)."""
    if champion is None:
        return True, "no champion yet"
    if str(champion.version) == str(new.version):
        return True, "already champion"
    metric_new, metric_old = (new.tags or {}).get(f"{TAG}.primary"), (champion.tags or {}).get(f"{TAG}.primary")
    if metric_new != metric_old:
        return False, f"primary criterion differs from the champion's ({metric_new} vs {metric_old}): not comparable"
    gs = gate or gate_settings(params, record["job"])
    if outcomes is None:
        mine = outcomes_path(params, record["variant"], record["job"])
        if not mine.is_file():
            return False, f"no per-sample outcomes of this evaluation ({mine}); re-run the evaluation"
        new_out = load_json(mine)
        if new_out.get("model_sha256") != record["model"]["sha256"]:
            return False, f"{mine} is of another model than the one gated; re-run the evaluation"
    else:
        new_out = dict(outcomes)
    old_out = champion_outcomes(client, champion)
    if old_out is None:
        return False, (f"champion v{champion.version} has no per-sample outcomes to pair with; re-evaluate it "
                       "(the nightly re-evaluation) before it can be replaced")
    try:
        promote, why, _ = promotion_decision(new_out, old_out, gs.criterion(gs.primary), alpha=gs.alpha,
                                             max_auc_drop=gs.max_clean_auc_drop)
    except DataError as exc:
        return False, f"not comparable with champion v{champion.version}: {exc}"
    return promote, f"vs champion v{champion.version}: {why}"


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def register_record(params: Mapping[str, Any], record: Mapping[str, Any], client: Any) -> dict[str, Any]:
    """Register one gated model (see the module docstring); returns what happened."""
    import mlflow
    from mlflow.exceptions import MlflowException

    job, variant = record["job"], record["variant"]
    result = verify_record(params, record)
    run_id = record["model"]["mlflow_run_id"]
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException:
            raise DataError(f"{job} ({variant}): MLflow run {run_id} is not in the tracking store "
                            f"{mlflow.get_tracking_uri()}; re-run the stage that produced the model") from None
    verdict = verdict_of(record)
    out: dict[str, Any] = {"job": job, "variant": variant, "run_id": run_id, "gate_passed": record["passed"],
                           "verdict": verdict}
    if not record["passed"]:  # failed or inconclusive: only a pass registers
        why = reasons(record)
        if run_id:
            client.set_tag(run_id, f"{TAG}.gate", "rejected" if verdict == "fail" else "inconclusive")
            client.set_tag(run_id, f"{TAG}.gate.reasons", why[:5000])
        return {**out, "status": "rejected", "reason": f"gate {VERDICT_WORD[verdict]}: {why}"}
    if not run_id:
        raise DataError(f"{job} ({variant}) passed the gate but has no MLflow run to register from")
    gs = gate_settings(params, job)
    name = gs.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={f"{TAG}.job": job}, description=(
            f"ctharden {job} classifier. Versions are registered only after passing the robustness gate "
            "(params.yaml `gate`); `champion` is the best by the gate's primary metric, `challenger` the newest."))
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    done = [v for v in existing if (v.tags or {}).get(COMPLETE) == "complete"]
    if done:
        mv = done[0]
        return {**out, "status": "already registered", "name": name, "version": str(mv.version),
                "aliases": sorted(client.get_model_version(name, mv.version).aliases)}
    mv = existing[0] if existing else mlflow.register_model(_model_uri(client, run_id), name)
    finished = complete_version(params, record, client, mv, run_id, tags=version_tags(params, record, result, run_id),
                                description=_description(record, run_id))
    return {**out, "status": "registered", "name": name, **finished}


def complete_version(params: Mapping[str, Any], record: Mapping[str, Any], client: Any, mv: Any, run_id: str, *,
                     tags: Mapping[str, str], description: str | None = None,
                     outcomes: Mapping[str, Any] | None = None, gate: GateSettings | None = None) -> dict[str, Any]:
    """Finish registering the new version ``mv`` of a passed ``record``: its ``tags`` (and
    ``description``), ``challenger`` moved to it, ``champion`` too when
    :func:`champion_decision` says so, the decision and the completion tag on the version, the
    run tagged ``passed`` and ``registered``. Returns ``version``, ``promoted``,
    ``champion_decision`` and ``aliases``."""
    name = mv.name
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, value)
    if description is not None:
        client.update_model_version(name, mv.version, description=description)
    mv = client.get_model_version(name, mv.version)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    promote, why = champion_decision(params, record, mv, alias_version(client, name, CHAMPION), client,
                                     outcomes=outcomes, gate=gate)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    client.set_model_version_tag(name, mv.version, f"{TAG}.champion_decision",
                                 ("promoted: " if promote else "kept: ") + why)
    client.set_model_version_tag(name, mv.version, COMPLETE, "complete")
    client.set_tag(run_id, f"{TAG}.gate", "passed")
    client.set_tag(run_id, f"{TAG}.registered", f"models:/{name}/{mv.version}")
    return {"version": str(mv.version), "promoted": promote, "champion_decision": why,
            "aliases": sorted(client.get_model_version(name, mv.version).aliases)}


def unregistered_jobs(summary: Mapping[str, Any], jobs: Iterable[str]) -> list[str]:
    """Jobs for which no variant passed the gate (nothing registered, nothing already registered)."""
    return [job for job in jobs
            if not any(o["status"] in ("registered", "already registered") for o in summary["jobs"].get(job, []))]


def register_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table of the registration outcome per job and variant."""
    lines = ["| job | model | gate | registry | champion |", "|---|---|---|---|---|"]
    for job, outcomes in summary["jobs"].items():
        champ = summary["champions"].get(job) or {}
        for o in outcomes:
            if o["status"] == "rejected":
                reg = f"rejected: {o['reason']}"
            else:
                reg = f"{o['status']}: {o['name']} v{o['version']} ({', '.join(o['aliases']) or 'no alias'})"
                if o.get("champion_decision"):
                    reg += f"; {o['champion_decision']}"
            gate = VERDICT_WORD[o.get("verdict") or ("pass" if o["gate_passed"] else "fail")]
            lines.append(f"| {job} | {o['variant']} | {gate} | {reg} | "
                         f"{champ.get('name', '')} v{champ.get('version')} |")
    return "\n".join(lines)
