"""Dataset validation with Great Expectations (GX Core 1.x): nothing trains on data that failed it.

Two steps:

1. :func:`summarize_dataset` turns a dataset (``manifest.csv`` + ``arrays/*.npy`` + ``dataset.json``)
   into one table, one row per manifest row: the manifest's ids and labels plus per-array facts —
   does the file exist, does it load, does its SHA-256 match the manifest, its shape, dtype,
   finite min/max/mean/1st percentile, NaN/Inf counts — per-patient facts (in how many splits a
   patient appears) and, for ``nodule2d``, the reader-rating and spacing facts its suite checks.
   Rows whose array is missing or unreadable stay in the table with NaN statistics, so the
   expectations below name them.
2. :func:`validate_dataset` runs the task's expectation suite (:func:`build_expectations`) over
   that table through a GX ``Checkpoint`` whose ``UpdateDataDocsAction`` writes Data Docs under
   ``<report_dir>/data_docs``, and writes ``<report_dir>/summary.csv`` and
   ``<report_dir>/validation.json`` (written last, atomically: it is the seal downstream stages
   check with :func:`require_validated`).

Every column check is a GX expectation (so it shows in Data Docs with the failing sample ids).
One dataset-level check is done here in Python: ``manifest.csv``'s SHA-256 must equal the
``content_hash`` recorded in ``dataset.json`` (the manifest was not edited after the dataset was
written); it is reported as the pseudo-expectation ``manifest_matches_content_hash``.

GX is imported lazily (it takes seconds) inside the functions that need it; its progress bars are
switched off and analytics disabled (``GX_ANALYTICS_ENABLED=false``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

import numpy as np
import pandas as pd

from ctharden import __version__
from ctharden.core.errors import DataError, ValidationFailed
from ctharden.core.io import atomic_directory, atomic_write_json, atomic_write_text, sha256_file
from ctharden.data.dataset import (
    ARRAYS,
    MANIFEST,
    SOURCES,
    load_array,
    read_info,
    read_manifest,
    task_spec,
)

VALIDATION_JSON = "validation.json"
SUMMARY_CSV = "summary.csv"
DATA_DOCS = "data_docs"
SPLITS: tuple[str, ...] = ("train", "test")
ALLOWED_DTYPES: tuple[str, ...] = ("float32",)
SPACING_MM = "spacing_mm"
#: nodule3d cubes are resampled to 1 mm isotropic; ``spacing_mm`` must equal 1.0 within this
#: (nodule2d: the dataset's resampling spacing, ``dataset.json`` provenance ``spacing_mm``).
SPACING_TOL = 1e-6
#: nodule2d lung-plausibility check: a patch's 1st-percentile HU (summary column ``p1``) must lie
#: here. Every real nodule crop contains lung parenchyma: over all 1616 labelled LIDC crops
#: (lidc_maxslice, 0.7 mm, 45 x 45) p1 is -1024 .. -650 HU, while a patch stored without the
#: -1024 HU rescale intercept has p1 >= 0. (The 10th percentile does not work: 3 real crops, a
#: 37 mm nodule filling the 31.5 mm patch and two 5 mm ones in dense tissue (< 8 % of pixels
#: below -500 HU), have p10 of -64, -257 and -420 HU; the 2nd percentile reaches -601 HU.)
LUNG_P1_RANGE_HU: tuple[float, float] = (-1100.0, -500.0)
#: In-plane pixel spacing of the source CT slices (LIDC: 0.46-0.98 mm).
SOURCE_SPACING_RANGE_MM: tuple[float, float] = (0.3, 1.5)
#: How the nodule2d ingesters got HU: DICOM header slope/intercept (crop release or DICOM series),
#: or the intercept recovered from the image (:func:`ctharden.data.lidc2d.intercept_from_image`).
HU_SOURCES: tuple[str, ...] = ("header", "image_rule", "dicom_rescale")
#: A team's own manifest (:mod:`ctharden.data.table`): any spacing, no reader ratings (``TABLE_SOURCE``
#: mirrors ``ctharden.data.table.SOURCE``; importing that module here would pull in nibabel).
TABLE_SOURCE = "table"
#: ``malignancy_mean`` is stored rounded (4 decimals); it must equal mean(ratings) within this.
MALIGNANCY_MEAN_TOL = 1e-3
#: One to any number of reader ratings, each 1..5, separated by ``;`` (e.g. ``4;5;3``).
_RATINGS_REGEX = r"^[1-5](?:;[1-5])*$"
#: How many failing sample ids the one-line error message shows per expectation.
MAX_IDS_IN_MESSAGE = 10
#: How many failing sample ids validation.json keeps per expectation (the count is always exact).
MAX_IDS_IN_JSON = 1000
#: Pseudo-expectation for the one dataset-level check done outside GX.
MANIFEST_HASH_CHECK = "manifest_matches_content_hash"

_SAMPLE_ID_REGEX = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
_ARRAY_PATH_REGEX = rf"^{ARRAYS}/[A-Za-z0-9][A-Za-z0-9._-]*\.npy$"
_SHA256_REGEX = r"^[0-9a-f]{64}$"
# Columns GX reports for every failing row; manifest_row names a row whose sample_id is null.
_INDEX_COLUMNS = ["sample_id", "manifest_row"]
_GX_LOCK = threading.Lock()  # GX keeps a process-wide "current context": one validation at a time

SUMMARY_COLUMNS: tuple[str, ...] = (
    "manifest_row",
    "sample_id",
    "label",
    "label_name",
    "patient_id",
    "source",
    "split",
    "fold",
    "array",
    "array_exists",
    "load_error",
    "sha256_ok",
    "shape",
    "dtype",
    "min",
    "max",
    "mean",
    "nan_count",
    "inf_count",
    "p1",
    SPACING_MM,
    "n_splits_of_patient",
    "n_partitions_of_patient",
    # nodule2d (null/NaN where the manifest lacks the column):
    "source_spacing_mm",
    "hu_source",
    "reader_rating",
    "ratings",
    "ratings_mean",
    "malignancy_mean",
    "malignancy_mean_error",
    "malignancy_vs_3",
)


@dataclass(frozen=True)
class ExpectationFailure:
    """One failed expectation: GX type name, column (None for table-level), offending sample ids."""

    expectation: str
    column: str | None
    failing_sample_ids: list[str]
    detail: str

    def describe(self) -> str:
        """``expect_x(column): detail; samples: a, b, … (+N more)`` on one line."""
        where = f"({self.column})" if self.column else ""
        text = f"{self.expectation}{where}: {self.detail}"
        if self.failing_sample_ids:
            ids = self.failing_sample_ids[:MAX_IDS_IN_MESSAGE]
            more = len(self.failing_sample_ids) - len(ids)
            text += f"; samples: {', '.join(ids)}" + (f" (+{more} more)" if more > 0 else "")
        return text


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset` (also written to ``validation.json``)."""

    success: bool
    failures: list[ExpectationFailure]
    content_hash: str
    data_docs_index: Path | None
    n_samples: int
    dataset_dir: Path | None = None
    report_path: Path | None = None
    task: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------- summary


