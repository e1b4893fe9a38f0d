"""The ``validate`` stage: one configured dataset through its Great Expectations checkpoint."""

from __future__ import annotations

from typing import Any

from ctharden.config.paths import dataset_dir, metrics_path, validation_dir
from ctharden.core.io import atomic_write_json, relative_to_cwd
from ctharden.data.validation import ensure_valid, validate_dataset
from ctharden.stages.result import ValidateResult

STAGE = "validate"


def run(params: dict[str, Any], name: str) -> ValidateResult:
    """Validate dataset ``name`` with its GX checkpoint; write ``metrics/validate/<name>.json``.

    Raises :class:`~ctharden.core.errors.ValidationFailed` (after writing the metrics and Data
    Docs) when any expectation fails, so nothing downstream runs.
    """
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
        "data_docs": relative_to_cwd(report.data_docs_index) if report.data_docs_index else None,
    }
    path = atomic_write_json(metrics_path(params, STAGE, name), summary)
    ensure_valid(report)
    return ValidateResult(STAGE, name, summary, path)


def summarize(results: dict[str, dict[str, Any]]) -> str:
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
