"""``ctharden ingest table``: a team's own manifest of NIfTI / DICOM / PNG / .npy images -> one dataset.

All inputs are written here, small: NIfTI volumes (nibabel: int16 with scl_slope/scl_inter and
zooms), DICOM series and single DICOM files (pydicom: ImagePositionPatient, PixelSpacing,
SliceThickness, RescaleSlope/Intercept), PNG and .npy. HU are built as ramps along the axes so a
transposed axis, a missing rescale or a wrong resampling factor shows in the values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
from ct_files import write_dicom, write_manifest, write_nifti
from PIL import Image
from pydicom.uid import generate_uid

from ctharden.core.errors import DataError
from ctharden.data.dataset import load_array, read_info, read_manifest
from ctharden.data.table import ingest_table
from ctharden.data.validation import format_failures, validate_dataset

CLI = Path(sys.executable).parent / "ctharden"
NIFTI_XYZ = (10, 10, 10)  # stored (x, y, z)
NIFTI_ZOOMS = (0.8, 0.8, 2.0)  # mm (x, y, z)
SERIES_SLICES, SERIES_PX, SERIES_SPACING, SERIES_STEP = 6, 16, 0.7, 1.5
SLICE_PX, SLICE_SPACING = 20, 0.5
COVID_PX = 24


# --- writers -------------------------------------------------------------------------------------


def _nifti_hu(i: int) -> np.ndarray:
    """(z, y, x) HU: 100 HU per z slice, 4 HU per y row, flat in x, offset 2 HU per volume."""
    nz, ny, nx = NIFTI_XYZ[::-1]
    z, y, _ = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return (-1000.0 + 100 * z + 4 * y + 2 * i).astype(np.float32)


def _slice_hu(i: int, n: int = SLICE_PX) -> np.ndarray:
    """(y, x) lung-like HU: -900 background, a +40 HU block in the centre, 6 HU per column, offset 2i."""
    hu = np.full((n, n), -900.0, np.float32) + 6 * np.arange(n, dtype=np.float32)[None, :] + 2 * i
    hu[n // 2 - 3: n // 2 + 3, n // 2 - 3: n // 2 + 3] = 40.0
    return hu


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every source format under one root, with the HU each sample must come out as."""
    root = tmp_path_factory.mktemp("table_src")
    expected: dict[str, np.ndarray] = {}
    # NIfTI 3-D: 6 patients (3 per class), patient N0 twice; N1 has one voxel stored below air.
    (root / "nifti").mkdir()
    nifti_rows = []
    for i, name in enumerate(["N0_a", "N0_b", "N1", "N2", "N3", "N4", "N5"]):
        hu = _nifti_hu(i)
        slope = 2.0 if i % 3 == 0 else 1.0
        if name == "N1":
            hu[0, 0, 0] = -2000.0
        write_nifti(root / "nifti" / f"{name}.nii.gz", hu, slope=slope, inter=-1024.0, zooms=NIFTI_ZOOMS)
        expected[f"nifti_{name}"] = np.maximum(hu, -1024.0)
        patient = name.split("_")[0]
        nifti_rows.append({"path": f"nifti/{name}.nii.gz", "label": int(patient[1]) % 2, "patient_id": patient})
    # DICOM series (4 patients) + .npy volumes (2 patients), given split.
    series_rows = []
    for p in range(4):
        folder = root / "series" / f"D{p}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        vol = np.stack([_slice_hu(p, SERIES_PX) + 20 * k for k in range(SERIES_SLICES)])
        for k in range(SERIES_SLICES):  # file names run against z: the reader must sort by position
            write_dicom(folder / f"{SERIES_SLICES - k:03d}.dcm", vol[k], z=-50.0 + SERIES_STEP * k,
                        spacing=SERIES_SPACING, slope=1.0, intercept=-1024.0, series_uid=uid, patient=f"D{p}",
                        thickness=SERIES_STEP)
        expected[f"series_D{p}"] = vol
        series_rows.append({"path": f"series/D{p}", "label": p % 2, "patient_id": f"D{p}",
                            "split": "test" if p >= 2 else "train"})
    for p in (4, 5):
        vol = np.stack([_slice_hu(p, SERIES_PX) - 10 * k for k in range(SERIES_SLICES)])
        (root / "npy").mkdir(exist_ok=True)
        np.save(root / "npy" / f"vol{p}.npy", vol)
        expected[f"npy_vol{p}"] = vol
        series_rows.append({"path": f"npy/vol{p}.npy", "label": p % 2, "patient_id": f"D{p}", "split": "train",
                            "spacing": f"{SERIES_STEP},{SERIES_SPACING},{SERIES_SPACING}"})
    # nodule2d: single DICOM files (slope 2), a 2-D NIfTI (x, y, 1), a (1, y, x) .npy.
    (root / "slices").mkdir()
    slice_rows = []
    for p in range(4):
        hu = _slice_hu(p)
        write_dicom(root / "slices" / f"S{p}.dcm", hu, z=0.0, spacing=SLICE_SPACING, slope=2.0, intercept=-1024.0,
                    series_uid=generate_uid(), patient=f"S{p}")
        expected[f"slices_S{p}"] = hu
        slice_rows.append({"path": f"slices/S{p}.dcm", "label": p % 2, "patient_id": f"S{p}"})
    hu = _slice_hu(4)
    write_nifti(root / "slices" / "S4.nii", hu[None], slope=1.0, inter=-1024.0,
                zooms=(SLICE_SPACING, SLICE_SPACING, 3.0))
    np.save(root / "slices" / "S5.npy", _slice_hu(5)[None])
    expected["slices_S4"], expected["slices_S5"] = hu, _slice_hu(5)
    slice_rows += [{"path": "slices/S4.nii", "label": 0, "patient_id": "S4"},
                   {"path": "slices/S5.npy", "label": 1, "patient_id": "S5", "spacing": str(SLICE_SPACING)}]
    # covid2d: 8-bit grey PNGs and one [0, 1] .npy.
    (root / "png").mkdir()
    png_rows = []
    rng = np.random.default_rng(0)
    for p in range(6):
        grey = rng.integers(0, 256, (COVID_PX, COVID_PX), dtype=np.uint8)
        Image.fromarray(grey, mode="L").save(root / "png" / f"C{p}.png")
        expected[f"png_C{p}"] = grey.astype(np.float32) / 255.0
        png_rows.append({"path": f"png/C{p}.png", "label": p % 2, "patient_id": f"C{p // 2}", "notes": "x"})
    unit = rng.uniform(0, 1, (COVID_PX, COVID_PX)).astype(np.float32)
    np.save(root / "png" / "C6.npy", unit)
    expected["png_C6"] = unit
    png_rows.append({"path": "png/C6.npy", "label": 1, "patient_id": "C3"})
    manifests = {
        "nifti": write_manifest(root / "nifti.csv", nifti_rows),
        "series": write_manifest(root / "series.csv", series_rows),
        "slices": write_manifest(root / "slices.csv", slice_rows),
        "png": write_manifest(root / "png.csv", png_rows),
    }
    return {"root": root, "expected": expected, "manifests": manifests}


