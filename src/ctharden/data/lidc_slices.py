"""LIDC-IDRI 2D mode: reader XML + DICOM series -> one ``nodule2d`` patch per reader mark.

Input: LIDC-IDRI as TCIA distributes it (DICOM series and their reader XML, any folder layout;
XMLs are paired with series by SeriesInstanceUID), as for :func:`ctharden.data.lidc.ingest_lidc`,
which dispatches here with ``mode="2d"``.

Selection, counted at every step in the report's funnel:

1. Readers' >= 3 mm marks (those with a malignancy rating) are grouped into physical nodules with
   :func:`ctharden.data.lidc_xml.group_marks`, exactly as the 3D mode does (the series' real pixel
   spacing; the nominal 0.703 mm where the DICOM is absent).
2. Label per nodule from the mean of *all* its readers' 1-5 ratings
   (:func:`~ctharden.data.lidc_xml.malignancy_label`): mean == 3 dropped, > 3 malignant, < 3
   benign. Every mark of a labelled nodule becomes one sample carrying the nodule's mean, its
   rounded 1-5 class and the reader's own rating.
3. Slice: the axial slice where that reader's filled contour (:meth:`ReaderMark.masks`) has the
   most pixels; a tie goes to the first, i.e. lowest, z. The slice is found in the series by the
   contour's ``imageSOP_UID``, else by ``imageZposition`` (within ``Z_TOL_MM``); a mark whose
   slice is not in the series is skipped with a warning (the rule picks no other slice).
4. Centre: the centroid of that slice's filled mask, the mean (row, col) of its pixels. (The
   ``lidc_maxslice`` release centres its crops on the contour's bounding-box centre instead: on
   LIDC-IDRI-0001 the two lie 3.6 px = 2.5 mm apart; tests/test_lidc_slices.py measures it.)
5. Image: the slice's stored values × RescaleSlope + RescaleIntercept (HU, ``hu_source =
   "dicom_rescale"``), resampled to ``spacing_mm`` on a ``size`` × ``size`` grid around the centre
   (:func:`ctharden.data.patch2d.resample_patch`, bilinear, air outside the image), then clipped to
   [-1024, 3071] HU (:func:`ctharden.data.lidc2d.clip_hu`).
6. Acquisition columns from that slice's header (:func:`ctharden.data.acquisition.acquisition_from_dicom`).

Splits are grouped by patient and stratified by label (:class:`~ctharden.data.dataset.DatasetWriter`):
the up to four samples of one nodule share a split.

The manifest mirrors :func:`ctharden.data.lidc2d.ingest_lidc2d` (the release of pre-cut crops) and
adds ``sop_uid``, ``center_row``/``center_col`` (the centre in source pixel indices), ``area_px``
(filled-contour pixels on the slice; ``equiv_diameter_mm`` = sqrt(4 area / pi) × source spacing),
``nodule_index`` (the nodule's position in the XML's grouped nodules) and ``xml_file``.
``reader_id`` is the reader's 1-based ``readingSession`` position in the XML: the release's
``RadiologistID`` (its ``Malignancy_1..4`` are the ratings in the same order); the XML's anonymised
``servicingRadiologistID`` is kept as ``reader_xml_id``.

Only the headers of a series are read to index it; the pixels of the chosen slices alone are
decoded (a slice missing elsewhere in the series does not matter in 2D).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from ctharden.core.errors import DataError
from ctharden.data.acquisition import acquisition_from_dicom
from ctharden.data.dataset import DatasetWriter, read_info
from ctharden.data.dicom_series import find_series
from ctharden.data.lidc2d import clip_hu
from ctharden.data.lidc_funnel import AnnotationFunnel
from ctharden.data.lidc_xml import (
    Z_TOL_MM,
    Nodule,
    ReaderMark,
    find_xml,
    group_marks,
    malignancy_class,
    parse_read_message,
)
from ctharden.data.patch2d import DEFAULT_SIZE, DEFAULT_SPACING_MM, resample_patch

log = logging.getLogger(__name__)

NOMINAL_PIXEL_SPACING_MM = 0.703125  # as ctharden.data.lidc: groups the marks of XMLs whose DICOM is absent
SPACING_TOL_MM = 1e-4  # row and column spacing must agree (resample_patch assumes square pixels)
ATTRIBUTION = "LIDC-IDRI (TCIA, CC BY 3.0; Armato et al. 2011, doi:10.7937/K9/TCIA.2015.LO9QL9SX)"


@dataclass
class SliceFunnel(AnnotationFunnel):
    """The annotation funnel (nodule counts, as in the 3D mode) plus the per-mark counts of the 2D
    mode (``marks_*``, ``samples_*``)."""

    marks_dropped_mean_eq_3: int = 0
    marks_labelled: int = 0
    marks_without_images: int = 0
    skipped_outside_slices: int = 0
    samples_malignant: int = 0
    samples_benign: int = 0

    def add_nodule(self, nodule: Nodule) -> int | None:
        """Count one grouped nodule and its marks; return its label (None: mean == 3, dropped)."""
        label = super().add_nodule(nodule)
        if label is None:
            self.marks_dropped_mean_eq_3 += len(nodule.marks)
        else:
            self.marks_labelled += len(nodule.marks)
        return label

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d["samples"] = self.samples_malignant + self.samples_benign
        return d


@dataclass(frozen=True)
class MaxSlice:
    """A reader's largest-area slice: ``z_mm``, the contour's SOP UID, the filled-mask area (pixels)
    and its centroid ``center_rc`` (row, col) in pixel indices of the DICOM image."""

    z_mm: float
    sop_uid: str
    area_px: int
    center_rc: tuple[float, float]


def max_slice(mark: ReaderMark) -> MaxSlice:
    """The slice where ``mark``'s filled contour has the most pixels (ties: the lowest z), and the
    mean (row, col) of that mask's pixels; :class:`DataError` if every contour is empty."""
    masks = mark.masks()
    areas = {z: int(m[2].sum()) for z, m in masks.items()}
    z = min(areas, key=lambda k: (-areas[k], k))
    if areas[z] == 0:
        raise DataError(f"{mark.xml_path}: nodule {mark.nodule_id!r} of reader {mark.reader_index + 1} "
                        "has empty contours on every slice")
    col0, row0, mask = masks[z]
    rows, cols = np.nonzero(mask)
    on_z = sorted((c for c in mark.contours if round(c.z_mm, 2) == z), key=lambda c: (not c.inclusion, not c.sop_uid))
    return MaxSlice(on_z[0].z_mm, on_z[0].sop_uid, areas[z], (row0 + float(rows.mean()), col0 + float(cols.mean())))


