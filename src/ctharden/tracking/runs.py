"""MLflow tracking: SQLite backend under the project, artifacts in ``mlruns/``, and model references.

``params.yaml`` ``mlflow:`` holds the database file, the artifact root and the experiment name;
``MLFLOW_TRACKING_URI`` in the environment overrides the database (e.g. a team server). MLflow's
active run is per thread, so code that runs in Prefect tasks passes run ids explicitly.

A model reference (``ctharden evaluate --model REF``) is one of: a model file path
(``model.pt``), an MLflow run id (32 hex) or ``runs:/<run_id>``, or a registry URI
``models:/<name>/<version>`` / ``models:/<name>@<alias>``. Runs store the model file as the
artifact ``model_file/model.pt``; that is what every reference resolves to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctharden.core.errors import ConfigError, DataError
from ctharden.models.files import load_model

MODEL_FILE_ARTIFACT = "model_file"
#: Where an evaluation logs its per-sample outcomes in the model's run (paired champion tests).
OUTCOMES_ARTIFACT = "robustness/outcomes.json"
MAX_PARAM_LEN = 6000
_ENV = "MLFLOW_TRACKING_URI"
# URIs that configure() put into the environment itself (mlflow.set_tracking_uri exports the URI so
# that subprocesses inherit it): those are not a user's override for the next params in this process.
_EXPORTED_BY_US: set[str] = set()


@dataclass(frozen=True)
class Tracking:
    """Where MLflow writes. ``uri`` is the tracking + registry URI; ``artifacts`` a local directory."""

    uri: str
    artifacts: Path
    experiment: str


def tracking_from_params(params: Mapping[str, Any]) -> Tracking:
    """Resolve the ``mlflow:`` section (paths relative to the working directory)."""
    cfg = params.get("mlflow") or {}
    env = os.environ.get(_ENV)
    user = env if env and env not in _EXPORTED_BY_US else None
    uri = user or f"sqlite:///{Path(cfg.get('db', 'mlflow.db')).resolve()}"
    return Tracking(uri, Path(cfg.get("artifacts", "mlruns")).resolve(), str(cfg.get("experiment", "ctharden")))


def configure(tracking: Tracking) -> str:
    """Point MLflow at ``tracking`` and return the experiment id (created with the artifact root)."""
    import mlflow

    if os.environ.get(_ENV) != tracking.uri:
        _EXPORTED_BY_US.add(tracking.uri)
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    exp = mlflow.get_experiment_by_name(tracking.experiment)
    if exp is None:
        tracking.artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(tracking.experiment, artifact_location=tracking.artifacts.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values stringified and cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_LEN]
    return out


def run_id_of(ref: str) -> str:
    """The MLflow run id behind a run id, ``runs:/`` URI or ``models:/`` registry URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if re.fullmatch(r"[0-9a-f]{32}", ref):
        return ref
    if ref.startswith("runs:/"):
        return ref[len("runs:/"):].split("/", 1)[0]
    m = re.fullmatch(r"models:/([^/@]+)(?:/(\w+)|@(\w+))", ref)
    if not m:
        raise ConfigError(f"model reference {ref!r} is not a file, run id, runs:/ or models:/ URI")
    name, version, alias = m.groups()
    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise DataError(f"{ref}: not found in the model registry ({exc.message})") from None
    if mv.run_id is None:
        raise DataError(f"{ref}: the registered model version has no source MLflow run")
    return mv.run_id


def load_model_ref(ref: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Load a :class:`~ctharden.models.CTClassifier` from any model reference; returns ``(model, meta)``."""

    path = Path(ref)
    if path.is_file():
        return load_model(path)
    ref = str(ref)
    if not (re.fullmatch(r"[0-9a-f]{32}", ref) or ref.startswith(("runs:/", "models:/"))):
        raise DataError(f"{ref}: no such model file, and not a run id, runs:/ or models:/ URI")
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run_id_of(ref)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{MODEL_FILE_ARTIFACT}/model.pt")
    except MlflowException as exc:
        raise DataError(f"{ref}: run {run_id} has no {MODEL_FILE_ARTIFACT}/model.pt ({exc.message})") from None
    model, meta = load_model(local)
    return model, {**meta, "mlflow_run_id": run_id}


def log_pytorch_model(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Log the model to MLflow (pt2 format, signature from a batch-of-2 input example)."""
    import mlflow
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    x = example.cpu().float()
    with torch.no_grad():
        y = model(x)
    mlflow.pytorch.log_model(model, name="model", input_example=x.numpy(),
                             signature=infer_signature(x.numpy(), y.numpy()))
