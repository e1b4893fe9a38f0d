"""Data checks: the GX validation suite passes clean datasets and names every corruption.

Real Great Expectations runs, no mocks. Small clean datasets are written once per session with
:class:`DatasetWriter`; each bad-data case corrupts a copy on disk the way it happens in practice
(an ingester bug, a file edited or truncated after ingest) and asserts that validation fails with
a message naming the specific expectation and the offending sample id. The nodule2d cases corrupt
a small real dataset: the first 40 patients of the LIDC-IDRI crop release (``data/lidc_maxslice``,
conftest's ``lidc_crops``), ingested once per module with :func:`ingest_lidc2d`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctharden.core.errors import DataError, ValidationFailed
from ctharden.data.dataset import DatasetWriter, read_info, read_manifest
from ctharden.data.lidc2d import ingest_lidc2d
from ctharden.data.validation import (
    LUNG_P1_RANGE_HU,
    MANIFEST_HASH_CHECK,
    SUMMARY_COLUMNS,
    ValidationReport,
    build_expectations,
    ensure_valid,
    format_failures,
    require_validated,
    summarize_dataset,
    validate_dataset,
)

NODULE_SHAPE = (8, 8, 8)
COVID_SHAPE = (16, 16)
#: Summary columns only the nodule2d suite checks.
NODULE2D_ONLY = {"p1", "source_spacing_mm", "hu_source", "reader_rating", "ratings", "malignancy_mean",
                 "malignancy_mean_error", "malignancy_vs_3"}


def _build(out: Path, task: str) -> Path:
    rng = np.random.default_rng(7)
    if task == "nodule3d":
        with DatasetWriter(out, "nodule3d", shape=NODULE_SHAPE, n_folds=2, seed=0) as w:
            for i in range(12):
                cube = rng.uniform(-1024.0, 600.0, NODULE_SHAPE).astype(np.float32)
                row = {"sample_id": f"nod{i:02d}", "label": i % 2, "patient_id": f"P{i // 2}"}
                w.add({**row, "source": "synthetic", "spacing_mm": 1.0}, cube)
    else:
        with DatasetWriter(out, "covid2d", shape=COVID_SHAPE, n_folds=2, seed=0) as w:
            for i in range(8):
                img = rng.uniform(0.0, 1.0, COVID_SHAPE).astype(np.float32)
                w.add({"sample_id": f"cov{i}", "label": i % 2, "patient_id": f"S{i}", "source": "soares"}, img)
    return out


@pytest.fixture(scope="session")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clean nodule3d (12 cubes, HU) and covid2d (8 slices, [0,1]) datasets; copy before changing."""
    root = tmp_path_factory.mktemp("clean")
    return {task: _build(root / task, task) for task in ("nodule3d", "covid2d")}


