"""What a pipeline run decided, in a few lines: ``ctharden summary`` (the end of ``make run``).

Per job and model (baseline, hardened): the gate's verdict, the primary criterion with its point
value, k/n and the one-sided bound the gate decided on, the clean test AUC with its DeLong interval,
the criteria that failed or stayed inconclusive, what the registry did, and the report. Read from
the stages' records (``metrics/gate.json``, ``metrics/register.json``, ``metrics/robustness*.json``),
so it describes exactly what ``dvc repro`` (or the flow) left behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctharden.config.paths import evaluation_paths, gate_path, registration_record_path
from ctharden.core.errors import DataError
from ctharden.core.io import load_json
from ctharden.evaluation.headline import CLEAN_TEST_AUC
from ctharden.gate.criteria import VERDICT_WORD, verdict_of
from ctharden.reporting.report import bound_text, ci_text, markdown_table

VARIANTS = ("baseline", "hardened")


def _registry(register: Mapping[str, Any], job: str, variant: str) -> str:
    for o in (register.get("jobs") or {}).get(job, []):
        if o.get("variant") != variant:
            continue
        if o["status"] == "rejected":
            return "not registered"
        aliases = ", ".join(o.get("aliases") or []) or "no alias"
        return f"{o['status']}: {o['name']} v{o['version']} ({aliases})"
    return "not registered (register stage not run)"


def _primary(rec: Mapping[str, Any]) -> str:
    p = rec["primary"]
    row = rec["criteria"][p["criterion"]]
    if row["value"] is None:
        return f"{p['criterion']}: {row.get('note') or 'not measured'}"
    kn = f" ({row['k']}/{row['n']})" if row.get("k") is not None else ""
    bound = f", bound {bound_text(row)}" if row.get("lower") is not None else ""
    return f"{p['criterion']} {row['value']:.3f}{kn}{bound} vs {row['op']} {row['threshold']:g}"


def pipeline_summary(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per gated model: ``job``, ``model`` (variant), ``verdict``, ``primary``,
    ``clean_auc``, ``open`` (``FAIL <criterion>`` and ``inconclusive <criterion>``), ``registry``,
    ``report``."""
    path = gate_path(params)
    if not path.is_file():
        raise DataError(f"{path} not found: run the pipeline (`dvc repro`) or `ctharden gate` first")
    gated = load_json(path)
    reg_path = registration_record_path(params)
    register = load_json(reg_path) if reg_path.is_file() else {}
    rows = []
    for variant in VARIANTS:
        records = gated.get(variant) or {}
        if not records:
            continue
        paths = evaluation_paths(params, variant)
        results = load_json(paths["metrics"]) if paths["metrics"].is_file() else {}
        for job, rec in records.items():
            evidence = ((results.get(job) or {}).get("intervals") or {}).get(CLEAN_TEST_AUC)
            auc = "n/a" if not evidence else f"{evidence['point']:.3f}{ci_text(evidence)}"
            open_ = [*(f"FAIL {n}" for n in rec.get("failed", [])),
                     *(f"inconclusive {n}" for n in rec.get("inconclusive", []))]
            rows.append({"job": job, "model": variant, "verdict": verdict_of(rec), "primary": _primary(rec),
                         "clean_auc": auc, "open": open_, "registry": _registry(register, job, variant),
                         "report": str(paths["reports"] / "index.html")})
    return rows


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`pipeline_summary` as one markdown table, then the reports."""
    body = [[r["job"], r["model"], VERDICT_WORD[r["verdict"]].upper(), r["primary"], r["clean_auc"],
             ", ".join(r["open"]) or "none", r["registry"]] for r in rows]
    table = markdown_table(["job", "model", "verdict", "primary criterion (one-sided bound)",
                            "clean test AUC [95 % CI]", "failed / inconclusive", "registry"], body)
    reports = sorted({r["report"] for r in rows}, key=lambda p: (Path(p).parent.name != "robustness", p))
    return table + "\n\nReports: " + ", ".join(reports)
