"""The configured training jobs: ``train.defaults`` deep-merged with ``train.jobs.<job>``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctharden.config.params import deep_merge, section
from ctharden.core.errors import ConfigError


def job_names(params: Mapping[str, Any]) -> list[str]:
    """Training jobs configured under ``train.jobs``, in file order."""
    return list(section(params, "train.jobs"))


def job_config(params: Mapping[str, Any], job: str) -> dict[str, Any]:
    """``train.defaults`` deep-merged with ``train.jobs.<job>``."""
    jobs = section(params, "train.jobs")
    if job not in jobs:
        raise ConfigError(f"unknown training job {job!r} (configured: {', '.join(jobs)})")
    return deep_merge(section(params, "train.defaults"), jobs[job])