@dataclass
class SeriesIndex:
    """The slices of one DICOM series from their headers: ``paths``, ``z_mm`` (ImagePositionPatient
    z, mm), ``sop_uids``, the (column, row) pixel spacing ``spacing_xy`` (mm) and ``patient_id``."""

    paths: list[Path]
    z_mm: np.ndarray
    sop_uids: list[str]
    spacing_xy: tuple[float, float]
    patient_id: str

    @classmethod
    def read(cls, files: list[Path]) -> SeriesIndex:
        """Index ``files`` (headers only); a file without position or spacing is a :class:`DataError`."""
        rows = []
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
                raise DataError(f"{path}: corrupt or unreadable DICOM ({exc})") from None
            for tag in ("ImagePositionPatient", "PixelSpacing"):
                if tag not in ds:
                    raise DataError(f"{path}: DICOM lacks {tag}")
            rows.append((float(ds.ImagePositionPatient[2]), str(ds.get("SOPInstanceUID", "")), path, ds))
        if not rows:
            raise DataError("empty DICOM series")
        rows.sort(key=lambda r: r[0])
        first = rows[0][3]
        spacing = [float(v) for v in first.PixelSpacing]  # (row spacing, column spacing)
        return cls([r[2] for r in rows], np.array([r[0] for r in rows]), [r[1] for r in rows],
                   (spacing[1], spacing[0]), str(first.get("PatientID", "")))

    @property
    def folder(self) -> Path:
        return self.paths[0].parent

    def find(self, z_mm: float, sop_uid: str) -> int | None:
        """Index of the slice with ``sop_uid``, else of the one at ``z_mm`` (within ``Z_TOL_MM``), else None.

        Two files at that z (and no SOP UID match) are a :class:`DataError` naming both."""
        if sop_uid and sop_uid in self.sop_uids:
            i = self.sop_uids.index(sop_uid)
            if abs(self.z_mm[i] - z_mm) > Z_TOL_MM:
                log.warning("%s: slice %s is at z=%.3f mm but the XML contour says %.3f mm; the SOP UID is used",
                            self.paths[i], sop_uid, self.z_mm[i], z_mm)
            return i
        hits = np.flatnonzero(np.abs(self.z_mm - z_mm) <= Z_TOL_MM)
        if hits.size > 1:
            names = ", ".join(self.paths[i].name for i in hits)
            raise DataError(f"{self.folder}: {hits.size} slices at z={z_mm:.2f} mm ({names})")
        return int(hits[0]) if hits.size else None


