"""Projection of a perturbation onto an NPS (Shen et al. 2020, eq. 5), batched, without autograd.

Eq. 5:  Proj(a_{z,i}, S) = F⁻¹[ F[a_{z,i}](f,ϕ) / E_{ϕ,z,i}[F[a_{z,i}](f,ϕ)] · (S(f)·NxNy/(ΔxΔy))^½ ]

i.e. every Fourier coefficient keeps its phase (and its amplitude relative to the others at the
same radial frequency f) and is rescaled so that, at each f, the average amplitude over all angles
ϕ, all axial slices z and all samples i equals the target ``(S(f)·NxNy/(ΔxΔy))^½``.

Interpretation (documented choices):

1. ``E_{ϕ,z,i}[F[a](f, ϕ)]`` is read as the root-mean-square magnitude
   ``sqrt(E_{ϕ,z,i}|F[a](f, ϕ)|²)``. The literal mean of complex coefficients is ≈ 0 for any
   noise-like ``a`` (ill-defined), and the mean magnitude would make the result's power
   ``4/π ≈ 1.27×`` the target for Gaussian-like coefficients (Rayleigh magnitudes), contradicting
   eq. A.1. With the RMS the constraint of eq. 2 is *exactly* "the eq. A.1 NPS estimate over the
   pooled slices equals S": ``(ΔxΔy/NxNy)·E_{ϕ,z,i}|F[p]|² = S(f)``.
2. ``f`` is the exact radial frequency: coefficients are grouped by equal ``|f|`` on the DFT grid
   (all angles ϕ at that f; e.g. ``(±3, ±4)`` and ``(±5, 0)`` on a square grid with square
   pixels), so S is constant in a group, the result's spectrum equals S exactly and the operator
   is idempotent.
3. The average runs over all slices and samples of the call (``pool="all"``, the paper). Also
   offered: ``pool="sample"`` (per sample = per index of the first axis, over its slices; the
   result of one sample then does not depend on the rest of the batch) and ``pool="slice"``.
4. Per-sample/per-slice mAs: the pooled average is taken of ``|F[a]|² / T²`` with
   ``T² = S_mAs(f)·NxNy/(ΔxΔy)`` each slice's own target; for one mAs this is exactly eq. 5, and it
   keeps the operator idempotent when the mAs varies inside a pool.
5. Where the input has no energy at some f (all coefficients of the group are 0 over the pool)
   there is no phase to keep: the output stays 0 there (its power is then below S at that f).
   Where S(f) = 0 (e.g. DC for the parametric model, beyond a table's last frequency) the output
   is 0.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Literal

import torch

from ctharden.core.errors import ConfigError
from ctharden.noise.grid import Spacing, as_mas, as_spacing, rfft_weights
from ctharden.noise.nps import NPSModel, default_nps, grid_nps

Pool = Literal["all", "sample", "slice"]


@lru_cache(maxsize=64)
def _radius_groups(h: int, w: int, dy: float, dx: float) -> tuple[torch.Tensor, int]:
    """Label each ``rfft2`` coefficient ``(H, W//2+1)`` by its exact radial frequency: (labels, count)."""
    ky = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64).round().to(torch.int64).abs()  # |ky| in 0..H/2
    kx = torch.arange(w // 2 + 1, dtype=torch.int64)
    # f² = ky²/(H·dy)² + kx²/(W·dx)² ∝ ky²·a + kx²·b with a = (W·dx)², b = (H·dy)²
    ratio = ((w * dx) / (h * dy)) ** 2
    frac = Fraction(ratio).limit_denominator(10**6)
    if math.isclose(float(frac), ratio, rel_tol=1e-12):
        key = ky[:, None] ** 2 * frac.numerator + kx[None, :] ** 2 * frac.denominator  # exact integers
    else:  # irrational aspect: equal radii only for equal (|ky|, |kx|)
        key = ky[:, None] * (w // 2 + 1) + kx[None, :]
    _, labels = torch.unique(key.reshape(-1), return_inverse=True)
    return labels, int(labels.max()) + 1


@torch.no_grad()
def project_to_nps(
    p: torch.Tensor,
    mas: float | torch.Tensor,
    spacing_mm: Spacing,
    *,
    nps: NPSModel | None = None,
    pool: Pool = "all",
) -> torch.Tensor:
    """Project a perturbation onto the NPS at ``mas`` (eq. 5, see the module docstring).

    Args:
        p: perturbation in HU, ``(..., H, W)``; the last two axes are axial slices. Not
            differentiated through (runs under ``torch.no_grad``; the input is detached).
        mas: mAs, a float or a tensor broadcastable to ``p.shape[:-2]``.
        spacing_mm: in-plane pixel size, float or ``(dy, dx)`` mm.
        nps: the NPS model (default: the reference parametric one).
        pool: over what the per-frequency average of eq. 5 runs: ``"all"`` leading indices (the
            paper: all slices of all samples), each ``"sample"`` (first axis), or each ``"slice"``.

    Returns:
        tensor like ``p`` (same shape, dtype, device) in HU: same Fourier phases as ``p``, radial
        power spectrum (eq. A.1 over the pool) equal to ``NPS(f)·ref_mas/mas``.
    """
    if pool not in ("all", "sample", "slice"):
        raise ConfigError(f"pool must be 'all', 'sample' or 'slice', got {pool!r}")
    if p.dim() < 2 or p.shape[-1] < 2 or p.shape[-2] < 2:
        raise ConfigError(f"perturbation must be (..., H, W) with H, W >= 2, got shape {tuple(p.shape)}")
    dy, dx = as_spacing(spacing_mm)
    model = nps if nps is not None else default_nps()
    x = p.detach()
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(work)
    dev = x.device
    h, w = x.shape[-2:]
    lead = tuple(x.shape[:-2])
    n_lead = math.prod(lead)
    if n_lead == 0:
        return p.detach().clone()

    # target power per coefficient, full-grid semantics: T² = S_ref(f)·(ref/mAs)·N/(ΔxΔy)
    t2_ref = grid_nps((h, w), (dy, dx), None, nps=model, half=True, device=dev) * (h * w / (dy * dx))
    mas_ratio = (as_mas(mas, lead, dev) / model.ref_mas).reshape(n_lead, 1)  # mAs/ref per slice

    spec = torch.fft.rfft2(x)  # (..., H, Wr)
    power = spec.abs().square().to(torch.float64).reshape(n_lead, -1)  # (L, H·Wr)
    t2_flat = t2_ref.reshape(1, -1)
    positive = t2_flat > 0
    whitened = torch.where(positive, power * mas_ratio / torch.where(positive, t2_flat, 1.0), 0.0)

    labels, n_groups = _radius_groups(h, w, dy, dx)
    labels = labels.to(dev)
    col_w = rfft_weights(w, device=dev).expand(h, -1).reshape(-1)  # (H·Wr,)
    if pool == "all" or not lead:
        n_pool, per_pool = 1, n_lead
    elif pool == "sample":
        n_pool, per_pool = lead[0], n_lead // max(lead[0], 1)
    else:
        n_pool, per_pool = n_lead, 1
    summed = (whitened * col_w).reshape(n_pool, per_pool, -1).sum(dim=1)  # (P, H·Wr)
    group_sum = torch.zeros((n_pool, n_groups), dtype=torch.float64, device=dev).index_add_(1, labels, summed)
    group_cnt = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, labels, col_w) * per_pool
    mean_white = (group_sum / group_cnt)[:, labels]  # (P, H·Wr): E_pool[|F a|²/T²] per coefficient
    ok = (mean_white > 0) & positive
    gain = torch.where(ok, torch.rsqrt(torch.where(ok, mean_white, 1.0)), 0.0)  # (P, H·Wr)
    gain = gain[:, None, :].expand(n_pool, per_pool, -1).reshape(*lead, h, w // 2 + 1)
    out: torch.Tensor = torch.fft.irfft2(spec * gain.to(work), s=(h, w))  # torch.fft is untyped
    return out.to(out_dtype)
