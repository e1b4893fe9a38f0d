"""LIDC-IDRI ingestion: reader XML + DICOM series -> the paper's 32³ 1 mm nodule cubes.

Input: LIDC-IDRI as TCIA distributes it (one folder per patient with DICOM series and the reader
XML beside them) or any tree holding the same files; XMLs are paired with their series by
SeriesInstanceUID, so the folder layout does not matter.

Selection (shen et al. 2020, section 2.6), applied per nodule and counted at every step:
readers' >= 3 mm marks grouped into nodules (rule in :mod:`ctharden.data.lidc_xml`) ->
malignancy = mean of the readers' 1-5 ratings -> drop mean == 3 -> malignant if > 3, benign if < 3.
The 1-5 class (rounded mean) is kept for the five-class variant.

Each kept nodule whose series is present is cut as a 32³ cube at 1 mm (trilinear resampling,
air-padded at the scan edge) centred on the mean of the readers' contour centroids. A nodule whose
contours reach outside the available slices is skipped with a warning naming it; an XML whose
series is absent is counted (annotation funnel) but yields no cube, with a warning — or an error
under ``strict``.

``mode="2d"`` instead cuts one ``nodule2d`` patch per reader mark, on that reader's largest
contour slice (:mod:`ctharden.data.lidc_slices`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from ctharden.core.errors import DataError
from ctharden.data.dataset import DatasetWriter, read_info
from ctharden.data.dicom_series import Volume, extract_cube, find_series, load_volume
from ctharden.data.lidc_funnel import AnnotationFunnel
from ctharden.data.lidc_slices import ingest_lidc_slices
from ctharden.data.lidc_xml import (
    Nodule,
    ReadMessage,
    find_xml,
    group_marks,
    malignancy_class,
    parse_read_message,
)
from ctharden.data.patch2d import DEFAULT_SIZE, DEFAULT_SPACING_MM

log = logging.getLogger(__name__)

PAPER_COUNTS = {"nodules": 1226, "malignant": 431, "benign": 795}  # shen 2020, reference only
NOMINAL_PIXEL_SPACING_MM = 0.703125  # used only to group marks of XMLs whose DICOM is absent


@dataclass
class Funnel(AnnotationFunnel):
    """The annotation funnel plus the 3D mode's image counts (cubes cut, nodules outside the slices)."""

    skipped_outside_slices: int = 0
    cubes_malignant: int = 0
    cubes_benign: int = 0

    def as_dict(self, images: bool = True) -> dict[str, Any]:
        """All counts; ``images=False`` keeps only the annotation filters (XML-only counting)."""
        d = {k: v for k, v in super().as_dict().items() if k not in _IMAGE_FIELDS or images}
        if images:
            d["cubes"] = self.cubes_malignant + self.cubes_benign
        return d

_IMAGE_FIELDS = {
    "xml_without_images", "labelled_without_images", "skipped_outside_slices", "cubes_malignant", "cubes_benign",
}


def _nodule_row(nodule: Nodule, msg: ReadMessage, vol: Volume, center_mm: np.ndarray, root: Path) -> dict[str, Any]:
    ratings = nodule.ratings
    mean = nodule.malignancy_mean
    return {
        "patient_id": vol.patient_id or msg.patient_id,
        "source": "lidc",
        "series_uid": msg.series_uid,
        "study_uid": msg.study_uid,
        "malignancy_mean": round(mean, 4),
        "malignancy_class": malignancy_class(mean),
        "malignancy_median": float(np.median(ratings)),
        "ratings": ";".join(str(r) for r in ratings),
        "n_readers": len(nodule.marks),
        "reader_nodule_ids": ";".join(m.nodule_id for m in nodule.marks),
        "diameter_mm": round(nodule.diameter_mm, 2),
        "spacing_mm": 1.0,
        "center_x_mm": round(float(center_mm[0]), 3),
        "center_y_mm": round(float(center_mm[1]), 3),
        "center_z_mm": round(float(center_mm[2]), 3),
        "xml_file": str(msg.path.relative_to(root)),
    }


def count_lidc(root: str | os.PathLike[str], *, centroid_tol_mm: float = 5.0) -> dict[str, Any]:
    """Annotation funnel from the XML alone (no DICOM read): what a full LIDC copy yields per filter.

    Marks are grouped in physical units with the nominal LIDC pixel spacing (0.703 mm), since the
    series geometry is not read; :func:`ingest_lidc` uses each series' real spacing.
    """
    root = Path(root)
    xmls, other = find_xml(root)
    if not xmls:
        raise DataError(f"{root}: no LIDC CT XML (LidcReadMessage) found")
    funnel = Funnel(xml_files_not_ct=other)
    for path in xmls:
        msg = parse_read_message(path)
        funnel.add_message(msg)
        spacing = (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)
        for nod in group_marks(msg.marks, spacing, centroid_tol_mm):
            funnel.add_nodule(nod)
    return {"root": str(root), "funnel": funnel.as_dict(images=False), "paper_reference": PAPER_COUNTS}


