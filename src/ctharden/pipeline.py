"""Pipeline stages: the one implementation that ``dvc.yaml`` (via the CLI) and the Prefect flow call.

Each stage takes the resolved params dict (see :mod:`ctharden.config`), does its work through the
library functions, writes its metrics JSON atomically under ``paths.metrics`` and returns them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ctharden.config import section
from ctharden.errors import ConfigError
from ctharden.io import atomic_write_json

log = logging.getLogger(__name__)


def dataset_names(params: dict[str, Any]) -> list[str]:
    """The dataset names configured under ``datasets:``, in file order."""
    return list(section(params, "datasets"))


def dataset_dir(params: dict[str, Any], name: str) -> Path:
    """Where dataset ``name`` is written: ``paths.datasets/<name>``."""
    _spec(params, name)
    return Path(section(params, "paths.datasets")) / name


def validation_dir(params: dict[str, Any], name: str) -> Path:
    """Where the validation of dataset ``name`` (Data Docs, validation.json) is written."""
    return Path(section(params, "paths.validation")) / name


def _spec(params: dict[str, Any], name: str) -> dict[str, Any]:
    specs = section(params, "datasets")
    if name not in specs:
        raise ConfigError(f"unknown dataset {name!r} (configured: {', '.join(specs)})")
    return dict(specs[name])


def metrics_path(params: dict[str, Any], stage: str, name: str) -> Path:
    """``paths.metrics/<stage>/<name>.json``: a stage's metrics (DVC metrics, committed to git)."""
    return Path(section(params, "paths.metrics")) / stage / f"{name}.json"


def ingest(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Build dataset ``name`` from its source as configured; write ``metrics/ingest/<name>.json``."""
    spec = _spec(params, name)
    kind = spec.pop("kind", None)
    out = dataset_dir(params, name)
    common = {
        "test_fraction": float(section(params, "split.test_fraction")),
        "n_folds": int(section(params, "split.n_folds")),
        "seed": int(section(params, "seed")),
    }
    if kind == "lidc":
        from ctharden.data.lidc import ingest_lidc

        report = ingest_lidc(spec.pop("root"), out, **spec, **common)
    elif kind == "covid":
        from ctharden.data.covid import ingest_covid

        report = ingest_covid(spec.pop("root"), out, **spec, **common)
    elif kind == "synthetic":
        from ctharden.data.synthetic import generate_synthetic

        report = generate_synthetic(spec.pop("task"), out, **spec, **common)
    else:
        raise ConfigError(f"datasets.{name}.kind must be lidc, covid or synthetic, got {kind!r}")
    report = {"dataset": name, "kind": kind, "profile": params.get("profile"), **report}
    atomic_write_json(metrics_path(params, "ingest", name), report)
    return report


def validate(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Validate dataset ``name`` with its GX checkpoint; write ``metrics/validate/<name>.json``.

    Raises :class:`~ctharden.errors.ValidationFailed` (after writing the metrics and Data Docs)
    when any expectation fails, so nothing downstream runs.
    """
    from ctharden.data.validation import ensure_valid, validate_dataset

    report = validate_dataset(dataset_dir(params, name), validation_dir(params, name))
    summary = {
        "dataset": name,
        "success": report.success,
        "n_samples": report.n_samples,
        "content_hash": report.content_hash,
        "n_failed_expectations": len(report.failures),
        "failures": [
            {"expectation": f.expectation, "column": f.column, "samples": f.failing_sample_ids[:20]}
            for f in report.failures
        ],
        "data_docs": _relative(report.data_docs_index) if report.data_docs_index else None,
    }
    atomic_write_json(metrics_path(params, "validate", name), summary)
    ensure_valid(report)
    return summary


def data_version(params: dict[str, Any], repo: str | Path = ".") -> dict[str, Any]:
    """The data version later stages log to MLflow: DVC hash of ``data/`` and each dataset's content hash."""
    from ctharden.data.dataset import read_info

    repo = Path(repo)
    version: dict[str, Any] = {"data_dvc_md5": None, "datasets": {}}
    dvc_file = repo / "data.dvc"
    if dvc_file.is_file():
        import yaml

        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
        version["data_dvc_md5"] = outs[0].get("md5") if outs else None
    for name in dataset_names(params):
        d = repo / dataset_dir(params, name)
        if (d / "dataset.json").is_file():
            version["datasets"][name] = read_info(d)["content_hash"]
    return version


def summarize_validation(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of validation results per dataset (for the Prefect artifact and the CLI)."""
    lines = ["| dataset | samples | result | failed expectations |", "|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | error | {r['error']} |")
            continue
        failed = "; ".join(
            f"{f['expectation']}({f['column']}): {', '.join(map(str, f['samples'][:5]))}" for f in r["failures"]
        )
        lines.append(f"| {name} | {r['n_samples']} | {'passed' if r['success'] else 'FAILED'} | {failed or '-'} |")
    return "\n".join(lines)


def _relative(path: str | Path) -> str:
    """``path`` relative to the working directory when inside it (committed metrics stay portable)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a metrics JSON written by a stage."""
    return json.loads(Path(path).read_text())
