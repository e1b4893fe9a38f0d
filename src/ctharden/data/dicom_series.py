"""DICOM CT series: find them under a folder, load one as a HU volume, cut resampled cubes.

A :class:`Volume` holds HU voxels ``(Z, Y, X)`` with slices sorted by ImagePositionPatient z
(file names are not in z order in LIDC), HU = stored value * RescaleSlope + RescaleIntercept, and
the geometry to map physical mm to voxel indices. Only axial series (ImageOrientationPatient
~ [1,0,0,0,1,0]) are supported; a slice gap (a missing DICOM file) or a duplicate slice is an
error naming the series folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from ctharden.core.errors import DataError

AIR_HU = -1024.0


def has_dicm_magic(path: Path) -> bool:
    """Whether ``path`` carries the DICOM ``DICM`` magic at byte 128 (False if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _looks_like_dicom(path: Path) -> bool:
    """``.dcm`` files, or files with the DICM magic at byte 128 (TCIA files sometimes lack a suffix)."""
    if path.suffix.lower() == ".dcm":
        return True
    return not path.suffix and has_dicm_magic(path)


def find_series(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Map SeriesInstanceUID -> its DICOM files under ``root`` (headers only; a bad file is an error)."""
    series: dict[str, list[Path]] = {}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file() or not _looks_like_dicom(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
            raise DataError(f"{path}: corrupt or unreadable DICOM ({exc})") from None
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise DataError(f"{path}: DICOM without SeriesInstanceUID")
        series.setdefault(str(uid), []).append(path)
    return series


@dataclass
class Volume:
    """A CT series in HU. ``hu`` is float32 ``(Z, Y, X)``; z ascending.

    ``z_mm`` are slice positions (mm), ``origin_xy`` the (x, y) mm position of pixel (col 0, row 0),
    ``spacing_xy`` the (column, row) pixel spacing in mm, ``sop_uids`` per slice.
    """

    hu: np.ndarray
    z_mm: np.ndarray
    origin_xy: tuple[float, float]
    spacing_xy: tuple[float, float]
    sop_uids: list[str]
    patient_id: str
    series_uid: str
    folder: Path

    @property
    def slice_spacing(self) -> float:
        return float(np.median(np.diff(self.z_mm))) if len(self.z_mm) > 1 else 1.0

    def z_covers(self, z0: float, z1: float) -> bool:
        """True if the physical z interval [z0, z1] lies within the acquired slices (half-slice margin)."""
        half = 0.5 * self.slice_spacing
        return bool(z0 >= self.z_mm[0] - half and z1 <= self.z_mm[-1] + half)

    def to_index(self, xyz_mm: np.ndarray) -> np.ndarray:
        """Map physical points ``(..., 3)`` (x, y, z mm) to fractional voxel indices ``(3, ...)`` (z, y, x)."""
        x, y, z = np.moveaxis(np.asarray(xyz_mm, dtype=np.float64), -1, 0)
        zi = np.interp(z, self.z_mm, np.arange(len(self.z_mm)), left=-1e9, right=1e9)
        yi = (y - self.origin_xy[1]) / self.spacing_xy[1]
        xi = (x - self.origin_xy[0]) / self.spacing_xy[0]
        return np.stack([zi, yi, xi])


def load_volume(files: Iterable[Path], *, gap_tolerance: float = 1.5) -> Volume:
    """Load one series into a :class:`Volume`; every problem names the offending file or folder."""
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError) as exc:
            raise DataError(f"{path}: corrupt or unreadable DICOM ({exc})") from None
        for tag in ("ImagePositionPatient", "PixelSpacing"):
            if tag not in ds:
                raise DataError(f"{path}: DICOM lacks {tag}")
        orient = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
        if not np.allclose(orient, [1, 0, 0, 0, 1, 0], atol=1e-3):
            raise DataError(f"{path}: non-axial ImageOrientationPatient {orient.tolist()} is not supported")
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        slices.append((float(ds.ImagePositionPatient[2]), ds, hu, path))
    if not slices:
        raise DataError("empty DICOM series")
    slices.sort(key=lambda s: s[0])
    first = slices[0][1]
    folder = slices[0][3].parent
    shape = slices[0][2].shape
    spacing = tuple(float(v) for v in first.PixelSpacing)  # (row spacing, column spacing)
    origin = (float(first.ImagePositionPatient[0]), float(first.ImagePositionPatient[1]))
    for _z, ds, hu, path in slices[1:]:
        if hu.shape != shape:
            raise DataError(f"{path}: slice shape {hu.shape} differs from {shape} in series {folder}")
        if not np.allclose([float(v) for v in ds.PixelSpacing], spacing, atol=1e-4):
            raise DataError(f"{path}: pixel spacing differs within series {folder}")
    z = np.array([s[0] for s in slices])
    if len(z) > 1:
        dz = np.diff(z)
        dup = np.nonzero(dz < 1e-3)[0]
        if dup.size:
            names = f"{slices[dup[0]][3].name} and {slices[dup[0] + 1][3].name}"
            raise DataError(f"{folder}: duplicate slice at z={z[dup[0]]:.2f} mm ({names})")
        step = float(np.median(dz))
        gaps = np.nonzero(dz > gap_tolerance * step)[0]
        if gaps.size:
            g = gaps[0]
            raise DataError(
                f"{folder}: missing DICOM slice(s) between z={z[g]:.2f} and z={z[g + 1]:.2f} mm "
                f"(spacing {step:.2f} mm, after {slices[g][3].name})"
            )
    return Volume(
        hu=np.stack([s[2] for s in slices]),
        z_mm=z,
        origin_xy=origin,
        spacing_xy=(spacing[1], spacing[0]),
        sop_uids=[str(s[1].get("SOPInstanceUID", "")) for s in slices],
        patient_id=str(first.get("PatientID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        folder=folder,
    )


def extract_cube(
    volume: Volume,
    center_xyz_mm: np.ndarray,
    *,
    size: int = 32,
    spacing_mm: float = 1.0,
    pad_hu: float = AIR_HU,
    hu_clip: tuple[float, float] = (-1024.0, 3071.0),
) -> np.ndarray:
    """Resample a ``size``³ cube of ``spacing_mm`` voxels centred on ``center_xyz_mm``; float32 HU ``(z, y, x)``.

    Resampling to the isotropic grid and cutting are one step: each target voxel centre
    ``c + (i - (size-1)/2) * spacing`` is mapped to the scan's voxel indices and sampled by trilinear
    interpolation, so the nodule centre sits exactly at the cube's geometric centre. Target voxels
    outside the scan are air (``pad_hu``). HU is clipped to ``hu_clip`` (CT's 12-bit range; some
    scanners store -2000/-3024 outside the reconstruction circle).
    """
    offsets = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    cz, cy, cx = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    pts = np.stack([cx + center_xyz_mm[0], cy + center_xyz_mm[1], cz + center_xyz_mm[2]], axis=-1)
    coords = volume.to_index(pts)
    src = np.clip(volume.hu, hu_clip[0], hu_clip[1])
    cube = ndimage.map_coordinates(src, coords, order=1, mode="constant", cval=pad_hu)
    clipped: np.ndarray = np.clip(cube, hu_clip[0], hu_clip[1]).astype(np.float32)
    return clipped
