"""Architecture study: shen 2020's Table 3 protocol on whatever data is configured.

For every architecture variant (BatchNorm, dropout 0.1/0.2, deeper, shallower, wider, narrower,
five-class rating regression), train it exactly like the base job (same dataset, folds, epochs,
optimiser, seed) and run random NPS attacks at one mAs level (100 mAs in the paper) with K
perturbations per sample, on the training and the test split of every fold model. The table gives
SAN/N (%) as mean ± std over the fold models, like the paper's.

    ctharden study architectures                      # base job nodule3d, all variants, 100 mAs
    ctharden --profile smoke study architectures --variants nodule3d,nodule3d_bn

Training goes through :func:`ctharden.stages.train.run_training_job` (the same code as the train
stage) into a separate output tree and MLflow experiment, so the study never touches the
pipeline's own models.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctharden.attacks import random_nps_attack
from ctharden.config.jobs import job_config
from ctharden.config.params import section
from ctharden.config.paths import dataset_dir
from ctharden.config.robustness import job_settings
from ctharden.core.errors import ConfigError
from ctharden.core.io import atomic_write_json, atomic_write_text
from ctharden.core.seeding import derive_seed
from ctharden.data.arrays import load_arrayset
from ctharden.evaluation.robustness import stratified_subset
from ctharden.models import ARCHITECTURES
from ctharden.models.files import load_model
from ctharden.noise.config import noise_model
from ctharden.stages.train import run_training_job

log = logging.getLogger(__name__)

TABLE3_VARIANTS: tuple[tuple[str, str], ...] = (
    ("", "Original"),
    ("_bn", "Batch-Norm (scenario 1)"),
    ("_dropout0.1", "Drop-out 0.1 (scenario 2)"),
    ("_dropout0.2", "Drop-out 0.2 (scenario 2)"),
    ("_deeper", "Deeper (scenario 3)"),
    ("_shallower", "Shallower (scenario 3)"),
    ("_wider", "Wider (scenario 3)"),
    ("_narrower", "Narrower (scenario 3)"),
    ("_fiveclass", "Five-class (scenario 4)"),
)
# shen 2020, Table 3: SAN/N (%) at 100 mAs, mean ± std over 10 folds (train, test)
PAPER_TABLE3: dict[str, tuple[str, str]] = {
    "": ("11.2±4.1", "17.4±4.3"), "_bn": ("10.6±3.7", "15.7±4.4"), "_dropout0.1": ("13.4±4.8", "27.4±5.1"),
    "_dropout0.2": ("10.2±4.0", "20.0±4.5"), "_deeper": ("12.0±5.2", "23.2±5.6"),
    "_shallower": ("9.1±3.7", "17.9±4.2"), "_wider": ("9.6±3.9", "15.8±3.6"),
    "_narrower": ("12.7±4.7", "28.5±4.6"), "_fiveclass": ("26.2±6.9", "86.5±15.3"),
}


def default_variants(base_arch: str) -> list[str]:
    """The Table 3 variants of ``base_arch`` (e.g. ``nodule3d`` -> ``nodule3d_bn``, ...)."""
    return [base_arch + suffix for suffix, _ in TABLE3_VARIANTS]


def _label(base: str, arch: str) -> str:
    suffix = arch[len(base):] if arch.startswith(base) else arch
    return dict(TABLE3_VARIANTS).get(suffix, arch)


def study_params(params: dict[str, Any], job: str, variants: list[str], out: Path) -> dict[str, Any]:
    """``params`` with one training job per variant (``<job>@<arch>``) writing under ``out``."""

    base = job_config(params, job)
    p = copy.deepcopy(params)
    p["train"]["jobs"] = {f"{job}@{arch}": {**copy.deepcopy(params["train"]["jobs"][job]), "arch": arch}
                          for arch in variants}
    p["paths"] = {**p["paths"], "artifacts": str(out / "artifacts"), "reports": str(out / "reports"),
                  "plots": str(out / "plots"), "metrics": str(out / "metrics")}
    experiment = p.get("mlflow", {}).get("experiment", "ctharden")
    p["mlflow"] = {**p.get("mlflow", {}), "experiment": f"{experiment}-architectures"}
    if base.get("dataset") is None:
        raise ConfigError(f"train.jobs.{job} has no dataset")
    return p


def run_architecture_study(
    params: dict[str, Any],
    *,
    job: str = "nodule3d",
    variants: list[str] | None = None,
    mas: float = 100.0,
    k: int | None = None,
    out: str | Path = "reports/architecture_study",
) -> dict[str, Any]:
    """Train every variant like ``job`` and attack it with random NPS noise at ``mas``; write
    ``out/table.md`` and ``out/study.json``; returns the study."""

    t0 = time.perf_counter()
    base_arch = job_config(params, job)["arch"]
    names = variants or [v for v in default_variants(base_arch) if v in ARCHITECTURES]
    unknown = [v for v in names if v not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architectures {unknown} (known: {', '.join(ARCHITECTURES)})")
    out = Path(out)
    settings = job_settings(params, job)
    k = int(k or settings.random.k)
    sp = study_params(params, job, names, out)
    nps = noise_model(params)
    seed = int(section(params, "seed"))
    rows: list[dict[str, Any]] = []
    for vi, arch in enumerate(names):
        name = f"{job}@{arch}"
        summary = run_training_job(sp, name, progress=False)
        ds_dir = dataset_dir(sp, summary["dataset"])
        per_split: dict[str, list[float]] = {"train": [], "test": []}
        data = None
        for f in summary["folds"]:
            model, _ = load_model(Path(sp["paths"]["artifacts"]) / "models" / name / f"fold{f['fold']}" / "model.pt")
            if data is None:  # the folds share the architecture, hence the input units: load once
                data = load_arrayset(ds_dir, model)
            s = settings.for_width(int(data.raw.shape[-1]))
            for si, split in enumerate(("train", "test")):
                idx = data.indices(split)
                idx = idx[stratified_subset(data.y.numpy()[idx], s.max_samples, derive_seed(seed, 60, si))]
                g = torch.Generator().manual_seed(derive_seed(seed, 61, vi, int(f["fold"]), si))
                res = random_nps_attack(
                    model, data.raw[idx], [mas], k, s.spacing_mm, nps=nps, generator=g,
                    hu_per_unit=s.hu_per_unit if getattr(model, "window_hu", None) is None else None,
                    batch_size=s.random.batch_size,
                )
                per_split[split].append(res[mas].san_rate)
        auc = summary["test_mean_std"]["auc"]
        rows.append({
            "arch": arch, "label": _label(base_arch, arch),
            "train_san_rate": per_split["train"], "test_san_rate": per_split["test"],
            "train_mean": float(np.mean(per_split["train"])), "train_std": _std(per_split["train"]),
            "test_mean": float(np.mean(per_split["test"])), "test_std": _std(per_split["test"]),
            "test_auc_mean": auc["mean"], "n_folds": len(summary["folds"]),
            "paper": PAPER_TABLE3.get(arch[len(base_arch):]) if arch.startswith(base_arch) else None,
        })
        log.info("%s: SAN/N train %.1f%%, test %.1f%%", arch, rows[-1]["train_mean"], rows[-1]["test_mean"])
    study = {"job": job, "mas": mas, "k": k, "dataset": job_config(params, job)["dataset"], "rows": rows,
             "profile": params.get("profile"), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "study.json", study)
    atomic_write_text(out / "table.md", format_study(study) + "\n")
    return study


def _std(v: list[float]) -> float:
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def format_study(study: dict[str, Any]) -> str:
    """Markdown table in the layout of shen 2020's Table 3, with the paper's numbers alongside."""
    lines = [
        f"Random NPS attacks at {study['mas']:g} mAs, K = {study['k']}, dataset {study['dataset']} "
        f"(profile {study['profile']}); SAN/N (%) mean ± std over fold models.",
        "",
        "| architecture | train SAN/N (%) | test SAN/N (%) | test AUC | paper train | paper test |",
        "|---|---|---|---|---|---|",
    ]
    for r in study["rows"]:
        paper = r.get("paper") or ("", "")
        auc = f"{r['test_auc_mean']:.3f}" if r.get("test_auc_mean") is not None else "n/a"
        lines.append(f"| {r['label']} | {r['train_mean']:.1f} ± {r['train_std']:.1f} | "
                     f"{r['test_mean']:.1f} ± {r['test_std']:.1f} | {auc} | {paper[0]} | {paper[1]} |")
    return "\n".join(lines)
