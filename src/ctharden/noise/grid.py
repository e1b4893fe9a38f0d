"""Frequency grids and argument checks shared by the noise modules.

Conventions (all of :mod:`ctharden.noise`):

- An image or noise tensor has shape ``(..., H, W)``: the last two axes are one axial slice, ``H``
  rows along y and ``W`` columns along x. Leading axes (batch, channel, z, ...) are independent
  slices.
- ``spacing_mm`` is the in-plane pixel size in mm: a float (square pixels) or ``(dy, dx)``.
- Spatial frequencies are in cycles per mm (mm⁻¹), laid out like :func:`torch.fft.fftfreq`
  (full grid, for ``fft2``) or :func:`torch.fft.rfftfreq` on the last axis (half grid, for
  ``rfft2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from ctharden.core.errors import ConfigError

Spacing = float | Sequence[float]


def as_spacing(spacing_mm: Spacing) -> tuple[float, float]:
    """``spacing_mm`` (float or ``(dy, dx)``, mm) -> ``(dy, dx)``; ConfigError if not positive/finite."""
    if isinstance(spacing_mm, torch.Tensor):
        spacing_mm = spacing_mm.tolist()
    if isinstance(spacing_mm, (int, float)) or getattr(spacing_mm, "ndim", None) == 0:
        dy = dx = float(spacing_mm)  # type: ignore[arg-type]
    else:
        try:
            dy, dx = (float(s) for s in spacing_mm)
        except (TypeError, ValueError):
            raise ConfigError(f"spacing_mm must be a float or (dy, dx) in mm, got {spacing_mm!r}") from None
    if not (math.isfinite(dy) and math.isfinite(dx) and dy > 0 and dx > 0):
        raise ConfigError(f"spacing_mm must be positive and finite, got {(dy, dx)!r}")
    return dy, dx


def as_image_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Check ``shape`` = ``(..., H, W)`` with H, W >= 2; return it as a tuple of ints."""
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be a sequence of ints (..., H, W), got {shape!r}") from None
    if len(out) < 2 or out[-1] < 2 or out[-2] < 2 or any(s < 0 for s in out):
        raise ConfigError(f"shape must be (..., H, W) with H, W >= 2, got {out!r}")
    return out


@lru_cache(maxsize=64)
def _radial_cached(
    h: int, w: int, dy: float, dx: float, half: bool, device: torch.device
) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, d=dy, dtype=torch.float64)
    freq_x = torch.fft.rfftfreq if half else torch.fft.fftfreq
    fx = freq_x(w, d=dx, dtype=torch.float64)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).to(device)


def radial_frequency(
    hw: tuple[int, int],
    spacing_mm: Spacing,
    *,
    half: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radial spatial frequency ``|f| = sqrt(fy² + fx²)`` in mm⁻¹ on the DFT grid of an ``H×W`` slice.

    Args:
        hw: ``(H, W)`` pixels.
        spacing_mm: pixel size, float or ``(dy, dx)`` in mm.
        half: ``False``: full ``(H, W)`` grid in ``fft2`` order; ``True``: the ``(H, W//2+1)``
            grid of ``rfft2``.
        device: where to put the result (default CPU).

    Returns:
        float64 tensor ``(H, W)`` or ``(H, W//2+1)`` (read-only use: it is cached).
    """
    dy, dx = as_spacing(spacing_mm)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _radial_cached(int(hw[0]), int(hw[1]), dy, dx, bool(half), dev)


def rfft_weights(w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """How many full-grid coefficients each ``rfft2`` column stands for: ``(W//2+1,)`` float64.

    Column 0 (and column W/2 for even W) is its own Hermitian mirror (weight 1); every other
    column also represents its conjugate at ``-fx`` (weight 2). Sums over the half grid weighted
    this way equal sums over the full ``fft2`` grid.
    """
    wr = w // 2 + 1
    weights = torch.full((wr,), 2.0, dtype=torch.float64, device=device)
    weights[0] = 1.0
    if w % 2 == 0:
        weights[-1] = 1.0
    return weights


def as_mas(
    mas: float | torch.Tensor, lead_shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``mas`` (float or tensor broadcastable to ``lead_shape``) -> float64 tensor ``lead_shape + (1, 1)``.

    ConfigError if any value is not positive and finite or it does not broadcast to ``lead_shape``.
    """
    m = torch.as_tensor(mas, dtype=torch.float64).to(device)
    if not bool(torch.isfinite(m).all()) or not bool((m > 0).all()):
        raise ConfigError(f"mAs must be positive and finite, got {m.tolist()!r}")
    try:
        # torch.broadcast_shapes has no annotations
        if torch.broadcast_shapes(m.shape, lead_shape) != torch.Size(lead_shape):  # type: ignore[no-untyped-call]
            raise RuntimeError
    except RuntimeError:
        raise ConfigError(
            f"mAs of shape {tuple(m.shape)} does not broadcast to the leading shape {lead_shape} "
            "(one mAs per sample/slice; the last two axes are the slice)"
        ) from None
    return m.expand(lead_shape)[..., None, None]
