"""LIDC-IDRI ingestion on the real LIDC-IDRI-0001 slab and reader XMLs, plus its failure modes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ctharden.core.errors import DataError
from ctharden.data.dataset import load_array, read_info, read_manifest
from ctharden.data.lidc import count_lidc, ingest_lidc
from ctharden.data.lidc_xml import Contour, ReaderMark, group_marks, malignancy_class, malignancy_label

SLAB = "LIDC-IDRI-0001_dicom_slab"
XML_0001 = "LIDC-IDRI-0001_069.xml"


@pytest.fixture(scope="module")
def lidc_dataset(lidc_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lidc") / "ds"
    report = ingest_lidc(lidc_sample, out, seed=0)
    return out, report


def _copy_case(lidc_sample: Path, dest: Path, keep_z: tuple[float, float] | None = None) -> Path:
    """Copy the 0001 XML and (optionally z-filtered) slab into ``dest``; return the slab folder."""
    (dest / "xml").mkdir(parents=True)
    shutil.copy(lidc_sample / "xml" / XML_0001, dest / "xml")
    slab = dest / SLAB
    slab.mkdir()
    for f in sorted((lidc_sample / SLAB).glob("*.dcm")):
        z = float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        if keep_z is None or keep_z[0] <= z <= keep_z[1]:
            shutil.copy(f, slab)
    return slab


def test_real_sample_large_nodule(lidc_dataset: tuple[Path, dict]) -> None:
    out, report = lidc_dataset
    m = read_manifest(out)
    assert len(m) == 1, "the 0001 slab holds exactly one >= 3 mm nodule"
    row = m.iloc[0]
    assert row["patient_id"] == "LIDC-IDRI-0001"
    assert row["n_readers"] == 4
    assert sorted(str(row["ratings"]).split(";")) == ["4", "5", "5", "5"]
    assert row["malignancy_mean"] == pytest.approx(4.75)
    assert row["label"] == 1 and row["label_name"] == "malignant"
    assert row["malignancy_class"] == 5
    assert 25 < row["diameter_mm"] < 40, "the paper-sized large nodule is about 33 mm across"
    assert row["source"] == "lidc"

    cube = np.asarray(load_array(out, row["array"]))
    assert cube.shape == (32, 32, 32) and cube.dtype == np.float32
    assert np.isfinite(cube).all() and cube.min() >= -1024 and cube.max() <= 3071
    # Solid nodule at the centre, lung parenchyma around it.
    assert np.median(cube[12:20, 12:20, 12:20]) > -100
    lung = cube[cube < -500]
    assert lung.size > 1000 and -950 < np.median(lung) < -750
    # Centred: the solid component at the centre (eroded to cut off attached vessels) has its
    # centre of mass within 2 voxels of the cube centre (15.5, 15.5, 15.5).
    solid = ndimage.binary_erosion(cube > -400, iterations=2)
    lab, _ = ndimage.label(solid)
    comp = lab == lab[16, 16, 16]
    assert comp.sum() > 500
    com = np.array(ndimage.center_of_mass(comp))
    assert np.abs(com - 15.5).max() < 2.0, com

    info = read_info(out)
    assert info["task"] == "nodule3d" and info["units"] == "HU" and info["shape"] == [32, 32, 32]
    assert len(info["content_hash"]) == 64


def test_funnel_counts_come_from_the_rule(lidc_dataset: tuple[Path, dict], lidc_sample: Path) -> None:
    _, report = lidc_dataset
    f = report["funnel"]
    assert f["xml_files"] == 3 and f["reading_sessions"] == 12
    assert f["marks"] == f["marks_ge3mm"] + f["marks_lt3mm"]
    assert f["nodules_ge3mm"] == f["dropped_mean_eq_3"] + f["malignant"] + f["benign"]
    assert f["xml_without_images"] == 2  # 0002 and 0003 ship without DICOM
    assert f["cubes"] == 1 and f["cubes_malignant"] == 1
    # The XML-only count (what is printed for a full LIDC copy) agrees on every annotation filter.
    counted = count_lidc(lidc_sample)["funnel"]
    for key in ("marks_ge3mm", "nodules_ge3mm", "dropped_mean_eq_3", "malignant", "benign"):
        assert counted[key] == f[key], key


def test_tcia_layout_gives_the_same_cube(lidc_sample: Path, lidc_dataset: tuple[Path, dict], tmp_path: Path) -> None:
    """TCIA layout: patient/study/series folders with the XML beside the DICOM files."""
    series = tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0001" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.2988" / "3000566"
    shutil.copytree(lidc_sample / SLAB, series)
    shutil.copy(lidc_sample / "xml" / XML_0001, series / "069.xml")
    report = ingest_lidc(tmp_path / "LIDC-IDRI", tmp_path / "out", seed=0)
    assert report["n_samples"] == 1 and report["funnel"]["xml_without_images"] == 0
    ref_out, _ = lidc_dataset
    a = load_array(tmp_path / "out", read_manifest(tmp_path / "out")["array"][0])
    b = load_array(ref_out, read_manifest(ref_out)["array"][0])
    np.testing.assert_array_equal(a, b)


def test_nodule_outside_slab_is_skipped_with_warning(
    lidc_sample: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _copy_case(lidc_sample, tmp_path / "root", keep_z=(-155.0, -115.0))  # nodule spans -125..-105 mm
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="no nodule cube could be extracted"):
        ingest_lidc(tmp_path / "root", tmp_path / "out")
    assert any("outside the available slices" in r.message and "Nodule 001" in r.message for r in caplog.records)
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_corrupt_dicom_names_the_file(lidc_sample: Path, tmp_path: Path) -> None:
    slab = _copy_case(lidc_sample, tmp_path / "root")
    victim = sorted(slab.glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated mid-header
    with pytest.raises(DataError, match=victim.name):
        ingest_lidc(tmp_path / "root", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_pixel_data_names_the_file(lidc_sample: Path, tmp_path: Path) -> None:
    slab = _copy_case(lidc_sample, tmp_path / "root")
    victim = sorted(slab.glob("*.dcm"))[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 200_000])  # header intact, pixels cut
    with pytest.raises(DataError, match=victim.name):
        ingest_lidc(tmp_path / "root", tmp_path / "out")


def test_missing_slice_in_series_is_an_error(lidc_sample: Path, tmp_path: Path) -> None:
    slab = _copy_case(lidc_sample, tmp_path / "root")
    by_z = sorted(slab.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_z[10].unlink()
    with pytest.raises(DataError, match="missing DICOM slice"):
        ingest_lidc(tmp_path / "root", tmp_path / "out")


def test_corrupt_xml_names_the_file(lidc_sample: Path, tmp_path: Path) -> None:
    _copy_case(lidc_sample, tmp_path / "root")
    xml = tmp_path / "root" / "xml" / XML_0001
    xml.write_bytes(xml.read_bytes()[:20000])
    with pytest.raises(DataError, match=f"{XML_0001}: corrupt XML"):
        ingest_lidc(tmp_path / "root", tmp_path / "out")


def test_strict_refuses_xml_without_images(lidc_sample: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="LIDC-IDRI-0002_071.xml: no DICOM for series"):
        ingest_lidc(lidc_sample, tmp_path / "out", strict=True)


def test_root_without_xml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no LIDC CT XML"):
        ingest_lidc(tmp_path / "empty", tmp_path / "out")


def _disc(reader: int, cx: int, cy: int, r: int, zs: list[float], rating: int | None = 4) -> ReaderMark:
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).round().astype(np.int64)
    contours = [Contour(z, "", True, pts) for z in zs]
    chars = {"malignancy": rating} if rating else {}
    return ReaderMark(Path("x.xml"), reader, f"r{reader}", f"n{reader}-{cx}", rating, chars, contours)


def test_grouping_rule() -> None:
    sp = (0.7, 0.7)
    same = [_disc(0, 100, 100, 8, [0.0, 2.5]), _disc(1, 104, 101, 7, [2.5, 5.0]), _disc(2, 99, 98, 9, [0.0])]
    far = _disc(1, 300, 300, 6, [0.0])
    # Reader 0 marks two adjacent nodules: they must not merge into one (one mark per reader).
    twin = _disc(0, 112, 100, 4, [0.0])
    small = _disc(3, 100, 100, 0, [0.0], rating=None)  # < 3 mm mark: no rating, not grouped
    nodules = group_marks([*same, far, twin, small], sp)
    sizes = sorted(len(n.marks) for n in nodules)
    assert sizes == [1, 1, 3]
    big = max(nodules, key=lambda n: len(n.marks))
    assert {m.reader_index for m in big.marks} == {0, 1, 2}
    assert all(len({m.reader_index for m in n.marks}) == len(n.marks) for n in nodules)


def test_label_rule() -> None:
    assert malignancy_label(3.0) is None
    assert malignancy_label(3.25) == 1 and malignancy_label(2.75) == 0
    assert malignancy_class(4.75) == 5 and malignancy_class(2.5) == 3 and malignancy_class(1.2) == 1
