"""Resample a 2D CT patch to a fixed pixel spacing around a centre (the ``nodule2d`` crops).

Scanners reconstruct at 0.46-0.98 mm per pixel (LIDC-IDRI), so the same nodule spans a different
number of pixels in different scans. Every ``nodule2d`` sample is therefore resampled to one
spacing (``out_spacing_mm``, default 0.7 mm: the median LIDC-IDRI pixel spacing, 0.703 mm) on a
``size`` × ``size`` grid centred on the nodule, so one pixel is the same physical length in every
sample and the NPS noise is generated at that spacing.

Interpolation is bilinear (``scipy.ndimage.map_coordinates``, order 1) in HU; grid points that fall
outside the source image read ``pad_hu`` (air) and are counted, so a caller can tell how much of a
patch was invented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import map_coordinates

AIR_HU = -1024.0
DEFAULT_SPACING_MM = 0.7
DEFAULT_SIZE = 45  # 45 x 0.7 mm = 31.5 mm: inside every 71-pixel LIDC release crop (>= 32.7 mm)


@dataclass(frozen=True)
class Patch:
    """A resampled patch: ``image`` ``(size, size)`` float32 HU and how many of its pixels were padded."""

    image: np.ndarray
    padded_px: int


def resample_patch(
    image_hu: np.ndarray,
    spacing_mm: float,
    center_rc: tuple[float, float],
    *,
    out_spacing_mm: float = DEFAULT_SPACING_MM,
    size: int = DEFAULT_SIZE,
    pad_hu: float = AIR_HU,
) -> Patch:
    """Cut a ``size`` × ``size`` patch at ``out_spacing_mm`` centred on ``center_rc``.

    Args:
        image_hu: ``(H, W)`` source image in HU with square pixels of ``spacing_mm`` mm.
        spacing_mm: source pixel size in mm.
        center_rc: patch centre as (row, col) in source pixel indices (fractions allowed).
        out_spacing_mm: output pixel size in mm.
        size: output side in pixels; the centre lies at output index ``(size - 1) / 2``.
        pad_hu: value of output pixels outside the source image.

    Returns:
        :class:`Patch` with the ``(size, size)`` float32 image.
    """
    if image_hu.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image_hu.shape}")
    if not (spacing_mm > 0 and out_spacing_mm > 0 and size >= 1):
        raise ValueError(f"need spacing_mm > 0, out_spacing_mm > 0, size >= 1; got {spacing_mm}, "
                         f"{out_spacing_mm}, {size}")
    offsets = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * (out_spacing_mm / spacing_mm)
    rows = center_rc[0] + offsets[:, None] + np.zeros((1, size))
    cols = center_rc[1] + offsets[None, :] + np.zeros((size, 1))
    h, w = image_hu.shape
    outside = (rows < 0) | (rows > h - 1) | (cols < 0) | (cols > w - 1)
    out = map_coordinates(np.asarray(image_hu, dtype=np.float64), [rows, cols], order=1, mode="constant",
                          cval=pad_hu)
    return Patch(out.astype(np.float32), int(outside.sum()))