def _nan_stats() -> dict[str, Any]:
    return {
        "shape": None,
        "dtype": None,
        "min": math.nan,
        "max": math.nan,
        "mean": math.nan,
        "p1": math.nan,
        "nan_count": math.nan,
        "inf_count": math.nan,
    }


def _array_facts(dataset_dir: Path, rel: Any, expected_sha: Any) -> dict[str, Any]:
    """File existence, load error, hash match and finite statistics of one sample array."""
    facts: dict[str, Any] = {"array_exists": False, "load_error": None, "sha256_ok": False}
    facts.update(_nan_stats())
    if not isinstance(rel, str) or not rel:
        return facts  # a null array path: expect_column_values_to_not_be_null(array) names the row
    rel_path = PurePosixPath(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        facts["load_error"] = f"array path {rel!r} points outside the dataset directory"
        return facts
    path = dataset_dir / rel
    if not path.is_file():
        return facts
    facts["array_exists"] = True
    try:
        facts["sha256_ok"] = isinstance(expected_sha, str) and sha256_file(path) == expected_sha.lower()
    except OSError as exc:
        facts["load_error"] = f"{path}: cannot read ({exc})"
        return facts
    try:
        arr = load_array(dataset_dir, rel, mmap=True)
    except DataError as exc:
        facts["load_error"] = str(exc)
        return facts
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a data problem, not a crash
        facts["load_error"] = f"{path}: unreadable array ({type(exc).__name__}: {exc})"
        return facts
    try:
        facts["shape"] = "x".join(str(n) for n in arr.shape)
        facts["dtype"] = str(arr.dtype)
        values = np.asarray(arr)
        if not np.issubdtype(values.dtype, np.number):
            raise TypeError(f"non-numeric dtype {values.dtype}")
        finite = np.isfinite(values)
        facts["nan_count"] = int(np.count_nonzero(np.isnan(values)))
        facts["inf_count"] = int(np.count_nonzero(np.isinf(values)))
        kept = values[finite]
        if kept.size:
            facts["min"] = float(kept.min())
            facts["max"] = float(kept.max())
            facts["mean"] = float(kept.mean(dtype=np.float64))
            facts["p1"] = float(np.percentile(kept, 1))
    except Exception as exc:  # noqa: BLE001 - e.g. a truncated memory map or a non-numeric array
        facts.update(_nan_stats())
        facts["load_error"] = f"{path}: cannot compute statistics ({type(exc).__name__}: {exc})"
    finally:
        del arr
    return facts


def _numeric_column(manifest: pd.DataFrame, col: str) -> np.ndarray:
    """A manifest column as float64 (non-numeric → NaN); all NaN if the manifest lacks it."""
    if col not in manifest.columns:
        return np.full(len(manifest), np.nan)
    return cast(np.ndarray, pd.to_numeric(manifest[col], errors="coerce").to_numpy(np.float64))


def _text_column(manifest: pd.DataFrame, col: str) -> pd.Series:
    """A manifest column as Python str/None values (None where missing or the column is absent)."""
    if col not in manifest.columns:
        return pd.Series([None] * len(manifest), dtype=object)
    return pd.Series([v if isinstance(v, str) else None for v in manifest[col].tolist()], dtype=object)


def _ratings_mean(text: str | None) -> float:
    """Mean of ``"4;5;3"``-style integer ratings; NaN if missing or malformed (the regex check names it)."""
    if not text:
        return math.nan
    try:
        values = [int(t) for t in text.split(";")]
    except ValueError:
        return math.nan
    return float(np.mean(values))


def _vs_3(mean: float) -> str | None:
    """``"above"``/``"below"``/``"equal"``: the mean rating against the indeterminate 3."""
    if not math.isfinite(mean):
        return None
    if math.isclose(mean, 3.0):
        return "equal"
    return "above" if mean > 3.0 else "below"


def _summary_from_manifest(dataset_dir: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    n = len(manifest)
    facts = [
        _array_facts(dataset_dir, rel, sha)
        for rel, sha in zip(manifest["array"].tolist(), manifest["sha256"].tolist(), strict=True)
    ]
    summary = pd.DataFrame(
        {
            # 1-based line number in manifest.csv (line 1 is the header): names rows without an id.
            "manifest_row": np.arange(2, n + 2, dtype=np.int64),
            "sample_id": manifest["sample_id"].to_numpy(),
            "label": manifest["label"].to_numpy(),
            "label_name": manifest["label_name"].to_numpy(),
            "patient_id": manifest["patient_id"].to_numpy(),
            "source": manifest["source"].to_numpy(),
            "split": manifest["split"].to_numpy(),
            "fold": manifest["fold"].to_numpy(),
            "array": manifest["array"].to_numpy(),
        }
    )
    for col in ("array_exists", "sha256_ok"):
        summary[col] = np.array([f[col] for f in facts], dtype=bool)
    summary["load_error"] = pd.Series([f["load_error"] for f in facts], dtype=object)
    summary["shape"] = pd.Series([f["shape"] for f in facts], dtype=object)
    summary["dtype"] = pd.Series([f["dtype"] for f in facts], dtype=object)
    for col in ("min", "max", "mean", "p1", "nan_count", "inf_count"):
        summary[col] = np.array([f[col] for f in facts], dtype=np.float64)
    summary[SPACING_MM] = _numeric_column(manifest, SPACING_MM)
    # nodule2d reader ratings and acquisition facts.
    summary["source_spacing_mm"] = _numeric_column(manifest, "source_spacing_mm")
    summary["hu_source"] = _text_column(manifest, "hu_source")
    summary["reader_rating"] = _numeric_column(manifest, "reader_rating")
    summary["ratings"] = _text_column(manifest, "ratings")
    summary["ratings_mean"] = np.array([_ratings_mean(t) for t in summary["ratings"]], dtype=np.float64)
    mean = _numeric_column(manifest, "malignancy_mean")
    summary["malignancy_mean"] = mean
    summary["malignancy_mean_error"] = np.abs(mean - summary["ratings_mean"].to_numpy())
    summary["malignancy_vs_3"] = pd.Series([_vs_3(float(m)) for m in mean], dtype=object)
    # Patient leakage: in how many of {train, test} (and of {test, train fold k}) a patient appears.
    split = summary["split"].where(summary["split"].isin(SPLITS))
    partition = pd.Series(
        [f"{s}:{f}" if isinstance(s, str) else None for s, f in zip(split, summary["fold"], strict=True)],
        index=summary.index,
        dtype=object,
    )
    by_patient = summary["patient_id"].fillna("\x00<null>")
    summary["n_splits_of_patient"] = (
        split.groupby(by_patient).transform("nunique").fillna(0).astype(np.int64).to_numpy()
    )
    summary["n_partitions_of_patient"] = (
        partition.groupby(by_patient).transform("nunique").fillna(0).astype(np.int64).to_numpy()
    )
    return summary[list(SUMMARY_COLUMNS)]


def summarize_dataset(dataset_dir: Path) -> pd.DataFrame:
    """One row per manifest row: ids, labels, split, and facts about the sample's array file.

    Columns: ``manifest_row`` (line in manifest.csv), ``sample_id``, ``label``, ``label_name``,
    ``patient_id``, ``source``, ``split``, ``fold``, ``array`` (relative path), ``array_exists``
    (bool), ``load_error`` (str or None: unreadable/truncated .npy), ``sha256_ok`` (file hash ==
    manifest sha256), ``shape`` (e.g. ``"32x32x32"``), ``dtype``, ``min``/``max``/``mean``/``p1``
    (1st percentile; over finite voxels), ``nan_count``, ``inf_count``, ``spacing_mm`` (NaN if the
    manifest has no such column), ``n_splits_of_patient`` (distinct split values in {train, test}
    for that patient) and ``n_partitions_of_patient`` (distinct {test, train fold k} for that
    patient); then the nodule2d manifest facts (NaN/None where the manifest lacks the column):
    ``source_spacing_mm``, ``hu_source``, ``reader_rating``, ``ratings`` (``"4;5;3"``),
    ``ratings_mean`` (their mean; NaN if malformed), ``malignancy_mean``, ``malignancy_mean_error``
    (``|malignancy_mean - ratings_mean|``) and ``malignancy_vs_3`` (``above``/``below``/``equal``).
    Arrays are memory-mapped; missing/unreadable arrays give NaN statistics.

    Raises :class:`DataError` if the manifest is missing, malformed or lacks required columns.
    """
    dataset_dir = Path(dataset_dir)
    return _summary_from_manifest(dataset_dir, read_manifest(dataset_dir))


# --------------------------------------------------------------------------------------- suite


def _import_gx() -> Any:
    """Import GX quietly (no analytics) and return the module."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are noise here
    return gx


def build_expectations(info: Mapping[str, Any], summary_columns: Sequence[str] = SUMMARY_COLUMNS) -> list[Any]:
    """The task's expectations (GX ``Expectation`` objects) over the :func:`summarize_dataset` table.

    ``info`` is the dataset's ``dataset.json``; its ``task`` selects label set and value range
    (:data:`ctharden.data.dataset.TASKS`), its ``shape`` the expected array shape (of the task's
    rank). ``spacing_mm == 1.0`` is expected for nodule3d only when the manifest has a
    ``spacing_mm`` column (pass the manifest's columns in ``summary_columns`` to decide; the
    summary always has the column).

    nodule2d adds (whatever the manifest's columns; a missing one fails its not-null check):
    ``spacing_mm`` equal to the resampling spacing in ``dataset.json`` provenance, source pixel
    spacing in :data:`SOURCE_SPACING_RANGE_MM`, the lung-plausibility check
    (:data:`LUNG_P1_RANGE_HU` on ``p1``), ``ratings`` 1..5 and ``reader_rating`` 1..5,
    ``malignancy_mean`` equal to mean(ratings), never 3, and label 1 iff it is above 3 (0 iff
    below), and ``hu_source`` in :data:`HU_SOURCES`. Duplicate ids and patient leakage across
    splits/folds are checked for every task.

    A ``table`` dataset (``dataset.json`` sources == ``["table"]``, a team's own manifest) has its
    own rules instead of nodule3d's 1 mm rule and nodule2d's LIDC rules: ``spacing_mm`` equal to
    provenance ``spacing_mm`` when it was resampled (any spacing, not only 1 mm), and for nodule2d
    the lung check on ``p1`` only (it has no reader ratings, source spacing or LIDC ``hu_source``).
    """
    _import_gx()
    import great_expectations.expectations as gx_expectations

    # GX's package __init__ imports its Expectation classes without re-exporting them (no __all__),
    # so its public API ``gx.expectations.Expect...`` is invisible to mypy: use it untyped.
    gxe = cast(Any, gx_expectations)

    spec = task_spec(str(info.get("task")))
    shape = info.get("shape")
    if not isinstance(shape, list) or not shape:
        raise DataError(f"dataset.json has no array shape (got {shape!r})")
    if len(shape) != spec.ndim:
        raise DataError(f"dataset.json shape {shape} is not {spec.ndim}-D as task {spec.name} requires")
    shape_str = "x".join(str(int(n)) for n in shape)
    lo, hi = (float(v) for v in spec.value_range)
    labels = sorted(int(k) for k in spec.label_names)
    n_folds = (info.get("split") or {}).get("n_folds")

    ex: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, notes="an empty dataset cannot be trained on"),
    ]
    if isinstance(info.get("n_samples"), int):
        ex.append(
            gxe.ExpectTableRowCountToEqual(
                value=int(info["n_samples"]), notes="manifest rows must match dataset.json n_samples"
            )
        )
    for col in ("sample_id", "patient_id", "label", "source", "split", "fold", "array"):
        ex.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    ex += [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id", notes="duplicate sample ids"),
        gxe.ExpectColumnValuesToMatchRegex(column="sample_id", regex=_SAMPLE_ID_REGEX),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        gxe.ExpectColumnPairValuesToBeInSet(
            column_A="label",
            column_B="label_name",
            value_pairs_set=[(int(k), v) for k, v in sorted(spec.label_names.items())],
            notes="label_name must be the task's name for label",
        ),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(SOURCES)),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToMatchRegex(column="array", regex=_ARRAY_PATH_REGEX),
        gxe.ExpectColumnValuesToBeInSet(
            column="array_exists", value_set=[True], notes="a manifest row without its array file"
        ),
        gxe.ExpectColumnValuesToBeNull(column="load_error", notes="a truncated or corrupt .npy file"),
        gxe.ExpectColumnValuesToBeInSet(
            column="sha256_ok", value_set=[True], notes="array file edited after ingest (hash mismatch)"
        ),
        gxe.ExpectColumnValuesToBeInSet(column="shape", value_set=[shape_str]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=list(ALLOWED_DTYPES)),
        gxe.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0, notes="NaN voxels"),
        gxe.ExpectColumnValuesToBeBetween(column="inf_count", min_value=0, max_value=0, notes="Inf voxels"),
        gxe.ExpectColumnValuesToBeBetween(
            column="min", min_value=lo, notes=f"values below the {spec.units} range [{lo:g}, {hi:g}]"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="max", max_value=hi, notes=f"values above the {spec.units} range [{lo:g}, {hi:g}]"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_splits_of_patient", max_value=1, notes="a patient in both train and test"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_partitions_of_patient", max_value=1, notes="a patient in more than one fold/test"
        ),
    ]
    if isinstance(n_folds, int) and n_folds >= 1:
        pairs = [("test", -1)] + [("train", k) for k in range(n_folds)]
        ex.append(
            gxe.ExpectColumnPairValuesToBeInSet(
                column_A="split", column_B="fold", value_pairs_set=pairs, notes="fold -1 iff split is test"
            )
        )
    else:
        ex.append(gxe.ExpectColumnValuesToBeBetween(column="fold", min_value=-1))
    if set(info.get("sources") or ()) == {TABLE_SOURCE}:
        return ex + _table_expectations(gxe, info)
    if spec.name == "nodule3d" and SPACING_MM in summary_columns:
        ex += [
            gxe.ExpectColumnValuesToNotBeNull(column=SPACING_MM),
            gxe.ExpectColumnValuesToBeBetween(
                column=SPACING_MM,
                min_value=1.0 - SPACING_TOL,
                max_value=1.0 + SPACING_TOL,
                notes="nodule cubes are 1 mm isotropic",
            ),
        ]
    if spec.name == "nodule2d":
        ex += _nodule2d_expectations(gxe, info)
    return ex


def _lung_check(gxe: Any) -> Any:
    """nodule2d lung plausibility: a patch's 1st-percentile HU (``p1``) in :data:`LUNG_P1_RANGE_HU`."""
    lung_lo, lung_hi = LUNG_P1_RANGE_HU
    return gxe.ExpectColumnValuesToBeBetween(
        column="p1",
        min_value=lung_lo,
        max_value=lung_hi,
        notes="lung check: a nodule patch's 1st-percentile HU is lung parenchyma or air; "
        "above means the patch is not in HU (e.g. stored without the -1024 intercept)",
    )


def _table_expectations(gxe: Any, info: Mapping[str, Any]) -> list[Any]:
    """The ``table`` source's rules, in place of the LIDC-specific ones (see :func:`build_expectations`)."""
    ex: list[Any] = []
    spacing = (info.get("provenance") or {}).get(SPACING_MM)
    if spacing is not None:
        if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing < math.inf:
            raise DataError(f"dataset.json provenance {SPACING_MM} is not a positive number (got {spacing!r})")
        ex += [
            gxe.ExpectColumnValuesToNotBeNull(column=SPACING_MM),
            gxe.ExpectColumnValuesToBeBetween(
                column=SPACING_MM,
                min_value=float(spacing) - SPACING_TOL,
                max_value=float(spacing) + SPACING_TOL,
                notes=f"arrays are resampled to {float(spacing):g} mm (dataset.json provenance spacing_mm)",
            ),
        ]
    if info.get("task") == "nodule2d":
        ex.append(_lung_check(gxe))
    return ex


def _nodule2d_expectations(gxe: Any, info: Mapping[str, Any]) -> list[Any]:
    """The nodule2d-only part of the suite (see :func:`build_expectations`)."""
    spacing = (info.get("provenance") or {}).get(SPACING_MM)
    if isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not 0 < spacing < math.inf:
        raise DataError(
            f"dataset.json provenance has no valid {SPACING_MM} (got {spacing!r}): a nodule2d dataset "
            "must record the pixel spacing its patches were resampled to"
        )
    spacing = float(spacing)
    src_lo, src_hi = SOURCE_SPACING_RANGE_MM
    ex: list[Any] = [_lung_check(gxe)]
    for col in (SPACING_MM, "source_spacing_mm", "hu_source", "reader_rating", "ratings", "malignancy_mean"):
        ex.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    ex += [
        gxe.ExpectColumnValuesToBeBetween(
            column=SPACING_MM,
            min_value=spacing - SPACING_TOL,
            max_value=spacing + SPACING_TOL,
            notes=f"patches are resampled to {spacing:g} mm (dataset.json provenance spacing_mm)",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="source_spacing_mm",
            min_value=src_lo,
            max_value=src_hi,
            notes="source CT pixel spacing must be a CT pixel size",
        ),
        gxe.ExpectColumnValuesToBeInSet(column="hu_source", value_set=list(HU_SOURCES)),
        gxe.ExpectColumnValuesToBeInSet(
            column="reader_rating", value_set=[1, 2, 3, 4, 5], notes="a malignancy rating is 1..5"
        ),
        gxe.ExpectColumnValuesToMatchRegex(
            column="ratings", regex=_RATINGS_REGEX, notes="every reader's malignancy rating, each 1..5"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="malignancy_mean_error",
            max_value=MALIGNANCY_MEAN_TOL,
            notes="malignancy_mean must be the mean of ratings",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="malignancy_vs_3",
            value_set=["above", "below"],
            notes="a mean rating of exactly 3 is indeterminate: such nodules are dropped",
        ),
        gxe.ExpectColumnPairValuesToBeInSet(
            column_A="label",
            column_B="malignancy_vs_3",
            value_pairs_set=[(1, "above"), (0, "below")],
            notes="label 1 iff malignancy_mean > 3, label 0 iff < 3",
        ),
    ]
    return ex


# --------------------------------------------------------------------------------------- running


def _plain(value: Any) -> Any:
    """numpy scalars/NaN → JSON-friendly Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _row_name(entry: Mapping[str, Any]) -> str:
    sid = entry.get("sample_id")
    if isinstance(sid, str) and sid:
        return sid
    return f"<manifest row {_plain(entry.get('manifest_row'))}: no sample_id>"


def _gx_error(exception_info: Any) -> str | None:
    """The exception message of an expectation GX could not evaluate (e.g. a missing column)."""
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    msgs = [str(i.get("exception_message")) for i in infos if isinstance(i, Mapping) and i.get("raised_exception")]
    return "; ".join(msgs) or None


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    skip = {"column", "batch_id", "result_format", "catch_exceptions", "include_config", "mostly"}
    parts = [f"{k}={_plain(v)!r}" for k, v in kwargs.items() if k not in skip and v is not None]
    return ", ".join(parts)


def _digest_result(er: Any) -> dict[str, Any]:
    """One GX ExpectationValidationResult → a JSON-friendly dict with the failing sample ids."""
    cfg = er.expectation_config
    kwargs = dict(cfg.kwargs)
    column = kwargs.get("column")
    if column is None and "column_A" in kwargs:
        column = f"{kwargs['column_A']},{kwargs['column_B']}"
    result = dict(er.result or {})
    error = _gx_error(er.exception_info)
    index_list = result.get("unexpected_index_list") or []
    ids: list[str] = []
    seen: set[str] = set()
    for entry in index_list:
        name = _row_name(entry) if isinstance(entry, Mapping) else f"<row {_plain(entry)}>"
        if name not in seen:
            seen.add(name)
            ids.append(name)
    count = result.get("unexpected_count")
    if error:
        detail = f"GX could not evaluate it: {error}"
    elif "observed_value" in result and count is None:
        detail = f"observed {_plain(result['observed_value'])!r}"
    elif count is not None:
        values = [_plain(v) for v in (result.get("partial_unexpected_list") or [])[:5]]
        detail = f"{count} of {result.get('element_count')} rows unexpected"
        if values:
            detail += f" (e.g. {values})"
    else:
        detail = "failed"
    args = _kwargs_text(kwargs)
    if args:
        detail += f" [expected {args}]"
    return {
        "expectation": str(cfg.type),
        "column": column,
        "kwargs": _plain({k: v for k, v in kwargs.items() if k not in ("batch_id",)}),
        "success": bool(er.success) and not error,
        "unexpected_count": _plain(count),
        "failing_sample_ids": ids,
        "detail": detail,
    }


def _run_checkpoint(
    summary: pd.DataFrame, info: Mapping[str, Any], expectations: list[Any], docs_dir: Path, run_name: str
) -> list[dict[str, Any]]:
    """Validate ``summary`` with a GX Checkpoint whose UpdateDataDocsAction writes to ``docs_dir``."""
    gx = _import_gx()
    from great_expectations.checkpoint.actions import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    task = str(info["task"])
    with _GX_LOCK:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False, "metric_calculations": False}
        for site in list(context.list_data_docs_sites()):  # the default site lives in a temp dir
            context.delete_data_docs_site(site)
        context.add_data_docs_site(
            "ctharden",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            },
        )
        asset = context.data_sources.add_pandas("ctharden").add_dataframe_asset("dataset_summary")
        batch = asset.add_batch_definition_whole_dataframe("whole_summary")
        suite = context.suites.add(gx.ExpectationSuite(name=f"ctharden_{task}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        vdef = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{task}", data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"ctharden_{task}_checkpoint",
                validation_definitions=[vdef],
                actions=[UpdateDataDocsAction(name="update_data_docs", site_names=["ctharden"])],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": _INDEX_COLUMNS},
            )
        )
        run_id = RunIdentifier(run_name=run_name, run_time=_dt.datetime.now(_dt.UTC))
        result = checkpoint.run(batch_parameters={"dataframe": summary}, run_id=run_id)
    digests: list[dict[str, Any]] = []
    for run_result in result.run_results.values():
        digests += [_digest_result(er) for er in run_result.results]
    return digests


def _write_failed_report(report_dir: Path, dataset_dir: Path, reason: str) -> None:
    """Seal a structural failure so no stale successful validation.json stays behind."""
    atomic_write_json(
        report_dir / VALIDATION_JSON,
        {
            "success": False,
            "dataset_dir": str(dataset_dir),
            "error": reason,
            "content_hash": None,
            "validated_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "ctharden_version": __version__,
        },
    )


def validate_dataset(dataset_dir: Path, report_dir: Path) -> ValidationReport:
    """Validate a dataset with the task's GX suite; write Data Docs, summary.csv and validation.json.

    Writes ``<report_dir>/data_docs/index.html`` (via the checkpoint's UpdateDataDocsAction; the
    site is built aside and swapped in), ``<report_dir>/summary.csv`` and, last,
    ``<report_dir>/validation.json`` (success, dataset content_hash, per-expectation results,
    failing sample ids, Data Docs index path). Returns the :class:`ValidationReport`; it does not
    raise on failed expectations (call :func:`ensure_valid`).

    Raises :class:`DataError` (after writing a failed validation.json) when the dataset cannot be
    validated at all: missing or corrupt ``dataset.json``/``manifest.csv``, missing required
    columns, unknown task.
    """
    dataset_dir = Path(dataset_dir)
    report_dir = Path(report_dir).resolve()  # GX data docs need an absolute path
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        info = read_info(dataset_dir)
        manifest = read_manifest(dataset_dir)
        task_spec(str(info.get("task")))
        expectations = build_expectations(info, list(manifest.columns))
    except DataError as exc:
        _write_failed_report(report_dir, dataset_dir, str(exc))
        raise
    content_hash = str(info.get("content_hash") or "")
    manifest_sha = sha256_file(dataset_dir / MANIFEST)
    summary = _summary_from_manifest(dataset_dir, manifest)

    with atomic_directory(report_dir / DATA_DOCS) as docs_tmp:
        results = _run_checkpoint(summary, info, expectations, docs_tmp, run_name=dataset_dir.name)
    index = report_dir / DATA_DOCS / "index.html"
    data_docs_index = index if index.is_file() else None

    hash_ok = bool(content_hash) and manifest_sha == content_hash
    results.append(
        {
            "expectation": MANIFEST_HASH_CHECK,
            "column": None,
            "kwargs": {"content_hash": content_hash},
            "success": hash_ok,
            "unexpected_count": None,
            "failing_sample_ids": [],
            "detail": (
                f"sha256({MANIFEST}) equals dataset.json content_hash {content_hash[:12]}…"
                if hash_ok
                else f"sha256({MANIFEST}) = {manifest_sha[:12]}… but dataset.json content_hash = "
                f"{content_hash[:12] or '<missing>'}… (manifest edited after the dataset was written)"
            ),
        }
    )
    order = {e: i for i, e in enumerate(SUMMARY_COLUMNS)}
    results.sort(key=lambda r: (order.get(str(r["column"]).split(",")[0], -1), r["expectation"]))
    failures = [
        ExpectationFailure(r["expectation"], r["column"], list(r["failing_sample_ids"]), r["detail"])
        for r in results
        if not r["success"]
    ]
    success = not failures
    failing_ids = sorted({sid for f in failures for sid in f.failing_sample_ids})

    atomic_write_text(report_dir / SUMMARY_CSV, summary.to_csv(index=False, lineterminator="\n"))
    payload = {
        "success": success,
        "dataset_dir": str(dataset_dir.resolve()),
        "task": info.get("task"),
        "content_hash": content_hash,
        "manifest_sha256": manifest_sha,
        "n_samples": int(len(summary)),
        "n_expectations": len(results),
        "n_failed": len(failures),
        "failing_sample_ids": failing_ids[:MAX_IDS_IN_JSON],
        "n_failing_samples": len(failing_ids),
        "expectations": [
            {**r, "failing_sample_ids": r["failing_sample_ids"][:MAX_IDS_IN_JSON]} for r in results
        ],
        "data_docs_index": str(data_docs_index) if data_docs_index else None,
        "summary_csv": str(report_dir / SUMMARY_CSV),
        "validated_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "ctharden_version": __version__,
        "great_expectations_version": _import_gx().__version__,
    }
    report_path = atomic_write_json(report_dir / VALIDATION_JSON, payload)
    return ValidationReport(
        success=success,
        failures=failures,
        content_hash=content_hash,
        data_docs_index=data_docs_index,
        n_samples=int(len(summary)),
        dataset_dir=dataset_dir,
        report_path=report_path,
        task=str(info.get("task")),
        results=results,
    )


# --------------------------------------------------------------------------------------- gates


def format_failures(report: ValidationReport) -> str:
    """Human-readable lines: a headline, then one line per failed expectation (used by the CLI)."""
    name = report.dataset_dir or "dataset"
    if report.success:
        return f"{name}: all expectations passed ({report.n_samples} samples)"
    lines = [f"{name}: {len(report.failures)} expectation(s) failed ({report.n_samples} samples)"]
    lines += [f"  - {f.describe()}" for f in report.failures]
    if report.data_docs_index:
        lines.append(f"  Data Docs: {report.data_docs_index}")
    return "\n".join(lines)


def ensure_valid(report: ValidationReport) -> None:
    """Raise :class:`ValidationFailed` naming each failed expectation and up to 10 sample ids each."""
    if report.success:
        return
    name = report.dataset_dir or "dataset"
    parts = "; ".join(f.describe() for f in report.failures)
    where = f" (see {report.report_path})" if report.report_path else ""
    raise ValidationFailed(
        f"{name} failed validation: {len(report.failures)} expectation(s) failed: {parts}{where}"
    )


def require_validated(dataset_dir: Path, report_dir: Path) -> dict[str, Any]:
    """Return ``validation.json`` if it proves *this* dataset passed; else raise :class:`ValidationFailed`.

    Requires: the report exists, ``success`` is true, its ``content_hash`` equals the dataset's
    current ``dataset.json`` content_hash, and ``manifest.csv`` still hashes to it (a dataset
    changed after validation is refused).
    """
    dataset_dir = Path(dataset_dir)
    path = Path(report_dir) / VALIDATION_JSON
    if not path.is_file():
        raise ValidationFailed(
            f"{dataset_dir} has not been validated: {path} not found (run `ctharden validate` first)"
        )
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"{path}: unreadable validation report ({exc})") from None
    if not isinstance(report, dict) or report.get("success") is not True:
        reason = report.get("error") if isinstance(report, dict) else None
        failed = [
            e.get("expectation")
            for e in (report.get("expectations") or [] if isinstance(report, dict) else [])
            if not e.get("success")
        ]
        detail = reason or (f"failed: {', '.join(map(str, failed))}" if failed else "success is not true")
        raise ValidationFailed(f"{dataset_dir} failed validation ({path}): {detail}")
    info = read_info(dataset_dir)
    current = info.get("content_hash")
    if report.get("content_hash") != current:
        raise ValidationFailed(
            f"{dataset_dir} changed since it was validated: content_hash {str(current)[:12]}… != "
            f"validated {str(report.get('content_hash'))[:12]}… ({path}); re-run validation"
        )
    manifest = dataset_dir / MANIFEST
    if not manifest.is_file() or sha256_file(manifest) != current:
        raise ValidationFailed(
            f"{manifest} changed since it was validated (its SHA-256 no longer matches content_hash); "
            "re-run validation"
        )
    return report
