"""Noise-model settings: defaults as a frozen dataclass, read from ``params.yaml``'s ``robustness.noise``.

The block this reads (every key optional; the values shown are the defaults)::

    robustness:
      noise:
        model: parametric          # parametric | table
        ref_mas: null              # reference mAs; null: 250 (parametric) / the table's '# ref_mas:'
        ref_kvp: 120               # informational
        sigma_ref_hu: 12.0         # parametric: noise σ at ref_mas (HU), all frequencies
        peak_freq_per_mm: 0.30     # parametric: NPS peak (mm⁻¹)
        ramp_exponent: 1.0         # parametric: α in A·f^α·exp(-(f/f_c)^β)
        rolloff_exponent: 3.0      # parametric: β
        table: null                # table: CSV freq_per_mm,nps_hu2_mm2
        projection_pool: all       # eq. 5 average over: all | sample | slice
        mode: additive             # additive | dose (ctharden.noise.dose: rescan at the target mAs)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctharden.config import choices
from ctharden.config.schema import NoiseSettings, validate_section
from ctharden.core.errors import ConfigError
from ctharden.noise.nps import NPSModel, ParametricNPS, load_nps_table

MODELS = choices.NOISE_MODELS
POOLS = choices.PROJECTION_POOLS
MODES = choices.NOISE_MODES


@dataclass(frozen=True)
class NoiseConfig:
    """Which NPS model to use and its parameters (units in the field comments)."""

    model: str = "parametric"  # parametric | table
    ref_mas: float | None = None  # reference protocol mAs; None: 250 (parametric) / the table's header
    ref_kvp: float = 120.0  # kVp of the reference protocol (informational)
    sigma_ref_hu: float = 12.0  # HU, noise σ at ref_mas (parametric)
    peak_freq_per_mm: float = 0.30  # mm⁻¹, NPS peak (parametric)
    ramp_exponent: float = 1.0  # α, dimensionless (parametric)
    rolloff_exponent: float = 3.0  # β, dimensionless (parametric)
    table: str | None = None  # CSV path (table model)
    projection_pool: str = "all"  # eq. 5 pooling: all | sample | slice
    mode: str = "additive"  # additive (paper) | dose (ctharden.noise.dose); the attacks read it via RobustnessSettings

    def __post_init__(self) -> None:
        """Checked by the schema (:class:`~ctharden.config.schema.NoiseSettings`) like ``params.yaml``."""
        validate_section(NoiseSettings, dataclasses.asdict(self), ("robustness", "noise"))

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> NoiseConfig:
        """From the full params dict (reads ``robustness.noise``) or the ``noise`` mapping itself."""
        section: Any = params or {}
        if "robustness" in section:
            section = (section.get("robustness") or {}).get("noise") or {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"robustness.noise must be a mapping, got {type(section).__name__}")
        return cls(**validate_section(NoiseSettings, section, ("robustness", "noise")).model_dump())

    def build(self, root: str | Path | None = None) -> NPSModel:
        """The NPS model; a relative ``table`` path is resolved against ``root`` (default: cwd)."""
        if self.model == "table":
            path = Path(self.table)  # type: ignore[arg-type]
            if root is not None and not path.is_absolute():
                path = Path(root) / path
            return load_nps_table(path, ref_mas=self.ref_mas)
        return ParametricNPS(
            ref_mas=250.0 if self.ref_mas is None else self.ref_mas,
            sigma_ref_hu=self.sigma_ref_hu,
            peak_freq_per_mm=self.peak_freq_per_mm,
            ramp_exponent=self.ramp_exponent,
            rolloff_exponent=self.rolloff_exponent,
            ref_kvp=self.ref_kvp,
        )


def noise_model(params: Mapping[str, Any] | None) -> NPSModel:
    """The NPS model configured under ``robustness.noise`` of the full params dict."""
    return NoiseConfig.from_params(params).build()
