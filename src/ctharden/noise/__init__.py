"""Realistic CT noise from a noise power spectrum (NPS), in HU (Shen et al. 2020, eqs. 2-5, A.1, A.2).

>>> noise = sample_nps_noise((8, 32, 32, 32), mas=50.0, spacing_mm=1.0)   # 8 cubes, HU, float32
>>> freqs, nps = estimate_nps(noise, 1.0)                                 # mm⁻¹, HU²·mm²
>>> p = project_to_nps(perturbation, mas=50.0, spacing_mm=1.0)            # eq. 5, no autograd

Shapes are ``(..., H, W)``: the last two axes are an axial slice (H rows along y, W columns along
x), every leading index an independent slice. ``spacing_mm`` is the in-plane pixel size (float or
``(dy, dx)``), frequencies are in mm⁻¹, the NPS in HU²·mm², and mAs sets the dose:
``NPS_mAs = NPS_ref · ref_mas / mAs``. The default model is :class:`ParametricNPS` (standard chest
kernel, 120 kVp, 250 mAs, σ = 12 HU, peak 0.30 mm⁻¹); a measured radial NPS loads with
:func:`load_nps_table`; :class:`NoiseConfig` reads ``params.yaml``'s ``robustness.noise``.
:mod:`ctharden.noise.dose` simulates a lower-dose rescan of a sample's own scan (``mode: dose``):
``a = sqrt(max(0, 1 - target/scan))`` per sample (:func:`dose_scale`) times the target-mAs draw.
"""

from ctharden.noise.config import NoiseConfig
from ctharden.noise.dose import DoseCounts, count_dose_cases, dose_cases, dose_scale, sample_dose_noise
from ctharden.noise.estimate import estimate_nps, estimate_nps_2d, radial_average
from ctharden.noise.grid import radial_frequency
from ctharden.noise.nps import (
    NPSModel,
    ParametricNPS,
    TableNPS,
    default_nps,
    grid_nps,
    grid_variance,
    load_nps_table,
    tabulate,
    write_nps_table,
)
from ctharden.noise.project import project_to_nps
from ctharden.noise.sample import nps_filter, sample_nps_noise

__all__ = [
    "DoseCounts",
    "NPSModel",
    "NoiseConfig",
    "ParametricNPS",
    "TableNPS",
    "count_dose_cases",
    "default_nps",
    "dose_cases",
    "dose_scale",
    "estimate_nps",
    "estimate_nps_2d",
    "grid_nps",
    "grid_variance",
    "load_nps_table",
    "nps_filter",
    "project_to_nps",
    "radial_average",
    "radial_frequency",
    "sample_dose_noise",
    "sample_nps_noise",
    "tabulate",
    "write_nps_table",
]
