"""The one result type of every stage's ``run(params, name, ...)``.

A stage's result is the JSON record it wrote (its DVC metrics file, unchanged in shape) plus
typed accessors for what callers read from it, so that the CLI, the flows and the tests name a
field once, here, instead of indexing nested dicts. (The gate's result lives with its stage,
:class:`ctharden.stages.gate.GateResult`, since it applies the gate's rules.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageResult:
    """What a stage did. ``stage``: its name in ``dvc.yaml``; ``name``: the dataset, job or
    variant it ran for; ``record``: the JSON it wrote to ``metrics`` (``None``: it writes none of
    its own)."""

    stage: str
    name: str
    record: Mapping[str, Any] = field(repr=False)
    metrics: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written to the stage's metrics file."""
        return dict(self.record)


@dataclass(frozen=True)
class IngestResult(StageResult):
    """A dataset built from its source (``metrics/ingest/<dataset>.json``)."""

    @property
    def n_samples(self) -> int:
        return int(self.record["n_samples"])


@dataclass(frozen=True)
class ValidateResult(StageResult):
    """A dataset's Great Expectations verdict (``metrics/validate/<dataset>.json``)."""

    @property
    def success(self) -> bool:
        return bool(self.record["success"])

    @property
    def content_hash(self) -> str:
        return str(self.record["content_hash"])


@dataclass(frozen=True)
class TrainResult(StageResult):
    """A trained job (``metrics/train/<job>.json``): the selected fold model and its MLflow run."""

    @property
    def model_file(self) -> Path:
        return Path(self.record["model_file"])

    @property
    def run_id(self) -> str:
        return str(self.record["mlflow"]["run_id"])

    @property
    def test_mean_std(self) -> dict[str, dict[str, Any]]:
        return dict(self.record["test_mean_std"])


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    """Every evaluated job of one variant (``metrics/robustness.json`` or
    ``metrics/robustness_hardened.json``, keyed by job) and the report's files."""

    report: Mapping[str, str] = field(default_factory=dict)

    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        return dict(self.record)

    @property
    def html(self) -> Path:
        return Path(self.report["html"])


@dataclass(frozen=True)
class TuneResult(StageResult):
    """The tuned training ε of a job's hardening method (``metrics/tune/<job>.json``)."""

    @property
    def eps(self) -> float | None:
        eps = self.record.get("eps")
        return None if eps is None else float(eps)

    @property
    def feasible(self) -> bool:
        return bool(self.record.get("feasible", False))


@dataclass(frozen=True)
class HardenResult(StageResult):
    """A hardened job (``metrics/harden/<job>.json``): the model, its method and ε."""

    @property
    def model_file(self) -> Path:
        return Path(self.record["model_file"])

    @property
    def method(self) -> str:
        return str(self.record["method"])

    @property
    def run_id(self) -> str | None:
        run_id = self.record["mlflow"]["run_id"]
        return None if run_id is None else str(run_id)

    @property
    def eps(self) -> float | None:
        eps = self.record.get("eps")
        return None if eps is None else float(eps)


@dataclass(frozen=True)
class RegisterResult(StageResult):
    """What the registry holds after registration (``metrics/register.json``)."""

    @property
    def unregistered(self) -> list[str]:
        """Jobs of this run without a registered model that passed its gate."""
        jobs = self.record["jobs"] if self.name == "all" else [self.name]
        return [job for job in jobs
                if not any(o["status"] in ("registered", "already registered")
                           for o in self.record["jobs"].get(job, []))]
