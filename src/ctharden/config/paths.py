"""Every on-disk path of the pipeline, resolved from ``params.yaml``'s ``paths:`` section.

Stages, the gate, the registry and the flows ask here where a stage writes; nothing else spells a
path. All paths are relative to the working directory (the repository root under ``dvc repro``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctharden.config import choices
from ctharden.config.params import section
from ctharden.core.errors import ConfigError

#: The evaluated variants of a job: its trained baseline and its hardened model.
VARIANTS = choices.VARIANTS


def dataset_names(params: Mapping[str, Any]) -> list[str]:
    """The dataset names configured under ``datasets:``, in file order."""
    return list(section(params, "datasets"))


def dataset_spec(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A copy of ``datasets.<name>``; :class:`ConfigError` names the configured datasets otherwise."""
    specs = section(params, "datasets")
    if name not in specs:
        raise ConfigError(f"unknown dataset {name!r} (configured: {', '.join(specs)})")
    return dict(specs[name])


def dataset_dir(params: Mapping[str, Any], name: str) -> Path:
    """Where dataset ``name`` is written: ``paths.datasets/<name>``."""
    dataset_spec(params, name)
    return Path(section(params, "paths.datasets")) / name


def validation_dir(params: Mapping[str, Any], name: str) -> Path:
    """Where the validation of dataset ``name`` (Data Docs, validation.json) is written."""
    return Path(section(params, "paths.validation")) / name


def metrics_path(params: Mapping[str, Any], stage: str, name: str) -> Path:
    """``paths.metrics/<stage>/<name>.json``: a stage's metrics (DVC metrics, committed to git)."""
    return Path(section(params, "paths.metrics")) / stage / f"{name}.json"


def train_paths(params: Mapping[str, Any], job: str) -> dict[str, Path]:
    """Where the train stage writes for ``job``: model files, checkpoints, reports, DVC plot data
    and its metrics file."""
    art = Path(section(params, "paths.artifacts"))
    return {
        "models": art / "models" / job,
        "checkpoints": art / "checkpoints" / job,
        "reports": Path(section(params, "paths.reports")) / "train" / job,
        "plots": Path(section(params, "paths.plots")) / "train" / job,
        "metrics": metrics_path(params, "train", job),
    }


def evaluation_paths(params: Mapping[str, Any], variant: str = "baseline") -> dict[str, Path]:
    """Where the evaluation writes: metrics JSON, plot data root, report directory (``robustness``
    for the baselines, ``robustness_hardened`` for the hardened models)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown evaluation variant {variant!r} (choose from {list(VARIANTS)})")
    name = "robustness" if variant == "baseline" else "robustness_hardened"
    return {
        "metrics": Path(section(params, "paths.metrics")) / f"{name}.json",
        "plots": Path(section(params, "paths.plots")) / name,
        "reports": Path(section(params, "paths.reports")) / name,
    }


def outcomes_path(params: Mapping[str, Any], variant: str, job: str) -> Path:
    """The per-sample outcomes of a job's evaluation (which test samples each attack broke, by
    sample id): what paired tests (champion promotion, the pull-request check) compare. Kept
    beside the metrics (committed with git, ``metrics/outcomes/<variant>/<job>.json``) so that the
    pull-request check can read the base revision's."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown evaluation variant {variant!r} (choose from {list(VARIANTS)})")
    return Path(section(params, "paths.metrics")) / "outcomes" / variant / f"{job}.json"


def tune_paths(params: Mapping[str, Any], job: str) -> dict[str, Path]:
    """Where the tune stage writes for ``job``."""
    return {
        "dir": Path(section(params, "paths.artifacts")) / "tune" / job,
        "reports": Path(section(params, "paths.reports")) / "tune" / job,
        "metrics": metrics_path(params, "tune", job),
    }


def harden_paths(params: Mapping[str, Any], job: str) -> dict[str, Path]:
    """Where the harden stage writes for ``job``."""
    return {
        "models": Path(section(params, "paths.artifacts")) / "hardened" / job,
        "reports": Path(section(params, "paths.reports")) / "harden" / job,
        "metrics": metrics_path(params, "harden", job),
    }


def gate_path(params: Mapping[str, Any]) -> Path:
    """``paths.metrics/gate.json``: every gated model's verdict."""
    return Path(section(params, "paths.metrics")) / "gate.json"


def registration_record_path(params: Mapping[str, Any]) -> Path:
    """``paths.metrics/register.json``: what the register stage did."""
    return Path(section(params, "paths.metrics")) / "register.json"


def champion_record_path(params: Mapping[str, Any], job: str) -> Path:
    """``paths.metrics/champion/<job>.json``: the nightly re-evaluation of the job's champion."""
    return metrics_path(params, "champion", job)