@pytest.fixture(scope="session")
def clean_reports(clean: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Validate each clean dataset once per session; returns the report dirs."""
    root = tmp_path_factory.mktemp("clean_reports")
    out = {}
    for task, ds in clean.items():
        report = validate_dataset(ds, root / task)
        assert report.success, format_failures(report)
        out[task] = root / task
    return out


@pytest.fixture(scope="module")
def clean2d(tmp_path_factory: pytest.TempPathFactory, lidc_crops: Path) -> dict[str, Path]:
    """A small real nodule2d dataset: the first 40 LIDC patients (118 patches, 45x45 at 0.7 mm)."""
    out = tmp_path_factory.mktemp("clean2d") / "nodule2d"
    ingest_lidc2d(lidc_crops, out, limit=40)
    return {"nodule2d": out}


# ----------------------------------------------------------------------------------- corruption


def _copy(clean: dict[str, Path], task: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean[task], tmp_path / task))


def _rewrite(ds: Path, manifest: pd.DataFrame, *, seal: bool = True) -> None:
    """Write ``manifest`` back; with ``seal`` also update dataset.json's content_hash (an ingester bug
    writes a self-consistent but wrong dataset) so only the targeted expectation fails."""
    text = manifest.to_csv(index=False, lineterminator="\n")
    (ds / "manifest.csv").write_text(text)
    if seal:
        info = read_info(ds)
        info["content_hash"] = hashlib.sha256(text.encode()).hexdigest()
        (ds / "dataset.json").write_text(json.dumps(info, indent=2))


def _train_id(ds: Path, k: int = 0) -> str:
    m = read_manifest(ds)
    return str(m.loc[m["split"] == "train", "sample_id"].iloc[k])


def _replace_array(ds: Path, sid: str, array: np.ndarray, *, update_hash: bool = True) -> None:
    """Overwrite a sample's .npy; with ``update_hash`` the manifest records the new hash (ingest wrote it)."""
    path = ds / "arrays" / f"{sid}.npy"
    np.save(path, array, allow_pickle=False)
    if update_hash:
        m = read_manifest(ds)
        m.loc[m["sample_id"] == sid, "sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        _rewrite(ds, m)


def _load(ds: Path, sid: str) -> np.ndarray:
    return np.load(ds / "arrays" / f"{sid}.npy").copy()


def nan_voxels(ds: Path) -> str:
    sid = _train_id(ds)
    a = _load(ds, sid)
    a.flat[::7] = np.nan
    _replace_array(ds, sid, a)
    return sid


def inf_voxels(ds: Path) -> str:
    sid = _train_id(ds, 1)
    a = _load(ds, sid)
    a.flat[3] = np.inf
    _replace_array(ds, sid, a)
    return sid


def wrong_shape(ds: Path) -> str:
    sid = _train_id(ds)
    a = _load(ds, sid)
    _replace_array(ds, sid, a[..., : a.shape[-1] // 2].copy())
    return sid


def wrong_dtype(ds: Path) -> str:
    sid = _train_id(ds)
    _replace_array(ds, sid, _load(ds, sid).astype(np.float64))
    return sid


def hu_too_high(ds: Path) -> str:
    sid = _train_id(ds, 2)
    a = _load(ds, sid)
    a.flat[5] = 5000.0  # above 3071 HU
    _replace_array(ds, sid, a)
    return sid


def hu_too_low(ds: Path) -> str:
    sid = _train_id(ds, 2)
    a = _load(ds, sid)
    a.flat[5] = -3000.0  # below -1024 HU (e.g. an un-rescaled DICOM padding value)
    _replace_array(ds, sid, a)
    return sid


def covid_above_one(ds: Path) -> str:
    sid = _train_id(ds)
    a = _load(ds, sid)
    a *= 255.0  # forgot to scale 8-bit pixels to [0, 1]
    _replace_array(ds, sid, a)
    return sid


def label_outside_set(ds: Path) -> str:
    m = read_manifest(ds)
    sid = str(m["sample_id"].iloc[3])
    m.loc[3, "label"] = 7
    _rewrite(ds, m)
    return sid


def duplicate_ids(ds: Path) -> str:
    m = read_manifest(ds)
    sid = str(m["sample_id"].iloc[0])
    m.loc[5, "sample_id"] = sid
    _rewrite(ds, m)
    return sid


def missing_array(ds: Path) -> str:
    sid = _train_id(ds)
    (ds / "arrays" / f"{sid}.npy").unlink()
    return sid


def truncated_npy(ds: Path) -> str:
    sid = _train_id(ds)
    path = ds / "arrays" / f"{sid}.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return sid


def array_edited_after_ingest(ds: Path) -> str:
    sid = _train_id(ds)
    a = _load(ds, sid)
    a[0] = a[0][::-1]  # still valid values and shape, but not what was ingested
    _replace_array(ds, sid, a, update_hash=False)
    return sid


def patient_in_train_and_test(ds: Path) -> str:
    m = read_manifest(ds)
    test_patient = m.loc[m["split"] == "test", "patient_id"].iloc[0]
    train_rows = m.index[(m["split"] == "train") & (m["patient_id"] != test_patient)]
    sid = str(m.loc[train_rows[0], "sample_id"])
    m.loc[train_rows[0], "patient_id"] = test_patient
    _rewrite(ds, m)
    return sid


def wrong_spacing(ds: Path) -> str:
    m = read_manifest(ds)
    sid = str(m["sample_id"].iloc[1])
    m.loc[1, "spacing_mm"] = 0.7
    _rewrite(ds, m)
    return sid


def unknown_source(ds: Path) -> str:
    m = read_manifest(ds)
    sid = str(m["sample_id"].iloc[2])
    m.loc[2, "source"] = "internet"
    _rewrite(ds, m)
    return sid


def empty_dataset(ds: Path) -> str:
    m = read_manifest(ds)
    _rewrite(ds, m.iloc[:0])  # header only
    return ""


# nodule2d: ingester bugs on the real LIDC patches, each written self-consistently (hashes updated).


def _multi_row_train_patient(m: pd.DataFrame) -> pd.Index:
    """Row labels of a train patient with at least two patches."""
    train = m[m["split"] == "train"]
    sizes = train.groupby("patient_id").size()
    return train.index[train["patient_id"] == sizes[sizes >= 2].index[0]]


def label_flipped_against_ratings(ds: Path) -> str:
    m = read_manifest(ds)
    i = int(m.index[m["label"] == 1][0])  # a malignant nodule (mean rating > 3) written as benign
    m.loc[i, ["label", "label_name"]] = [0, "benign"]
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def mean_rating_of_3_kept(ds: Path) -> str:
    m = read_manifest(ds)
    i = int(m.index[m["label"] == 0][1])  # an ingester that labels `mean > 3` and keeps mean == 3 as benign
    m.loc[i, ["ratings", "n_readers", "malignancy_mean", "malignancy_class"]] = ["2;4", 2, 3.0, 3]
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def mean_not_mean_of_ratings(ds: Path) -> str:
    m = read_manifest(ds)
    i = int(m.index[m["label"] == 1][1])
    m.loc[i, "malignancy_mean"] = float(m.loc[i, "malignancy_mean"]) + 0.25  # e.g. the mean of other readers
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def rating_out_of_range(ds: Path) -> str:
    m = read_manifest(ds)
    i = int(m.index[m["label"] == 1][2])
    m.loc[i, ["ratings", "malignancy_mean"]] = ["4;7", 5.5]  # a 1-5 scale read as something else
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def reader_rating_zero(ds: Path) -> str:
    m = read_manifest(ds)
    m.loc[4, "reader_rating"] = 0  # 0 means "no reader" in the release's rating columns
    _rewrite(ds, m)
    return str(m.loc[4, "sample_id"])


def patient_split_across_train_and_test(ds: Path) -> str:
    m = read_manifest(ds)
    i = _multi_row_train_patient(m)[-1]  # one patch of a train patient split per row, not per patient
    m.loc[i, ["split", "fold"]] = ["test", -1]
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def patient_in_two_folds(ds: Path) -> str:
    m = read_manifest(ds)
    i = _multi_row_train_patient(m)[-1]
    m.loc[i, "fold"] = (int(m.loc[i, "fold"]) + 1) % int(read_info(ds)["split"]["n_folds"])
    _rewrite(ds, m)
    return str(m.loc[i, "sample_id"])


def spacing_not_resampled(ds: Path) -> str:
    m = read_manifest(ds)
    m.loc[3, "spacing_mm"] = 0.6  # the patch kept a source spacing instead of the dataset's 0.7 mm
    _rewrite(ds, m)
    return str(m.loc[3, "sample_id"])


def source_spacing_in_cm(ds: Path) -> str:
    m = read_manifest(ds)
    m.loc[6, "source_spacing_mm"] = float(m.loc[6, "source_spacing_mm"]) / 10.0
    _rewrite(ds, m)
    return str(m.loc[6, "sample_id"])


def unknown_hu_source(ds: Path) -> str:
    m = read_manifest(ds)
    m.loc[2, "hu_source"] = "guessed"
    _rewrite(ds, m)
    return str(m.loc[2, "sample_id"])


def stored_without_intercept(ds: Path) -> str:
    sid = _train_id(ds, 3)
    _replace_array(ds, sid, _load(ds, sid) + 1024.0)  # raw stored values: +1024 HU everywhere
    return sid


# (task, corruption, expected expectation, column named in the message)
CASES: list[tuple[str, Callable[[Path], str], str, str | None]] = [
    ("nodule3d", nan_voxels, "expect_column_values_to_be_between", "nan_count"),
    ("covid2d", nan_voxels, "expect_column_values_to_be_between", "nan_count"),
    ("nodule3d", inf_voxels, "expect_column_values_to_be_between", "inf_count"),
    ("nodule3d", wrong_shape, "expect_column_values_to_be_in_set", "shape"),
    ("covid2d", wrong_shape, "expect_column_values_to_be_in_set", "shape"),
    ("nodule3d", wrong_dtype, "expect_column_values_to_be_in_set", "dtype"),
    ("nodule3d", hu_too_high, "expect_column_values_to_be_between", "max"),
    ("nodule3d", hu_too_low, "expect_column_values_to_be_between", "min"),
    ("covid2d", covid_above_one, "expect_column_values_to_be_between", "max"),
    ("nodule3d", label_outside_set, "expect_column_values_to_be_in_set", "label"),
    ("covid2d", label_outside_set, "expect_column_values_to_be_in_set", "label"),
    ("nodule3d", duplicate_ids, "expect_column_values_to_be_unique", "sample_id"),
    ("nodule3d", empty_dataset, "expect_table_row_count_to_be_between", None),
    ("nodule3d", missing_array, "expect_column_values_to_be_in_set", "array_exists"),
    ("nodule3d", truncated_npy, "expect_column_values_to_be_null", "load_error"),
    ("nodule3d", array_edited_after_ingest, "expect_column_values_to_be_in_set", "sha256_ok"),
    ("nodule3d", patient_in_train_and_test, "expect_column_values_to_be_between", "n_splits_of_patient"),
    ("covid2d", patient_in_train_and_test, "expect_column_values_to_be_between", "n_splits_of_patient"),
    ("nodule3d", wrong_spacing, "expect_column_values_to_be_between", "spacing_mm"),
    ("covid2d", unknown_source, "expect_column_values_to_be_in_set", "source"),
]

CASES_2D: list[tuple[Callable[[Path], str], str, str | None]] = [
    (nan_voxels, "expect_column_values_to_be_between", "nan_count"),
    (wrong_shape, "expect_column_values_to_be_in_set", "shape"),
    (hu_too_low, "expect_column_values_to_be_between", "min"),
    (stored_without_intercept, "expect_column_values_to_be_between", "p1"),
    (label_flipped_against_ratings, "expect_column_pair_values_to_be_in_set", "label,malignancy_vs_3"),
    (mean_rating_of_3_kept, "expect_column_values_to_be_in_set", "malignancy_vs_3"),
    (mean_not_mean_of_ratings, "expect_column_values_to_be_between", "malignancy_mean_error"),
    (rating_out_of_range, "expect_column_values_to_match_regex", "ratings"),
    (reader_rating_zero, "expect_column_values_to_be_in_set", "reader_rating"),
    (patient_split_across_train_and_test, "expect_column_values_to_be_between", "n_splits_of_patient"),
    (patient_in_two_folds, "expect_column_values_to_be_between", "n_partitions_of_patient"),
    (duplicate_ids, "expect_column_values_to_be_unique", "sample_id"),
    (spacing_not_resampled, "expect_column_values_to_be_between", "spacing_mm"),
    (source_spacing_in_cm, "expect_column_values_to_be_between", "source_spacing_mm"),
    (unknown_hu_source, "expect_column_values_to_be_in_set", "hu_source"),
]

ALSO_FAILS_2D: dict[str, set[str | None]] = {
    "mean_rating_of_3_kept": {"label,malignancy_vs_3"},
    "patient_split_across_train_and_test": {"n_partitions_of_patient"},
}


def _assert_fails_naming(
    ds: Path, report_dir: Path, corrupt: Callable[[Path], str], expectation: str, column: str | None
) -> ValidationReport:
    sid = corrupt(ds)
    report = validate_dataset(ds, report_dir)
    assert not report.success
    named = f"{expectation}({column})" if column else expectation
    with pytest.raises(ValidationFailed) as err:
        ensure_valid(report)
    msg = str(err.value)
    assert named in msg, msg
    failure = next(f for f in report.failures if f.expectation == expectation and f.column == column)
    if sid:
        assert sid in failure.failing_sample_ids
        assert f"samples: {sid}" in msg or f", {sid}" in msg, msg
    # The seal records the failure, so downstream stages refuse the dataset.
    saved = json.loads((report_dir / "validation.json").read_text())
    assert saved["success"] is False
    assert any(e["expectation"] == expectation and not e["success"] for e in saved["expectations"])
    with pytest.raises(ValidationFailed, match="failed validation"):
        require_validated(ds, report_dir)
    return report


@pytest.mark.parametrize(
    ("task", "corrupt", "expectation", "column"),
    CASES,
    ids=[f"{t}-{c.__name__}" for t, c, _, _ in CASES],
)
def test_bad_data_fails_naming_expectation_and_sample(
    clean: dict[str, Path],
    tmp_path: Path,
    task: str,
    corrupt: Callable[[Path], str],
    expectation: str,
    column: str | None,
) -> None:
    ds = _copy(clean, task, tmp_path)
    _assert_fails_naming(ds, tmp_path / "report", corrupt, expectation, column)


@pytest.mark.parametrize(
    ("corrupt", "expectation", "column"), CASES_2D, ids=[f"nodule2d-{c.__name__}" for c, _, _ in CASES_2D]
)
def test_bad_2d_data_fails_naming_expectation_and_sample(
    clean2d: dict[str, Path],
    tmp_path: Path,
    corrupt: Callable[[Path], str],
    expectation: str,
    column: str | None,
) -> None:
    ds = _copy(clean2d, "nodule2d", tmp_path)
    report = _assert_fails_naming(ds, tmp_path / "report", corrupt, expectation, column)
    # Nothing else is blamed (a mean of 3 also breaks the label rule; a patient in train and test
    # is also in two partitions).
    assert {f.column for f in report.failures} == {column} | ALSO_FAILS_2D.get(corrupt.__name__, set())


def test_failures_are_specific(clean: dict[str, Path], tmp_path: Path) -> None:
    """A self-consistent NaN cube fails only the NaN check (and nothing else is blamed)."""
    ds = _copy(clean, "nodule3d", tmp_path)
    sid = nan_voxels(ds)
    report = validate_dataset(ds, tmp_path / "report")
    assert [(f.expectation, f.column, f.failing_sample_ids) for f in report.failures] == [
        ("expect_column_values_to_be_between", "nan_count", [sid])
    ]
    text = format_failures(report)
    assert "nan_count" in text and sid in text and "Data Docs" in text


def test_clean_datasets_pass_and_write_reports(clean: dict[str, Path], clean_reports: dict[str, Path]) -> None:
    for task, report_dir in clean_reports.items():
        saved = json.loads((report_dir / "validation.json").read_text())
        assert saved["success"] is True
        assert saved["content_hash"] == read_info(clean[task])["content_hash"]
        assert saved["n_samples"] == len(read_manifest(clean[task]))
        assert saved["n_failed"] == 0 and saved["failing_sample_ids"] == []
        names = {e["expectation"] for e in saved["expectations"]}
        assert {"expect_column_values_to_be_unique", "expect_table_row_count_to_be_between"} <= names
        assert MANIFEST_HASH_CHECK in names
        index = report_dir / "data_docs" / "index.html"
        assert index.is_file() and saved["data_docs_index"] == str(index)
        assert "ctharden_" + task in index.read_text()
        assert any((report_dir / "data_docs" / "validations").rglob("*.html"))
        summary = pd.read_csv(report_dir / "summary.csv")
        assert len(summary) == saved["n_samples"]
        assert require_validated(clean[task], report_dir)["success"] is True


def test_clean_real_nodule2d_passes(clean2d: dict[str, Path], tmp_path: Path) -> None:
    ds = clean2d["nodule2d"]
    report = validate_dataset(ds, tmp_path / "report")
    assert report.success, format_failures(report)
    assert require_validated(ds, tmp_path / "report")["task"] == "nodule2d"
    checked = {(r["expectation"], r["column"]) for r in report.results}
    for col in ("nan_count", "inf_count", "min", "max", "shape", "n_splits_of_patient", "n_partitions_of_patient"):
        assert ("expect_column_values_to_be_between", col) in checked or (
            "expect_column_values_to_be_in_set", col) in checked, col
    assert ("expect_column_values_to_be_unique", "sample_id") in checked
    assert ("expect_column_pair_values_to_be_in_set", "label,malignancy_vs_3") in checked
    assert NODULE2D_ONLY <= {str(r["column"]) for r in report.results}
    spacing = next(r for r in report.results if r["column"] == "spacing_mm" and "min_value" in r["kwargs"])
    assert spacing["kwargs"]["min_value"] == pytest.approx(0.7, abs=1e-5)
    s = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert list(s.columns) == list(SUMMARY_COLUMNS)
    assert (s["shape"] == "45x45").all() and s["p1"].between(*LUNG_P1_RANGE_HU).all()
    assert (s["malignancy_mean_error"] < 1e-3).all() and set(s["malignancy_vs_3"]) == {"above", "below"}


def test_nodule2d_suite_needs_2d_shape_and_resampling_spacing(clean2d: dict[str, Path]) -> None:
    info = read_info(clean2d["nodule2d"])
    assert build_expectations(info)
    with pytest.raises(DataError, match="not 2-D as task nodule2d requires"):
        build_expectations({**info, "shape": [45, 45, 45]})
    with pytest.raises(DataError, match="provenance has no valid spacing_mm"):
        build_expectations({**info, "provenance": {}})


def test_full_real_nodule2d_passes(lidc_crops: Path, tmp_path: Path) -> None:
    """All 1616 labelled LIDC crops pass the nodule2d suite, the lung check included (5-8 s)."""
    ds = tmp_path / "nodule2d"
    assert ingest_lidc2d(lidc_crops, ds)["n_samples"] == 1616
    report = validate_dataset(ds, tmp_path / "report")
    assert report.success, format_failures(report)


def test_spacing_expectation_only_for_nodule3d_with_column(
    clean: dict[str, Path], clean_reports: dict[str, Path]
) -> None:
    cols = {
        task: {e["column"] for e in json.loads((d / "validation.json").read_text())["expectations"]}
        for task, d in clean_reports.items()
    }
    assert "spacing_mm" in cols["nodule3d"]
    assert "spacing_mm" not in cols["covid2d"]
    for task in ("nodule3d", "covid2d"):  # the nodule2d checks stay out of the other suites
        assert not cols[task] & NODULE2D_ONLY


def test_revalidation_replaces_report(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "covid2d", tmp_path)
    assert validate_dataset(ds, tmp_path / "r").success
    missing_array(ds)
    report = validate_dataset(ds, tmp_path / "r")
    assert not report.success
    assert (tmp_path / "r" / "data_docs" / "index.html").is_file()
    assert not list((tmp_path / "r").glob(".data_docs*"))  # no leftover temporary site


# ----------------------------------------------------------------------------------- require_validated


def test_require_validated_refuses_changed_dataset(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "nodule3d", tmp_path)
    report_dir = tmp_path / "report"
    assert validate_dataset(ds, report_dir).success
    assert require_validated(ds, report_dir)["content_hash"] == read_info(ds)["content_hash"]
    # A relabelled sample, consistently rewritten (new content hash): must be validated again.
    m = read_manifest(ds)
    m.loc[0, "label"] = 1 - int(m.loc[0, "label"])
    m.loc[0, "label_name"] = {0: "benign", 1: "malignant"}[int(m.loc[0, "label"])]
    _rewrite(ds, m)
    with pytest.raises(ValidationFailed, match="changed since it was validated"):
        require_validated(ds, report_dir)
    assert validate_dataset(ds, report_dir).success
    assert require_validated(ds, report_dir)


def test_require_validated_refuses_manifest_edited_behind_dataset_json(
    clean: dict[str, Path], tmp_path: Path
) -> None:
    ds = _copy(clean, "nodule3d", tmp_path)
    report_dir = tmp_path / "report"
    assert validate_dataset(ds, report_dir).success
    m = read_manifest(ds)
    m.loc[0, "patient_id"] = "someone-else"
    _rewrite(ds, m, seal=False)  # dataset.json still carries the old content hash
    with pytest.raises(ValidationFailed, match="manifest.csv changed"):
        require_validated(ds, report_dir)
    report = validate_dataset(ds, report_dir)
    assert [f.expectation for f in report.failures] == [MANIFEST_HASH_CHECK]


def test_require_validated_without_validation(clean: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed, match="not been validated"):
        require_validated(clean["covid2d"], tmp_path / "nowhere")


# ----------------------------------------------------------------------------------- structure


def test_missing_manifest_is_a_clear_error(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "covid2d", tmp_path)
    (ds / "manifest.csv").unlink()
    with pytest.raises(DataError, match="manifest.csv: not found"):
        validate_dataset(ds, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "validation.json").read_text())["success"] is False


def test_missing_dataset_json_is_a_clear_error(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "covid2d", tmp_path)
    (ds / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json: not found"):
        validate_dataset(ds, tmp_path / "report")


def test_manifest_missing_columns_is_a_clear_error(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "covid2d", tmp_path)
    _rewrite(ds, read_manifest(ds).drop(columns=["patient_id", "sha256"]))
    with pytest.raises(DataError, match=r"missing columns \['patient_id', 'sha256'\]"):
        validate_dataset(ds, tmp_path / "report")


def test_null_sample_id_is_named_by_manifest_row(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "covid2d", tmp_path)
    m = read_manifest(ds)
    m.loc[4, "sample_id"] = None
    _rewrite(ds, m)
    report = validate_dataset(ds, tmp_path / "report")
    failure = next(f for f in report.failures if f.expectation == "expect_column_values_to_not_be_null")
    assert failure.column == "sample_id"
    assert failure.failing_sample_ids == ["<manifest row 6: no sample_id>"]


def test_summary_keeps_broken_rows_with_nan_stats(clean: dict[str, Path], tmp_path: Path) -> None:
    ds = _copy(clean, "nodule3d", tmp_path)
    gone = missing_array(ds)
    m = read_manifest(ds)
    broken = str(m.loc[m["sample_id"] != gone, "sample_id"].iloc[0])
    p = ds / "arrays" / f"{broken}.npy"
    p.write_bytes(p.read_bytes()[:100])
    s = summarize_dataset(ds).set_index("sample_id")
    assert len(s) == len(m)
    assert not s.loc[gone, "array_exists"] and pd.isna(s.loc[gone, "load_error"])
    assert s.loc[broken, "array_exists"] and "unreadable" in s.loc[broken, "load_error"]
    for sid in (gone, broken):
        assert np.isnan(s.loc[sid, ["min", "max", "mean", "nan_count"]].astype(float)).all()
        assert not s.loc[sid, "sha256_ok"]
    ok = s.drop(index=[gone, broken])
    assert (ok["shape"] == "8x8x8").all() and (ok["dtype"] == "float32").all()
    assert ok["sha256_ok"].all() and (ok["nan_count"] == 0).all()
    assert (ok["min"] >= -1024).all() and (ok["max"] <= 600).all()
    assert (s["n_splits_of_patient"] == 1).all()


def test_successful_report_passes_ensure_valid() -> None:
    report = ValidationReport(True, [], "abc", None, 0)
    ensure_valid(report)  # success: no error
    assert "all expectations passed" in format_failures(report)


def test_gx_is_imported_lazily() -> None:
    code = "import sys, ctharden.data.validation; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_relative_report_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dvc.yaml passes relative paths; GX's Data Docs store needs absolute ones."""
    ds = tmp_path / "ds"
    with DatasetWriter(ds, "covid2d", shape=(8, 8), seed=0) as w:
        for i in range(4):
            w.add({"sample_id": f"s{i}", "label": i % 2, "patient_id": f"p{i}", "source": "synthetic"},
                  np.full((8, 8), 0.5, np.float32))
    monkeypatch.chdir(tmp_path)
    report = validate_dataset(Path("ds"), Path("reports/v"))
    assert report.success and (tmp_path / "reports/v/data_docs").is_dir()