@dataclass(frozen=True)
class HuSlice:
    """One decoded slice: ``hu`` ``(H, W)`` float64 HU, square pixel ``spacing_mm``, rescale tags, header."""

    hu: np.ndarray
    spacing_mm: float
    slope: float
    intercept: float
    header: Any


def read_hu_slice(path: Path) -> HuSlice:
    """Decode one axial CT slice as HU (stored × RescaleSlope + RescaleIntercept); every problem names ``path``."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError) as exc:
        raise DataError(f"{path}: corrupt or unreadable DICOM ({exc})") from None
    if pixels.ndim != 2:
        raise DataError(f"{path}: pixel data of shape {pixels.shape} is not one 2-D slice")
    orient = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    if not np.allclose(orient, [1, 0, 0, 0, 1, 0], atol=1e-3):
        raise DataError(f"{path}: non-axial ImageOrientationPatient {orient.tolist()} is not supported")
    row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
    if abs(row_sp - col_sp) > SPACING_TOL_MM:
        raise DataError(f"{path}: non-square pixels {row_sp} x {col_sp} mm are not supported")
    if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
        raise DataError(f"{path}: CT slice lacks RescaleSlope/RescaleIntercept, so its HU are unknown")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    hu = pixels.astype(np.float64) * slope + intercept
    return HuSlice(hu, col_sp, slope, intercept, ds)


def ingest_lidc_slices(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    spacing_mm: float = DEFAULT_SPACING_MM,
    size: int = DEFAULT_SIZE,
    centroid_tol_mm: float = 5.0,
    strict: bool = False,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Ingest an LIDC-IDRI tree into a ``nodule2d`` dataset at ``out``: one ``(size, size)`` float32
    HU patch at ``spacing_mm`` mm per reader mark of a labelled nodule (rules in the module docstring).

    ``strict``: an XML whose DICOM series is absent is an error (else counted and warned about).
    Returns the report: ``funnel`` (:class:`SliceFunnel`), ``skipped`` (mark, xml, reason),
    ``series_without_xml``, ``n_samples``, ``n_patients``, ``content_hash``.
    """
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{root}: LIDC root is not a directory")
    xmls, other = find_xml(root)
    if not xmls:
        raise DataError(f"{root}: no LIDC CT XML (LidcReadMessage) found")
    series = find_series(root)
    funnel = SliceFunnel(xml_files_not_ct=other)
    skipped: list[dict[str, str]] = []
    used_series: set[str] = set()
    patients: set[str] = set()
    provenance = {
        "source": ATTRIBUTION, "root": str(root), "mode": "2d", "spacing_mm": spacing_mm, "size": size,
        "interpolation": "bilinear",
        "slice": "each reader's largest filled-contour slice (ties: lowest z), centred on that mask's centroid",
        "label": "mean of all readers' ratings of the grouped nodule: > 3 malignant, < 3 benign, == 3 dropped",
        "grouping": f"contour overlap or centroid distance <= {centroid_tol_mm} mm, one mark per reader",
        "hu": "stored value x RescaleSlope + RescaleIntercept of the slice",
    }
    with DatasetWriter(out, "nodule2d", shape=(size, size), provenance=provenance,
                       test_fraction=test_fraction, n_folds=n_folds, seed=seed) as writer:
        for path in tqdm(xmls, desc="LIDC series (2D)", unit="xml", disable=None):
            msg = parse_read_message(path)
            funnel.add_message(msg)
            files = series.get(msg.series_uid)
            index = SeriesIndex.read(files) if files else None
            spacing = index.spacing_xy if index else (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)
            nodules = group_marks(msg.marks, spacing, centroid_tol_mm)
            if index is None:
                funnel.xml_without_images += 1
                why = f"{path}: no DICOM for series {msg.series_uid} under {root}"
                if strict:
                    raise DataError(why)
                log.warning("%s; its %d nodule(s) are counted but not extracted", why, len(nodules))
            else:
                used_series.add(msg.series_uid)
            cache: dict[int, HuSlice] = {}
            for k, nod in enumerate(nodules):
                label = funnel.add_nodule(nod)
                if label is None:
                    continue
                if index is None:
                    funnel.labelled_without_images += 1
                    funnel.marks_without_images += len(nod.marks)
                    continue
                mean = nod.malignancy_mean
                for mark in nod.marks:
                    best = max_slice(mark)
                    i = index.find(best.z_mm, best.sop_uid)
                    reader = mark.reader_index + 1
                    if i is None:
                        funnel.skipped_outside_slices += 1
                        why = (f"{msg.patient_id} reader {reader} mark {mark.nodule_id!r}: its largest slice "
                               f"z={best.z_mm:.2f} mm is not among the slices z {index.z_mm[0]:.1f}.."
                               f"{index.z_mm[-1]:.1f} mm of {index.folder}")
                        log.warning("skipped %s", why)
                        skipped.append({"mark": f"reader {reader}:{mark.nodule_id}", "xml": str(path),
                                        "reason": why})
                        continue
                    if i not in cache:
                        cache[i] = read_hu_slice(index.paths[i])
                    sl = cache[i]
                    patch = resample_patch(sl.hu, sl.spacing_mm, best.center_rc, out_spacing_mm=spacing_mm, size=size)
                    image, clipped = clip_hu(patch.image)
                    pid = index.patient_id or msg.patient_id
                    patients.add(pid)
                    writer.add({
                        "sample_id": f"{pid}-{msg.series_uid[-6:]}-n{k:02d}-r{reader}",
                        "label": label, "patient_id": pid, "source": "lidc",
                        "series_uid": msg.series_uid, "study_uid": msg.study_uid, "sop_uid": index.sop_uids[i],
                        "nodule_index": k, "reader_id": reader, "reader_xml_id": mark.reader_id,
                        "reader_nodule_id": mark.nodule_id, "reader_rating": mark.malignancy,
                        "ratings": ";".join(str(r) for r in nod.ratings), "n_readers": len(nod.marks),
                        "malignancy_mean": round(mean, 4), "malignancy_class": malignancy_class(mean),
                        "z_mm": float(index.z_mm[i]), "center_row": best.center_rc[0],
                        "center_col": best.center_rc[1], "area_px": best.area_px,
                        "equiv_diameter_mm": round(math.sqrt(4.0 * best.area_px / math.pi) * sl.spacing_mm, 3),
                        "spacing_mm": spacing_mm, "source_spacing_mm": sl.spacing_mm,
                        "padded_px": patch.padded_px, "clipped_px": clipped,
                        "hu_source": "dicom_rescale", "rescale_slope": sl.slope, "rescale_intercept": sl.intercept,
                        **acquisition_from_dicom(sl.header),
                        "xml_file": str(path.relative_to(root)),
                    }, image)
                    if label == 1:
                        funnel.samples_malignant += 1
                    else:
                        funnel.samples_benign += 1
        if len(writer) == 0:
            raise DataError(
                f"{root}: no nodule patch could be extracted ({funnel.marks_without_images} labelled marks lack "
                f"images, {funnel.skipped_outside_slices} have their largest slice outside the series)"
            )
    unpaired = sorted(set(series) - used_series)
    for uid in unpaired:
        log.warning("DICOM series %s under %s has no LIDC XML; ignored", uid, root)
    info = read_info(out)
    return {
        "root": str(root), "out": str(out), "mode": "2d", "funnel": funnel.as_dict(), "skipped": skipped,
        "series_without_xml": unpaired, "n_samples": info["n_samples"], "n_patients": len(patients),
        "spacing_mm": spacing_mm, "size": size, "content_hash": info["content_hash"],
    }
