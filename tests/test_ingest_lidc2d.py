"""The LIDC-IDRI crop release (real nodules) -> nodule2d: labels, HU, spacing, splits, acquisition, bad input."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from ctharden.core.errors import DataError
from ctharden.data.acquisition import mas_per_rotation
from ctharden.data.dataset import load_array, read_info, read_manifest
from ctharden.data.lidc2d import ANNOTATIONS, CROPS, RATING_COLUMNS, ingest_lidc2d, intercept_from_image
from ctharden.data.patch2d import resample_patch

CLI = [str(REPO / ".venv" / "bin" / "ctharden")]


@pytest.fixture(scope="module")
def full(lidc_crops: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("lidc2d") / "ds"
    report = ingest_lidc2d(lidc_crops, out, seed=7)
    return out, report, read_manifest(out)


def test_labels_are_the_mean_of_every_readers_rating(full: tuple[Path, dict, pd.DataFrame], lidc_crops: Path) -> None:
    out, report, m = full
    # the release README's counts: 1083 < 3, 533 > 3, 489 == 3 (dropped)
    assert report["counts"]["benign"] == 1083 and report["counts"]["malignant"] == 533
    assert report["counts"]["dropped_mean_eq_3"] == 489 and report["n_samples"] == 1616 == len(m)
    ann = pd.read_csv(lidc_crops / ANNOTATIONS)
    by_id = ann.set_index("noduleID")
    for _, row in m.sample(200, random_state=0).iterrows():
        src = by_id.loc[row["nodule_id"]]
        ratings = [int(src[c]) for c in RATING_COLUMNS if not pd.isna(src[c]) and src[c] != 0]
        assert row["ratings"] == ";".join(map(str, ratings))
        assert math.isclose(row["malignancy_mean"], round(float(np.mean(ratings)), 4))
        assert row["label"] == int(np.mean(ratings) > 3) and not math.isclose(np.mean(ratings), 3.0)
        # this reader's own rating is kept (not used as the label); the release's `malignancy` is not it
        assert row["reader_rating"] == src[f"Malignancy_{src['RadiologistID']}"]
    assert set(m["label_name"]) == {"benign", "malignant"}


def test_hu_rule_agrees_with_every_header_it_can_be_checked_on(lidc_crops: Path) -> None:
    """The image rule (intercept from the 10th percentile) against the header on all 659 crops that have one."""
    ann = pd.read_csv(lidc_crops / ANNOTATIONS)
    with np.load(lidc_crops / CROPS) as z:
        images = z["images"]
    known = ann["Rescale Intercept"].notna().to_numpy()
    assert known.sum() == 659
    rule = np.array([intercept_from_image(images[i]) for i in np.flatnonzero(known)])
    header = ann.loc[known, "Rescale Intercept"].to_numpy()
    agree = rule == header
    assert agree.mean() >= 0.90, agree.mean()  # measured 91 %
    # every disagreement is a -1000 vs -1024 header: the rule is then 24 HU off, never 1024
    assert set(map(tuple, np.stack([header[~agree], rule[~agree]], 1).tolist())) <= {(-1000.0, -1024.0)}


def test_hu_spacing_and_manifest_columns(full: tuple[Path, dict, pd.DataFrame], lidc_crops: Path) -> None:
    out, _, m = full
    info = read_info(out)
    assert info["task"] == "nodule2d" and info["shape"] == [45, 45] and info["units"] == "HU"
    assert (m["spacing_mm"] == 0.7).all() and m["source_spacing_mm"].between(0.46, 0.98).all()
    assert set(m["hu_source"]) == {"header", "image_rule"}
    assert (m["padded_px"] == 0).all()  # 45 x 0.7 mm fits inside every 71-pixel crop
    # one sample recomputed by hand: HU = stored x slope + intercept, resampled to 0.7 mm about the centre
    row = m[m["hu_source"] == "header"].iloc[0]
    ann = pd.read_csv(lidc_crops / ANNOTATIONS)
    i = int(np.flatnonzero(ann["noduleID"].to_numpy() == row["nodule_id"])[0])
    with np.load(lidc_crops / CROPS) as z:
        stored = z["images"][i]
    hu = stored * ann["Rescale Slope"].iloc[i] + ann["Rescale Intercept"].iloc[i]
    expect = resample_patch(hu, float(ann["PixelSpacing"].iloc[i]), (35.0, 35.0), out_spacing_mm=0.7, size=45)
    np.testing.assert_allclose(load_array(out, row["array"]), np.clip(expect.image, -1024, 3071), atol=1e-3)
    # nearly every patch holds lung: 10th percentile in the lung range (measured on all 1616: 1st-99th
    # percentile -992 to -691 HU; 7 patches above -600, where a large or pleural nodule fills the centre)
    sample = m.sample(300, random_state=1)
    p10 = np.array([np.percentile(load_array(out, r["array"]), 10) for _, r in sample.iterrows()])
    assert (p10 >= -1024).all() and (p10 < -600).mean() > 0.97, (p10.min(), p10.max())


def test_patients_never_span_splits(full: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, m = full
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    assert m.groupby("patient_id")["fold"].nunique().max() == 1
    test_share = (m["split"] == "test").mean()
    assert 0.15 < test_share < 0.25
    by_label = m.groupby("split")["label"].mean()  # label-stratified
    assert abs(by_label["test"] - by_label["train"]) < 0.05


def test_mas_is_current_times_rotation_time_never_the_vendor_exposure(full: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, m = full
    known = m[m["mas_source"] == "current_x_time"]
    assert len(known) > 400 and m.loc[m["mas_source"] == "unknown", "mas"].isna().all()
    np.testing.assert_allclose(known["mas"], known["tube_current_ma"] * known["exposure_time_ms"] / 1000, atol=1e-3)
    ge = known[known["manufacturer"].str.startswith("GE")]
    assert (ge["exposure_dicom"] > 10 * ge["mas"]).any() and (ge["exposure_dicom"] < ge["mas"] / 10).any()
    assert math.isnan(mas_per_rotation(math.nan, 500.0)) and mas_per_rotation(400, 570) == pytest.approx(228.0)


def _release_copy(lidc_crops: Path, dest: Path, n_rows: int = 40) -> tuple[Path, np.ndarray, pd.DataFrame]:
    dest.mkdir()
    ann = pd.read_csv(lidc_crops / ANNOTATIONS).iloc[:n_rows]
    with np.load(lidc_crops / CROPS) as z:
        images, ids = z["images"][:n_rows], z["nodule_id"][:n_rows]
    np.savez(dest / CROPS, images=images, nodule_id=ids)
    ann.to_csv(dest / ANNOTATIONS, index=False)
    return dest, images, ann


def test_bad_releases_are_errors_naming_the_row(lidc_crops: Path, tmp_path: Path) -> None:
    root, images, ann = _release_copy(lidc_crops, tmp_path / "r")
    assert ingest_lidc2d(root, tmp_path / "ok", seed=0)["n_samples"] > 0

    (root / CROPS).unlink()
    with pytest.raises(DataError, match="crops.npz: missing"):
        ingest_lidc2d(root, tmp_path / "o1")
    np.savez(root / CROPS, images=images[:-1], nodule_id=ann["noduleID"].to_numpy()[:-1])
    with pytest.raises(DataError, match=rf"row 41 \(noduleID {ann.noduleID.iloc[39]}\) has no image"):
        ingest_lidc2d(root, tmp_path / "o2")
    np.savez(root / CROPS, images=images[:, :70], nodule_id=ann["noduleID"].to_numpy())
    with pytest.raises(DataError, match=r"images must be \(N, S, S\)"):
        ingest_lidc2d(root, tmp_path / "o3")
    ids = ann["noduleID"].to_numpy().copy()
    ids[5] = 99999
    np.savez(root / CROPS, images=images, nodule_id=ids)
    with pytest.raises(DataError, match="row 7 has noduleID .* nodule_id 99999"):
        ingest_lidc2d(root, tmp_path / "o4")
    np.savez(root / CROPS, images=images, nodule_id=ann["noduleID"].to_numpy())
    bad = ann.copy()
    bad.loc[3, "Malignancy_2"] = 7
    bad.to_csv(root / ANNOTATIONS, index=False)
    with pytest.raises(DataError, match=rf"row 5 \(noduleID {ann.noduleID.iloc[3]}\): Malignancy_2 = 7"):
        ingest_lidc2d(root, tmp_path / "o5")
    bad = ann.copy()
    j = int(np.flatnonzero((ann[list(RATING_COLUMNS)] > 0).sum(axis=1) >= 2)[0])  # a nodule with >= 2 readers
    bad.loc[j, f"Malignancy_{ann.RadiologistID.iloc[j]}"] = 0
    bad.to_csv(root / ANNOTATIONS, index=False)
    with pytest.raises(DataError, match=rf"row {j + 2} .*\(this crop's reader\) = 0"):
        ingest_lidc2d(root, tmp_path / "o8")
    bad = ann.copy()
    bad.loc[2, "PixelSpacing"] = 7.0
    bad.to_csv(root / ANNOTATIONS, index=False)
    with pytest.raises(DataError, match=r"row 4 .*PixelSpacing 7.0 mm"):
        ingest_lidc2d(root, tmp_path / "o6")
    ann.drop(columns=["Malignancy_3"]).to_csv(root / ANNOTATIONS, index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['Malignancy_3'\]"):
        ingest_lidc2d(root, tmp_path / "o7")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))  # nothing half-written


def test_cli_ingests_a_patient_subset(lidc_crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    r = subprocess.run([*CLI, "ingest", "lidc2d", "--root", str(lidc_crops), "--out", str(out), "--limit", "30"],
                       capture_output=True, text=True, timeout=300)  # a hang guard; measured ~8 s
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    assert m["patient_id"].nunique() <= 30 and "hu_header" in r.stdout
    shutil.rmtree(out)
    r = subprocess.run([*CLI, "ingest", "lidc2d", "--root", str(tmp_path / "nope"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "not a directory" in r.stderr and not out.exists()
