"""Sampling CT noise from an NPS (Shen et al. 2020, eq. A.2), batched with ``torch.fft``.

Eq. A.2 filters white Gaussian noise ``I`` in Fourier space: ``p = F⁻¹[ sqrt(S·NxNy/(ΔxΔy)) · I ]``.
Here ``I = F[w] / sqrt(NxNy)`` with ``w`` real standard white noise in the image, so ``I`` is
standard complex white noise with exact Hermitian symmetry and ``p`` is real without discarding an
imaginary part. Then ``E|F[p]|² = S·NxNy/(ΔxΔy)``, i.e. the estimator of eq. A.1
(:func:`ctharden.noise.estimate_nps`) returns ``S`` in expectation, and the per-pixel variance is
``Σ_k S(f_k)·Δfx·Δfy`` (:func:`ctharden.noise.nps.grid_variance`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctharden.core.errors import ConfigError
from ctharden.noise.grid import Spacing, as_image_shape, as_mas, as_spacing
from ctharden.noise.nps import NPSModel, default_nps, grid_nps


def nps_filter(
    hw: tuple[int, int],
    spacing_mm: Spacing,
    *,
    nps: NPSModel | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fourier-domain amplitude filter ``sqrt(NPS_ref(f) / (Δx·Δy))`` on the ``rfft2`` grid.

    Applied to ``rfft2`` of real unit white noise it gives noise with NPS ``NPS_ref`` (at the
    model's ``ref_mas``). Returns float32 ``(H, W//2+1)``; units HU·mm⁻¹ (√(HU²·mm²)/mm²).
    """
    dy, dx = as_spacing(spacing_mm)
    s = grid_nps(hw, (dy, dx), None, nps=nps, half=True, device=device)
    return torch.sqrt(s.clamp_min(0.0) / (dy * dx)).to(torch.float32)


def sample_nps_noise(
    shape: Sequence[int],
    mas: float | torch.Tensor,
    spacing_mm: Spacing,
    *,
    nps: NPSModel | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw CT noise in HU whose every axial slice follows the NPS at ``mas``.

    Args:
        shape: ``(..., H, W)``; each slice (last two axes) is an independent realisation, so a
            ``(B, D, H, W)`` request gives B cubes of D independent axial noise slices (the
            paper's 3D noise: "each axial slice generated independently").
        mas: tube current-time product (mAs): a float, or a tensor broadcastable to
            ``shape[:-2]`` (per-sample or per-slice mAs).
        spacing_mm: in-plane pixel size in mm, float or ``(dy, dx)``.
        nps: the NPS model (default: :func:`ctharden.noise.nps.default_nps`).
        generator: a ``torch.Generator`` for reproducible draws (on ``device``).
        device: where to generate; default the generator's device, else CPU.

    Returns:
        float32 tensor ``shape`` in HU, zero-mean, with NPS ``NPS_ref·ref_mas/mas`` and per-pixel
        variance :func:`~ctharden.noise.nps.grid_variance`.
    """
    shape_t = as_image_shape(shape)
    if device is not None:
        dev = torch.device(device)
    elif generator is not None:
        dev = generator.device
    else:
        dev = torch.device("cpu")
    if generator is not None and generator.device.type != dev.type:
        raise ConfigError(f"generator is on {generator.device} but device is {dev}")
    lead, hw = shape_t[:-2], (shape_t[-2], shape_t[-1])
    model = nps if nps is not None else default_nps()
    scale = torch.sqrt(model.ref_mas / as_mas(mas, lead, dev)).to(torch.float32)  # lead + (1, 1)

    if 0 in lead:
        return torch.zeros(shape_t, dtype=torch.float32, device=dev)
    white = torch.randn(shape_t, generator=generator, device=dev, dtype=torch.float32)
    spectrum = torch.fft.rfft2(white) * nps_filter(hw, spacing_mm, nps=model, device=dev)
    noise: torch.Tensor = torch.fft.irfft2(spectrum, s=hw)  # torch.fft is untyped
    return (noise * scale).contiguous()