def _arrays(out: Path) -> dict[str, np.ndarray]:
    m = read_manifest(out)
    return {sid: np.asarray(load_array(out, rel)) for sid, rel in zip(m["sample_id"], m["array"], strict=True)}


def _assert_patient_grouped(m: pd.DataFrame) -> None:
    assert (m.groupby("patient_id")["split"].nunique() == 1).all(), "a patient in train and test"
    assert (m.groupby("patient_id")["fold"].nunique() == 1).all(), "a patient in two folds"
    assert ((m["split"] == "test") == (m["fold"] == -1)).all()


def _validate(out: Path, report_dir: Path) -> None:
    report = validate_dataset(out, report_dir)
    assert report.success, format_failures(report)


# --- the formats -----------------------------------------------------------------------------------


def test_nifti_volumes_hu_round_trip_and_patient_grouped_splits(src: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = ingest_table(src["manifests"]["nifti"], src["root"], out, task="nodule3d", n_folds=2, seed=0)
    info, m = read_info(out), read_manifest(out)
    assert info["task"] == "nodule3d" and info["units"] == "HU" and info["shape"] == list(NIFTI_XYZ[::-1])
    assert info["sources"] == ["table"] and report["formats"] == {"nifti": 7} and report["n_samples"] == 7
    assert report["counts"] == {"benign": 4, "malignant": 3} and report["splits"] == "assigned"
    for sid, arr in _arrays(out).items():  # scl_slope/inter applied, (x, y, z) -> (z, y, x), exact
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(arr, src["expected"][sid], err_msg=sid)
    m = m.set_index("sample_id", drop=False)
    assert m.loc["nifti_N1", "clipped_px"] == 1 and report["n_clipped_to_air"] == 1 and report["clipped_px"] == 1
    assert set(m["original_spacing_mm"]) == {"2,0.8,0.8"} and set(m["spacing_source"]) == {"header"}
    assert set(m["value_source"]) == {"nifti_scl_slope_inter"} and "spacing_mm" not in m.columns
    assert m.loc["nifti_N0_b", "original_path"] == "nifti/N0_b.nii.gz" and m.loc["nifti_N0_b", "manifest_line"] == 3
    _assert_patient_grouped(m)
    assert (m["split"] == "test").any() and (m["split"] == "train").any()


def test_resample_and_crop_nifti_then_validate(src: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = ingest_table(src["manifests"]["nifti"], src["root"], out, task="nodule3d",
                          spacing_mm=1.0, size=8, n_folds=2)
    assert read_info(out)["shape"] == [8, 8, 8] and report["n_resampled"] == 7 and report["n_cropped"] == 7
    m = read_manifest(out)
    assert (m["spacing_mm"] == 1.0).all() and m["resampled"].all() and not m["padded"].any()
    # (10, 10, 10) voxels of (2, 0.8, 0.8) mm -> (20, 8, 8) at 1 mm -> centre crop z to 8: the ramps
    # are now 100 HU / 2 voxels along z, 4 HU per 0.8 mm = 5 HU per mm along y, flat along x.
    arr = _arrays(out)["nifti_N2"]
    np.testing.assert_allclose(np.diff(arr, axis=0)[:, 4, 4], 50.0, atol=1e-3)
    np.testing.assert_allclose(np.diff(arr, axis=1)[4, 1:-1, 4], 5.0, atol=1e-3)
    np.testing.assert_allclose(np.diff(arr, axis=2), 0.0, atol=1e-3)
    _validate(out, tmp_path / "validation")


def test_dicom_series_and_npy_with_given_splits(src: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = ingest_table(src["manifests"]["series"], src["root"], out, task="nodule3d", n_folds=2, seed=1)
    assert report["formats"] == {"dicom_series": 4, "npy": 2} and report["splits"] == "given"
    assert read_info(out)["shape"] == [SERIES_SLICES, SERIES_PX, SERIES_PX]
    for sid, arr in _arrays(out).items():  # slices sorted by z; HU = raw * slope + intercept
        np.testing.assert_array_equal(arr, src["expected"][sid], err_msg=sid)
    m = read_manifest(out).set_index("sample_id", drop=False)
    assert m.loc["series_D0", "original_spacing_mm"] == f"{SERIES_STEP:g},{SERIES_SPACING:g},{SERIES_SPACING:g}"
    assert m.loc["series_D0", "spacing_source"] == "header" and m.loc["npy_vol4", "spacing_source"] == "manifest"
    given = {f"series_D{p}": "test" if p >= 2 else "train" for p in range(4)}
    given |= {"npy_vol4": "train", "npy_vol5": "train"}
    assert m["split"].to_dict() == given
    assert set(m.loc[m["split"] == "train", "fold"]) == {0, 1}
    _assert_patient_grouped(m)
    info = read_info(out)
    assert info["split"]["method"].startswith("given") and info["split"]["n_test"] == 2
    # Resampled to 1.5 mm (not nodule3d's 1 mm): the table source's rule wants provenance spacing_mm.
    out15 = tmp_path / "ds15"
    ingest_table(src["manifests"]["series"], src["root"], out15, task="nodule3d", spacing_mm=1.5, n_folds=2)
    assert read_info(out15)["shape"] == [SERIES_SLICES, 7, 7]  # 16 px x 0.7 mm -> 7 px at 1.5 mm
    assert read_manifest(out15)["split"].tolist() == read_manifest(out)["split"].tolist()
    _validate(out15, tmp_path / "validation")


def test_single_dicom_nifti2d_npy_slices_resample_pad_validate(src: dict[str, Any], tmp_path: Path) -> None:
    manifest, root = src["manifests"]["slices"], src["root"]
    plain = ingest_table(manifest, root, tmp_path / "plain", task="nodule2d", n_folds=2)
    assert plain["formats"] == {"dicom": 4, "nifti": 1, "npy": 1}
    for sid, arr in _arrays(tmp_path / "plain").items():  # rescale slope 2 applied; singleton axis dropped
        np.testing.assert_array_equal(arr, src["expected"][sid], err_msg=sid)
    out = tmp_path / "ds"
    report = ingest_table(manifest, root, out, task="nodule2d", spacing_mm=0.7, size=16, n_folds=2)
    assert read_info(out)["shape"] == [16, 16] and report["n_padded"] == 6  # 20 px x 0.5 mm -> 14 px at 0.7
    for arr in _arrays(out).values():
        assert arr.shape == (16, 16)
        assert (arr[0] == -1024.0).all() and (arr[:, -1] == -1024.0).all(), "padded with air"
        assert arr[8, 8] == pytest.approx(40.0), "the centre block stays centred"
    _validate(out, tmp_path / "validation")


def test_png_covid2d_values_validation_and_cli(src: dict[str, Any], tmp_path: Path) -> None:
    manifest, root = src["manifests"]["png"], src["root"]
    out = tmp_path / "ds"
    report = ingest_table(manifest, root, out, task="covid2d", n_folds=2, seed=3, test_fraction=0.2)
    assert report["formats"] == {"image": 6, "npy": 1} and read_info(out)["units"] == "unit interval [0,1]"
    assert report["ignored_columns"] == ["notes"]
    for sid, arr in _arrays(out).items():
        np.testing.assert_array_equal(arr, src["expected"][sid], err_msg=sid)
    _assert_patient_grouped(read_manifest(out))
    _validate(out, tmp_path / "validation")
    cli_out = tmp_path / "cli_ds"
    r = subprocess.run(
        [str(CLI), "ingest", "table", "--manifest", str(manifest), "--root", str(root), "--task", "covid2d",
         "--out", str(cli_out), "--n-folds", "2", "--seed", "3", "--test-fraction", "0.2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    assert read_info(cli_out)["content_hash"] == report["content_hash"], "CLI and library build the same dataset"
    assert report["content_hash"] in r.stdout


# --- bad input: one line naming the row and the path, nothing written ----------------------------------


def _npy_rows(root: Path, n: int = 4) -> list[dict[str, Any]]:
    """``n`` valid nodule2d rows: (20, 20) HU .npy images, one patient each."""
    (root / "bad").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        np.save(root / "bad" / f"b{i}.npy", _slice_hu(i))
        rows.append({"path": f"bad/b{i}.npy", "label": i % 2, "patient_id": f"B{i}"})
    return rows


def _put(root: Path, rel: str, data: bytes | np.ndarray) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        (root / rel).write_bytes(data)
    else:
        np.save(root / rel, data)
    return rel


def _truncated_nifti(root: Path) -> bytes:
    """A real .nii cut to 80 % of its bytes: the header reads, the voxels end early (nibabel's
    error message spans two lines; the ingester's must not)."""
    write_nifti(root / "whole.nii", _nifti_hu(0), slope=1.0, inter=-1024.0, zooms=NIFTI_ZOOMS)
    data = (root / "whole.nii").read_bytes()
    return data[: len(data) * 4 // 5]


Case = Callable[[Path, list[dict[str, Any]]], tuple[list[dict[str, Any]], dict[str, Any], int, str, str]]


def _replace(rows: list[dict[str, Any]], i: int, **kw: Any) -> list[dict[str, Any]]:
    rows = [dict(r) for r in rows]
    rows[i].update(kw)
    return rows


# Each case: (rows, ingest kwargs, manifest line named, path named, message fragment).
BAD: dict[str, Case] = {
    "missing file": lambda root, rows: (
        _replace(rows, 1, path="bad/nope.npy"), {}, 3, "bad/nope.npy", "file not found"),
    "corrupt nifti": lambda root, rows: (
        _replace(rows, 2, path=_put(root, "bad/x.nii.gz", b"\x1f\x8b not really gzip")), {}, 4, "bad/x.nii.gz",
        "cannot read NIfTI"),
    "truncated nifti": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/t.nii", _truncated_nifti(root))), {}, 3, "bad/t.nii",
        "cannot read NIfTI (OSError: Expected"),
    "folder without DICOM": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/empty/readme.txt", b"no images").rsplit("/", 1)[0]), {}, 3,
        "bad/empty", "folder holds no DICOM files"),
    "corrupt dicom": lambda root, rows: (
        _replace(rows, 0, path=_put(root, "bad/x.dcm", b"\0" * 64)), {}, 2, "bad/x.dcm", "cannot read DICOM"),
    "corrupt png": lambda root, rows: (
        _replace(rows, 0, path=_put(root, "bad/x.png", b"\x89PNG\r\n\x1a\n broken")), {"task": "covid2d"}, 2,
        "bad/x.png", "cannot decode image"),
    "png for an HU task": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/y.png", b"unused")), {}, 3, "bad/y.png", "carry no HU"),
    "3-D array for a 2-D task": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/vol.npy", np.zeros((3, 4, 4)) - 900)), {}, 3, "bad/vol.npy",
        "needs a 2-D image"),
    "2-D image for a 3-D task": lambda root, rows: (rows, {"task": "nodule3d"}, 2, "bad/b0.npy", "needs a 3-D volume"),
    "bad label": lambda root, rows: (_replace(rows, 2, label="2"), {}, 4, "bad/b2.npy", "label '2'"),
    "duplicate sample_id": lambda root, rows: (
        [{**r, "sample_id": "same" if i in (0, 2) else f"s{i}"} for i, r in enumerate(rows)], {}, 4, "bad/b2.npy",
        "duplicate sample_id 'same' (also line 2 ('bad/b0.npy'))"),
    "patient in both given splits": lambda root, rows: (
        [{**r, "patient_id": "B0" if i == 3 else r["patient_id"], "split": "test" if i == 3 else "train"}
         for i, r in enumerate(rows)], {}, 5, "bad/b3.npy", "patient 'B0' is in test here but in train at line 2"),
    "HU above the range": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/hot.npy", np.full((SLICE_PX, SLICE_PX), 5000.0))), {}, 3,
        "bad/hot.npy", "outside the nodule2d range"),
    "NaN": lambda root, rows: (
        _replace(rows, 1, path=_put(root, "bad/nan.npy", np.full((SLICE_PX, SLICE_PX), np.nan))), {}, 3,
        "bad/nan.npy", "NaN/Inf"),
    "shapes differ without size": lambda root, rows: (
        _replace(rows, 2, path=_put(root, "bad/small.npy", np.full((8, 8), -900.0))), {}, 4, "bad/small.npy",
        "differs from (20, 20) of line 2 ('bad/b0.npy')"),
    "spacing unknown for resampling": lambda root, rows: (
        rows, {"spacing_mm": 0.7}, 2, "bad/b0.npy", "spacing unknown"),
    "bad spacing value": lambda root, rows: (
        _replace(rows, 1, spacing="0.7,0.7,0.7"), {}, 3, "bad/b1.npy", "give one number or 2 (y,x)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_row_and_writes_nothing(case: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rows, kwargs, line, path, fragment = BAD[case](root, _npy_rows(root))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    manifest = write_manifest(tmp_path / "m.csv", rows, columns)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        ingest_table(manifest, root, out, **{"task": "nodule2d", "n_folds": 2, **kwargs})
    msg = str(exc.value)
    assert "\n" not in msg and f"line {line} " in msg and repr(path) in msg and fragment in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".out*")), "nothing written at out"


def test_missing_column_and_cli_error(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    rows = _npy_rows(root)
    manifest = write_manifest(tmp_path / "m.csv", rows, ["path", "label"])
    with pytest.raises(DataError, match=r"line 1 \(header\): missing column\(s\) \['patient_id'\]"):
        ingest_table(manifest, root, tmp_path / "out", task="nodule2d")
    bad = write_manifest(tmp_path / "bad.csv", _replace(rows, 0, path="bad/nope.npy"))
    r = subprocess.run(
        [str(CLI), "ingest", "table", "--manifest", str(bad), "--root", str(root), "--task", "nodule2d",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and "line 2 ('bad/nope.npy'): file not found" in r.stderr
    assert not (tmp_path / "out").exists()


def test_pydicom_reads_what_the_helper_writes(tmp_path: Path) -> None:
    """Guard for the fixture itself: the slice helper writes real, standard DICOM."""
    hu = _slice_hu(0)
    write_dicom(tmp_path / "a.dcm", hu, z=1.0, spacing=0.5, slope=2.0, intercept=-1024.0, series_uid=generate_uid(),
                patient="P")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert ds.preamble is not None and float(ds.RescaleSlope) == 2.0
    np.testing.assert_array_equal(ds.pixel_array * 2.0 - 1024.0, hu)
