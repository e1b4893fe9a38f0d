"""Writers of the CT files a team brings (tests only): a manifest CSV, NIfTI volumes with HU scaling
in the header (nibabel) and DICOM CT slices with rescale tags (pydicom)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_manifest(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    """A manifest CSV of ``rows`` (columns: ``columns`` or every key in order of first use)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def write_nifti(path: Path, hu_zyx: np.ndarray, *, slope: float, inter: float, zooms: tuple[float, ...]) -> None:
    """Store HU ``(z, y, x)`` as int16 ``(x, y, z)`` with raw = (HU - inter) / slope in the header's scaling."""
    raw = np.round((hu_zyx.T - inter) / slope).astype(np.int16)
    img = cast(Any, nib.Nifti1Image)(raw, np.diag([*zooms, 1.0]))  # nibabel's API is untyped here
    header = cast(Any, img.header)
    header.set_zooms(zooms)
    header.set_slope_inter(slope, inter)
    header.set_xyzt_units("mm")
    nib.save(img, path)


def write_dicom(path: Path, hu: np.ndarray, *, z: float, spacing: float, slope: float, intercept: float,
           series_uid: str, patient: str, thickness: float = 1.5) -> None:
    """One CT slice: HU ``(rows, cols)`` stored as uint16 raw = (HU - intercept) / slope."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    ds.ImagePositionPatient = [-50.0, -60.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.round((hu - intercept) / slope).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
