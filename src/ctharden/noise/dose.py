"""Dose-aware NPS noise: simulate a lower-dose rescan of a sample's own scan (beside the paper's additive noise).

Shen et al. 2020 add NPS noise of a target mAs on top of an image that already carries the noise of
its own scan ("additive", ``robustness.noise.mode: additive``, the default). Where a sample's own
scan mAs ``s`` is known, ``mode: dose`` instead adds only what a rescan at the target ``t`` would
add.

Derivation. Quantum noise variance is proportional to 1/mAs with the NPS shape fixed
(:mod:`ctharden.noise.nps`), so at any mAs ``m``

    NPS_m(f) = NPS_ref(f) · m_ref / m,        σ²(m) = σ²_ref · m_ref / m          (HU²·mm², HU²)

(the band-limited variance of a DFT grid, :func:`~ctharden.noise.nps.grid_variance`, scales the
same way). The image's own noise ``n_s`` has ``NPS_s``; independent zero-mean noises add their
spectra, so the increment ``d`` that brings it to ``NPS_t`` must have

    NPS_d = NPS_t − NPS_s = NPS_ref · m_ref · (1/t − 1/s) = NPS_t · (1 − t/s),   σ²_d = σ²(t) − σ²(s).

That is the target-mAs noise draw ``n_t`` scaled per sample by

    a = sqrt(max(0, 1 − t/s))            (d = a · n_t; NPS noise at the effective mAs t·s/(s − t))

Cases per sample (:data:`DoseCase`):

- ``"dose"``: ``s`` known and ``t < s``: ``0 < a < 1``;
- ``"none"``: ``s`` known and ``t ≥ s``: a rescan at a higher (or the same) dose cannot remove the
  noise the image has, so nothing is added (``a = 0``);
- ``"additive_fallback"``: ``s`` unknown (NaN): the paper's additive noise (``a = 1``). A dose is
  never invented; such samples are counted (:class:`DoseCounts`).

Assumed: the image's own noise follows the configured NPS shape (kernel, 120 kVp reference) at its
scan mAs; other kVp and kernels are not modelled. ``scan_mas`` comes from a dataset manifest's
``mas`` column (tube current-time product per rotation, mAs; NaN = unknown).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from ctharden.core.errors import DataError
from ctharden.noise.grid import Spacing
from ctharden.noise.nps import NPSModel
from ctharden.noise.sample import sample_nps_noise

#: What a sample's noise is in dose mode (see the module docstring).
DoseCase = Literal["dose", "none", "additive_fallback"]
DOSE_CASES: tuple[DoseCase, ...] = get_args(DoseCase)

ScanMas = Tensor | np.ndarray | Sequence[float]


def as_scan_mas(scan_mas: ScanMas | None, n: int | None = None) -> Tensor:
    """Per-sample scan mAs as float64 CPU ``(N,)``; ``None`` -> all NaN (every dose unknown; needs ``n``).

    Args:
        scan_mas: ``(N,)`` mAs of each sample's own scan, NaN where unknown.
        n: the number of samples N, checked when given.

    Raises:
        DataError: not 1-D (or not ``n`` long), or a known value that is not positive and finite.
    """
    if scan_mas is None:
        if n is None:
            raise DataError("scan_mas is None: the number of samples n is needed")
        return torch.full((n,), math.nan, dtype=torch.float64)
    if isinstance(scan_mas, Tensor):
        s = scan_mas.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        s = torch.from_numpy(np.array(scan_mas, dtype=np.float64))
    if s.dim() != 1 or (n is not None and s.shape[0] != n):
        want = f"({n},)" if n is not None else "(N,)"
        raise DataError(f"scan_mas must be {want}: one value per sample, got shape {tuple(s.shape)}")
    known = ~torch.isnan(s)
    bad = known & ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise DataError(f"scan mAs must be positive and finite or NaN (unknown); sample {i} has {float(s[i])!r}")
    return s


def _target(target_mas: float) -> float:
    t = float(target_mas)
    if not (math.isfinite(t) and t > 0):
        raise DataError(f"target mAs must be positive and finite, got {target_mas!r}")
    return t


def dose_scale(target_mas: float, scan_mas: ScanMas) -> Tensor:
    """Per-sample amplitude ``a = sqrt(max(0, 1 − target/scan))`` of the target-mAs noise draw.

    Args:
        target_mas: the simulated (target) dose, mAs.
        scan_mas: ``(N,)`` each sample's own scan mAs, NaN where unknown.

    Returns:
        float64 CPU ``(N,)`` in ``[0, 1]``: ``a`` where the scan mAs is known (0 when
        ``target >= scan``), 1.0 (the additive fallback) where it is NaN. The added noise's variance
        is ``a² · σ²(target) = σ²(target) − σ²(scan)`` (HU²).
    """
    t = _target(target_mas)
    s = as_scan_mas(scan_mas)
    a = torch.sqrt((1.0 - t / s).clamp_min(0.0))
    return torch.where(torch.isnan(s), torch.ones_like(s), a)


def dose_cases(target_mas: float, scan_mas: ScanMas) -> list[DoseCase]:
    """Which noise each sample gets at ``target_mas`` (mAs): ``"dose"``, ``"none"`` or
    ``"additive_fallback"`` per sample of ``scan_mas`` ``(N,)`` (mAs, NaN unknown)."""
    t = _target(target_mas)
    s = as_scan_mas(scan_mas)
    return ["additive_fallback" if math.isnan(v) else ("dose" if t < v else "none") for v in s.tolist()]


@dataclass(frozen=True)
class DoseCounts:
    """How many of ``n`` samples got each kind of noise at ``target_mas`` in dose mode."""

    target_mas: float  # mAs
    n: int
    dose: int  # σ²(target) − σ²(scan) added
    none: int  # target >= scan mAs: nothing added
    additive_fallback: int  # scan mAs unknown: the paper's additive noise
    mode: str = "dose"

    def to_dict(self) -> dict[str, Any]:
        """JSON block: ``{mode, target_mas, n, dose, none, additive_fallback}``."""
        return {"mode": self.mode, "target_mas": self.target_mas, "n": self.n, "dose": self.dose,
                "none": self.none, "additive_fallback": self.additive_fallback}


def count_dose_cases(target_mas: float, scan_mas: ScanMas) -> DoseCounts:
    """:class:`DoseCounts` of :func:`dose_cases` at ``target_mas`` (mAs) over ``scan_mas`` ``(N,)``."""
    cases = dose_cases(target_mas, scan_mas)
    return DoseCounts(float(target_mas), len(cases), dose=cases.count("dose"), none=cases.count("none"),
                      additive_fallback=cases.count("additive_fallback"))


def scale_per_sample(noise: Tensor, a: Tensor) -> Tensor:
    """``noise`` ``(N, ...)`` (HU) times ``a`` ``(N,)`` per sample, in ``noise``'s dtype and device."""
    if a.dim() != 1 or a.shape[0] != noise.shape[0]:
        raise DataError(f"need one scale per sample ({noise.shape[0]}), got shape {tuple(a.shape)}")
    return noise * a.to(device=noise.device, dtype=noise.dtype).reshape(-1, *([1] * (noise.dim() - 1)))


def sample_dose_noise(
    shape: Sequence[int],
    target_mas: float,
    scan_mas: ScanMas,
    spacing_mm: Spacing,
    *,
    nps: NPSModel | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The dose-mode noise increment in HU: a target-mAs NPS draw scaled per sample by :func:`dose_scale`.

    Args:
        shape: ``(N, ..., H, W)``; sample ``i`` (first axis) was scanned at ``scan_mas[i]``.
        target_mas: the simulated dose, mAs.
        scan_mas: ``(N,)`` scan mAs, NaN where unknown (those samples get the additive draw).
        spacing_mm: in-plane pixel size, float or ``(dy, dx)`` mm.
        nps, generator, device: as in :func:`~ctharden.noise.sample_nps_noise` (same random stream).

    Returns:
        float32 ``shape`` in HU: zero-mean, NPS ``a_i² · NPS_target`` per sample.
    """
    noise = sample_nps_noise(shape, target_mas, spacing_mm, nps=nps, generator=generator, device=device)
    return scale_per_sample(noise, dose_scale(target_mas, scan_mas))
