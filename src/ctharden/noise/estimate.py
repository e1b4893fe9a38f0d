"""NPS estimation from noise realisations (Shen et al. 2020, eq. A.1) and radial averaging.

    S(fx, fy) = (Δx·Δy)/(Nx·Ny) · ⟨ |F[p - mean(p)](fx, fy)|² ⟩

with ``F`` the unnormalised DFT (``torch.fft.fft2``) and ⟨·⟩ the average over all realisations
(every leading index of a ``(..., H, W)`` array is one realisation = one axial slice). The 2D
estimate is then averaged over annuli of width ``Δf = max(1/(Nx·Δx), 1/(Ny·Δy))`` centred on
``k·Δf`` to give the radial NPS.
"""

from __future__ import annotations

import numpy as np
import torch

from ctharden.core.errors import ConfigError
from ctharden.noise.grid import Spacing, as_spacing, radial_frequency

_CHUNK_ELEMENTS = 1 << 22  # pixels per FFT chunk: bounds memory for many realisations


def estimate_nps_2d(noise: torch.Tensor, spacing_mm: Spacing) -> torch.Tensor:
    """2D NPS estimate (eq. A.1) in HU²·mm²: float64 ``(H, W)`` in ``fft2`` order.

    Args:
        noise: ``(..., H, W)`` noise realisations in HU (each slice one realisation; at least one).
        spacing_mm: pixel size, float or ``(dy, dx)`` mm.
    """
    dy, dx = as_spacing(spacing_mm)
    x = torch.as_tensor(noise)
    if x.dim() < 2 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ConfigError(f"noise must be (..., H, W) with H, W >= 2, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    x = x.reshape(-1, h, w)
    n = x.shape[0]
    if n == 0:
        raise ConfigError("noise has no realisations (a leading dimension is 0)")
    acc = torch.zeros((h, w), dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // (h * w))
    for start in range(0, n, step):  # chunks of many slices, not a loop over slices
        chunk = x[start : start + step].to(torch.float64)
        chunk = chunk - chunk.mean(dim=(-2, -1), keepdim=True)
        acc += torch.fft.fft2(chunk).abs().square().sum(dim=0)
    return acc * (dy * dx / (h * w * n))


def radial_average(
    nps_2d: torch.Tensor, spacing_mm: Spacing, *, up_to_corner: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average a 2D spectrum ``(H, W)`` (``fft2`` order) over annuli of width ``Δf``.

    Args:
        nps_2d: ``(H, W)`` values on the full DFT grid (e.g. :func:`estimate_nps_2d` or
            :func:`ctharden.noise.nps.grid_nps`).
        spacing_mm: pixel size, float or ``(dy, dx)`` mm.
        up_to_corner: keep annuli beyond the Nyquist frequency ``min(1/(2Δx), 1/(2Δy))`` (only the
            grid's corners populate them); default: stop at Nyquist.

    Returns:
        ``(freqs, values, counts)``: the mean radial frequency of each annulus (mm⁻¹), the mean of
        ``nps_2d`` over it, and how many grid points it holds; float64, float64, int64 ``(B,)``,
        empty annuli dropped, DC (f = 0) first.
    """
    dy, dx = as_spacing(spacing_mm)
    h, w = nps_2d.shape[-2:]
    f = radial_frequency((h, w), (dy, dx), device=nps_2d.device)
    df = max(1.0 / (h * dy), 1.0 / (w * dx))
    idx = torch.round(f / df).to(torch.int64).reshape(-1)
    nbins = int(idx.max()) + 1
    counts = torch.bincount(idx, minlength=nbins)
    sums = torch.bincount(idx, weights=nps_2d.to(torch.float64).reshape(-1), minlength=nbins)
    fsum = torch.bincount(idx, weights=f.reshape(-1), minlength=nbins)
    keep = counts > 0
    if not up_to_corner:
        nyquist = min(0.5 / dy, 0.5 / dx)
        keep &= torch.arange(nbins, device=counts.device) * df <= nyquist * (1 + 1e-9)
    c = counts[keep]
    return fsum[keep] / c, sums[keep] / c, c


def estimate_nps(
    noise: np.ndarray | torch.Tensor, spacing_mm: Spacing, *, up_to_corner: bool = False
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Radial NPS of noise realisations (eq. A.1 then radial average).

    Args:
        noise: ``(..., H, W)`` in HU; every slice (all leading dims) is one realisation, its own
            mean is removed, and ``|DFT|²`` is averaged over all of them.
        spacing_mm: in-plane pixel size, float or ``(dy, dx)`` mm.
        up_to_corner: also return annuli beyond the Nyquist frequency (see :func:`radial_average`).

    Returns:
        ``(freqs, nps)``: radial frequency (mm⁻¹, mean over each annulus of width
        ``max(1/(NxΔx), 1/(NyΔy))``, starting at 0) and the radial NPS (HU²·mm²), both ``(B,)``
        float64 — numpy arrays for a numpy input, tensors (on the input's device) for a tensor.
    """
    as_numpy = isinstance(noise, np.ndarray)
    x = torch.from_numpy(noise) if as_numpy else torch.as_tensor(noise)
    nps_2d = estimate_nps_2d(x.detach(), spacing_mm)
    freqs, values, _ = radial_average(nps_2d, spacing_mm, up_to_corner=up_to_corner)
    if as_numpy:
        return freqs.cpu().numpy(), values.cpu().numpy()
    return freqs, values
