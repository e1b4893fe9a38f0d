"""The ``ingest`` stage: build one configured dataset from its source (``datasets.<name>``)."""

from __future__ import annotations

import logging
from typing import Any

from ctharden.config import choices
from ctharden.config.params import section
from ctharden.config.paths import dataset_dir, dataset_spec, metrics_path
from ctharden.core.errors import ConfigError
from ctharden.core.io import atomic_write_json
from ctharden.data.covid import ingest_covid
from ctharden.data.lidc import ingest_lidc
from ctharden.data.lidc2d import ingest_lidc2d
from ctharden.data.synthetic import generate_synthetic
from ctharden.stages.result import IngestResult

log = logging.getLogger(__name__)
STAGE = "ingest"
KINDS = choices.DATASET_KINDS


def run(params: dict[str, Any], name: str) -> IngestResult:
    """Build dataset ``name`` from its source as configured; write ``metrics/ingest/<name>.json``."""
    spec = dataset_spec(params, name)
    kind = spec.pop("kind", None)
    out = dataset_dir(params, name)
    common: dict[str, Any] = {
        "test_fraction": float(section(params, "split.test_fraction")),
        "n_folds": int(section(params, "split.n_folds")),
        "seed": int(section(params, "seed")),
    }
    if kind == "lidc":
        report = ingest_lidc(spec.pop("root"), out, **spec, **common)
    elif kind == "lidc2d":
        report = ingest_lidc2d(spec.pop("root"), out, **spec, **common)
    elif kind == "covid":
        report = ingest_covid(spec.pop("root"), out, **spec, **common)
    elif kind == "synthetic":
        report = generate_synthetic(spec.pop("task"), out, **spec, **common)
    else:
        raise ConfigError(f"datasets.{name}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    report = {"dataset": name, "kind": kind, "profile": params.get("profile"), **report}
    path = atomic_write_json(metrics_path(params, STAGE, name), report)
    return IngestResult(STAGE, name, report, path)
