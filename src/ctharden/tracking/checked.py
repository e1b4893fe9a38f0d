"""Register a team's own model after ``ctharden check`` passed: ``ctharden check --register NAME``.

Only a ``pass`` registers (a failed or inconclusive check returns ``status: rejected`` and writes
nothing to MLflow). A pass gives, in the ``tracking`` store of ``params.yaml`` (or
``MLFLOW_TRACKING_URI``):

- an MLflow run in the experiment ``<experiment>-check`` holding the check's headline metrics, its
  report, ``gate.json``, ``robustness.json`` and per-sample outcomes (``robustness/outcomes.json``,
  what champion promotion pairs), and the model as a bundle under ``model/``
  (:func:`ctharden.models.sources.write_bundle`: the model file or MLflow model with its
  ``contract.yaml``, so ``models:/NAME/<version>`` loads with :func:`~ctharden.models.sources.load_any`
  and can be checked again without a contract file);
- a version of the registered model ``NAME`` from that bundle with the tags a pipeline model gets
  (gate verdict and every criterion with its bound, dataset hash, model sha256, git sha, params
  hash, report links; :func:`ctharden.tracking.promotion.version_tags`), ``challenger`` moved to it,
  and ``champion`` moved to it only when there is none or the paired tests on both checks'
  per-sample outcomes say so (:func:`ctharden.tracking.promotion.champion_decision`).

Re-registering the same model file (same sha256) under the same name is reported as
``already registered``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctharden.core.io import atomic_write_json, sha256_file, tree_sha256
from ctharden.gate.criteria import VERDICT_WORD, gate_settings, reasons, verdict_of
from ctharden.models.sources import write_bundle
from ctharden.tracking.promotion import COMPLETE, TAG, complete_version, version_tags
from ctharden.tracking.runs import OUTCOMES_ARTIFACT, Tracking, configure, tracking_from_params

VARIANT = "external"


def model_sha256(ref: str) -> str:
    """The sha256 of a model file, or of a model directory's files (:func:`~ctharden.core.io.tree_sha256`);
    for a ``runs:/``/``models:/`` URI, of the URI itself (the store keeps that version fixed)."""
    path = Path(ref)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return tree_sha256(path)
    return hashlib.sha256(ref.encode()).hexdigest()


def _check_tracking(params: Mapping[str, Any]) -> Tracking:
    t = tracking_from_params(params)
    return Tracking(t.uri, t.artifacts, f"{t.experiment}-check")


def register_checked(params: Mapping[str, Any], record: Mapping[str, Any], result: Mapping[str, Any], name: str,
                     *, out_dir: Path, contract_file: str | Path | None = None,
                     factory: str | None = None) -> dict[str, Any]:
    """Register the model of a ``ctharden check`` gate ``record`` (with its evaluation ``result``)
    as ``name`` if the check passed (see the module docstring). Returns what happened:
    ``status`` (``registered`` | ``already registered`` | ``rejected``), ``name``, ``version``,
    ``aliases``, ``champion_decision``, ``run_id``, or ``reason`` for a rejection."""
    import mlflow

    verdict = verdict_of(record)
    if not record["passed"]:
        return {"status": "rejected", "name": name, "verdict": verdict,
                "reason": f"gate {VERDICT_WORD[verdict]}: {reasons(record)}"}
    ref = str(record["model"]["file"])
    sha = model_sha256(ref)
    configure(_check_tracking(params))
    client = mlflow.MlflowClient()
    if client.search_registered_models(filter_string=f"name = '{name}'"):
        for v in client.search_model_versions(f"name = '{name}'"):
            tags = v.tags or {}
            if tags.get(f"{TAG}.model_sha256") == sha and tags.get(COMPLETE) == "complete":
                return {"status": "already registered", "name": name, "version": str(v.version),
                        "run_id": v.run_id, "aliases": sorted(client.get_model_version(name, v.version).aliases)}
    else:
        client.create_registered_model(name, tags={f"{TAG}.source": "ctharden check"}, description=(
            f"{name}: a model checked by `ctharden check`. Versions are registered only after passing the "
            "robustness gate; `champion` is the best by the gate's primary criterion (paired tests), "
            "`challenger` the newest."))
    policy = str(record.get("policy", "default"))
    outcomes = {"model_sha256": sha, **(result.get("outcomes") or {})}
    with mlflow.start_run(run_name=f"check {name}") as run, tempfile.TemporaryDirectory() as tmp:
        run_id = run.info.run_id
        mlflow.log_params({"model": ref[:500], "policy": policy, "source": record["model"].get("arch", "?"),
                           "dataset": record["dataset"]["dir"][:500]})
        mlflow.log_metrics(dict(result.get("headline") or {}))
        for f in ("index.html", "gate.json", "robustness.json"):
            if (out_dir / f).is_file():
                mlflow.log_artifact(str(out_dir / f), "robustness")
        mlflow.log_dict(outcomes, OUTCOMES_ARTIFACT)
        bundle = write_bundle(ref, Path(tmp) / "model", contract_file=contract_file, factory=factory)
        mlflow.log_artifacts(str(bundle), "model")
        source = f"{run.info.artifact_uri}/model"
    tagged = {**record, "job": name, "variant": VARIANT, "dataset": Path(record["dataset"]["dir"]).name,
              "dataset_hash": record["dataset"]["hash"], "model": {**record["model"], "sha256": sha},
              "evaluation": {"report": record["report"]}}
    mv = client.create_model_version(name, source=source, run_id=run_id)
    tags = version_tags(params, tagged, result, run_id)
    tags.pop(f"{TAG}.data_dvc_md5", None)  # the repository's sample data, not the checked dataset
    tags[f"{TAG}.policy"] = policy
    done = complete_version(params, tagged, client, mv, run_id, tags=tags, outcomes=outcomes,
                            gate=gate_settings(params, policy))
    out = {"status": "registered", "name": name, "run_id": run_id, **done}
    atomic_write_json(out_dir / "registration.json", out)
    return out