def ingest_lidc(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    mode: Literal["3d", "2d"] = "3d",
    cube_size: int = 32,
    spacing_mm: float | None = None,
    size: int = DEFAULT_SIZE,
    centroid_tol_mm: float = 5.0,
    strict: bool = False,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Ingest an LIDC-IDRI tree into a dataset at ``out``; return the report (funnel, skips).

    ``mode="3d"``: ``nodule3d``, ``cube_size``³ cubes of ``spacing_mm`` (default 1.0) mm voxels.
    ``mode="2d"``: ``nodule2d``, ``size`` × ``size`` patches of ``spacing_mm`` (default 0.7) mm
    pixels, one per reader mark (:func:`ctharden.data.lidc_slices.ingest_lidc_slices`); ``cube_size``
    is unused there, as ``size`` is in 3D.
    """
    if mode == "2d":
        return ingest_lidc_slices(
            root, out, spacing_mm=DEFAULT_SPACING_MM if spacing_mm is None else spacing_mm, size=size,
            centroid_tol_mm=centroid_tol_mm, strict=strict, test_fraction=test_fraction, n_folds=n_folds, seed=seed,
        )
    if mode != "3d":
        raise DataError(f"LIDC mode must be '3d' or '2d', got {mode!r}")
    spacing_mm = 1.0 if spacing_mm is None else spacing_mm
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise DataError(f"{root}: LIDC root is not a directory")
    xmls, other = find_xml(root)
    if not xmls:
        raise DataError(f"{root}: no LIDC CT XML (LidcReadMessage) found")
    series = find_series(root)
    funnel = Funnel(xml_files_not_ct=other)
    skipped: list[dict[str, str]] = []
    used_series: set[str] = set()
    provenance = {
        "source": "LIDC-IDRI (TCIA, CC BY 3.0; Armato et al. 2011, doi:10.7937/K9/TCIA.2015.LO9QL9SX)",
        "root": str(root),
        "cube_size": cube_size,
        "spacing_mm": spacing_mm,
        "interpolation": "trilinear",
        "grouping": f"contour overlap or centroid distance <= {centroid_tol_mm} mm, one mark per reader",
    }
    with DatasetWriter(
        out, "nodule3d", shape=(cube_size,) * 3, provenance=provenance,
        test_fraction=test_fraction, n_folds=n_folds, seed=seed,
    ) as writer:
        for path in tqdm(xmls, desc="LIDC series", unit="xml", disable=None):
            msg = parse_read_message(path)
            funnel.add_message(msg)
            files = series.get(msg.series_uid)
            vol = load_volume(files) if files else None
            spacing = vol.spacing_xy if vol else (NOMINAL_PIXEL_SPACING_MM, NOMINAL_PIXEL_SPACING_MM)
            nodules = group_marks(msg.marks, spacing, centroid_tol_mm)
            if vol is None:
                funnel.xml_without_images += 1
                why = f"{path}: no DICOM for series {msg.series_uid} under {root}"
                if strict:
                    raise DataError(why)
                log.warning("%s; its %d nodule(s) are counted but not extracted", why, len(nodules))
            else:
                used_series.add(msg.series_uid)
            for k, nod in enumerate(nodules):
                label = funnel.add_nodule(nod)
                if label is None:
                    continue
                if vol is None:
                    funnel.labelled_without_images += 1
                    continue
                z0, z1 = nod.z_range
                if not vol.z_covers(z0, z1):
                    funnel.skipped_outside_slices += 1
                    why = (
                        f"{msg.patient_id} {nod.describe()} lies outside the available slices "
                        f"z {vol.z_mm[0]:.1f}..{vol.z_mm[-1]:.1f} mm of {vol.folder}"
                    )
                    log.warning("skipped %s", why)
                    skipped.append({"nodule": nod.describe(), "xml": str(path), "reason": why})
                    continue
                col, row, z = nod.centroid
                center = np.array(
                    [vol.origin_xy[0] + col * vol.spacing_xy[0], vol.origin_xy[1] + row * vol.spacing_xy[1], z]
                )
                cube = extract_cube(vol, center, size=cube_size, spacing_mm=spacing_mm)
                row_ = _nodule_row(nod, msg, vol, center, root)
                pid = row_["patient_id"]
                row_.update(sample_id=f"{pid}-{msg.series_uid[-6:]}-n{k:02d}", label=label)
                writer.add(row_, cube)
                if label == 1:
                    funnel.cubes_malignant += 1
                else:
                    funnel.cubes_benign += 1
        if len(writer) == 0:
            raise DataError(
                f"{root}: no nodule cube could be extracted "
                f"({funnel.labelled_without_images} labelled nodules lack images, "
                f"{funnel.skipped_outside_slices} lie outside the slices)"
            )
    unpaired = sorted(set(series) - used_series)
    for uid in unpaired:
        log.warning("DICOM series %s under %s has no LIDC XML; ignored", uid, root)
    info = read_info(out)
    return {
        "root": str(root),
        "out": str(out),
        "funnel": funnel.as_dict(),
        "paper_reference": PAPER_COUNTS,
        "skipped": skipped,
        "series_without_xml": unpaired,
        "n_samples": info["n_samples"],
        "content_hash": info["content_hash"],
    }
