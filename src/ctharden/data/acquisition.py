"""Acquisition columns of a CT slice, and the tube current-time product the dose levels mean.

The papers' dose levels (shen 2020: 10-500 mAs; its NPS is scaled from a 120 kVp, 250 mAs
reference, Dolly et al. 2016) are the **tube current-time product per rotation**: tube current
(mA) × rotation (exposure) time (s). Noise variance scales as 1/mAs at fixed kVp, kernel and pitch.

DICOM holds three related fields, and they do not mean the same across vendors (checked on the
659 LIDC-IDRI slices whose header ships with the nodule crops):

============================  ===============================================================
field                         meaning found
============================  ===============================================================
X-Ray Tube Current (0018,1151)  mA, every vendor
Exposure Time (0018,1150)       ms per rotation (GE, Siemens, Toshiba); absent on Philips
Exposure (0018,1152)            Toshiba: mA × time (mAs per rotation). Siemens: *effective* mAs
                                = mA × time / pitch (ratio 1.0-1.7 to mA × time). Philips: its
                                "mAs/slice" (effective, no exposure time to check it). GE: not
                                a per-rotation figure at all (LightSpeed Plus/QX/i ≈ 20 × mA ×
                                time, e.g. 4684 for 400 mA × 570 ms = 228 mAs; LightSpeed16/VCT
                                6-32 for 170-350 mAs)
============================  ===============================================================

So ctharden's ``mas`` column is ``tube_current_ma × exposure_time_ms / 1000`` where both are
known (``mas_source = "current_x_time"``), and unknown (NaN, ``mas_source = "unknown"``) otherwise:
the vendor ``Exposure`` value is kept as ``exposure_dicom`` for reference but never used as the
dose, since on two of four vendors it is not the per-rotation product and on GE not a dose at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Manifest columns written for every sample (NaN / "" where the header is unknown).
ACQUISITION_COLUMNS: tuple[str, ...] = (
    "kvp", "tube_current_ma", "exposure_time_ms", "exposure_dicom", "mas", "mas_source",
    "kernel", "manufacturer", "model_name", "slice_thickness_mm",
)


def _num(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def mas_per_rotation(tube_current_ma: float, exposure_time_ms: float) -> float:
    """Tube current-time product per rotation in mAs; NaN unless both are known and positive."""
    if tube_current_ma > 0 and exposure_time_ms > 0:
        return tube_current_ma * exposure_time_ms / 1000.0
    return math.nan


def acquisition_columns(
    *, kvp: Any = None, tube_current_ma: Any = None, exposure_time_ms: Any = None, exposure: Any = None,
    kernel: Any = None, manufacturer: Any = None, model_name: Any = None, slice_thickness_mm: Any = None,
) -> dict[str, Any]:
    """The :data:`ACQUISITION_COLUMNS` of one slice from raw header values (missing: None/NaN/'')."""
    ma, ms = _num(tube_current_ma), _num(exposure_time_ms)
    mas = mas_per_rotation(ma, ms)
    return {
        "kvp": _num(kvp), "tube_current_ma": ma, "exposure_time_ms": ms, "exposure_dicom": _num(exposure),
        "mas": round(mas, 3) if math.isfinite(mas) else math.nan,
        "mas_source": "current_x_time" if math.isfinite(mas) else "unknown",
        "kernel": _text(kernel), "manufacturer": _text(manufacturer), "model_name": _text(model_name),
        "slice_thickness_mm": _num(slice_thickness_mm),
    }


def acquisition_from_dicom(ds: Any) -> dict[str, Any]:
    """:func:`acquisition_columns` of a pydicom dataset (absent tags are unknown)."""
    def get(name: str) -> Any:
        return getattr(ds, name, None)

    return acquisition_columns(
        kvp=get("KVP"), tube_current_ma=get("XRayTubeCurrent"), exposure_time_ms=get("ExposureTime"),
        exposure=get("Exposure"), kernel=get("ConvolutionKernel"), manufacturer=get("Manufacturer"),
        model_name=get("ManufacturerModelName"), slice_thickness_mm=get("SliceThickness"),
    )


def acquisition_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`acquisition_columns` of an LIDC release ``annotations.csv`` row (its header column names)."""
    return acquisition_columns(
        kvp=row.get("KVP"), tube_current_ma=row.get("X-Ray Tube Current"), exposure_time_ms=row.get("Exposure Time"),
        exposure=row.get("Exposure"), kernel=row.get("Convolution Kernel"), manufacturer=row.get("Manufacturer"),
        model_name=row.get("Manufacturer's Model Name"), slice_thickness_mm=row.get("Slice Thickness"),
    )
