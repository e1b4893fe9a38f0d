"""Noise power spectrum (NPS) models of CT image noise, in HU²·mm², radially symmetric.

Shen et al. 2020 (Appendix) take the NPS of a reference protocol (120 kVp, 250 mAs) and scale its
amplitude linearly with dose: quantum noise variance is proportional to 1/mAs, so

    NPS_mAs(f) = NPS_ref(f) · ref_mas / mAs          (f = |(fx, fy)| in mm⁻¹)

and the noise standard deviation scales as sqrt(ref_mas / mAs).

Two models implement :class:`NPSModel`:

- :class:`ParametricNPS` (the default): ramp × apodisation,
  ``NPS_ref(f) = A · f^α · exp(-(f/f_c)^β)``. The ramp ``f^α`` (α = 1) is the filtered
  back-projection ramp filter's imprint on noise; ``exp(-(f/f_c)^β)`` is the reconstruction
  kernel's roll-off. It is parameterised by what a physicist quotes — the noise σ at the reference
  mAs and the NPS peak frequency — and ``A``, ``f_c`` are derived.
- :class:`TableNPS`: a measured radial NPS loaded from CSV (:func:`load_nps_table`), linearly
  interpolated in f.

The NPS is a continuous-frequency density: on a DFT grid of ``H×W`` pixels of ``dy×dx`` mm the
noise variance is ``Σ_k NPS(f_k) · Δfx·Δfy`` with ``Δf = 1/(N·d)`` (see :func:`grid_variance`),
the band-limited part of ``σ² = ∫∫ NPS(f) dfx dfy``.
"""

from __future__ import annotations

import abc
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctharden.core.errors import ConfigError, DataError
from ctharden.noise.grid import Spacing, as_spacing, radial_frequency

TABLE_COLUMNS = ("freq_per_mm", "nps_hu2_mm2")
_REF_MAS_RE = re.compile(r"^\s*#\s*ref_mas\s*[:=]\s*([^\s#]+)", re.IGNORECASE)


class NPSModel(abc.ABC):
    """A radially symmetric NPS of a reference protocol, scaled linearly with 1/mAs."""

    #: mAs of the protocol the reference NPS describes.
    ref_mas: float

    @abc.abstractmethod
    def reference(self, freq: torch.Tensor) -> torch.Tensor:
        """NPS at ``ref_mas``, HU²·mm², at radial frequencies ``freq`` (mm⁻¹, any shape, float64)."""

    def __call__(self, freq: torch.Tensor, mas: float | torch.Tensor | None = None) -> torch.Tensor:
        """NPS in HU²·mm² at radial frequency ``freq`` (mm⁻¹) and ``mas`` (default ``ref_mas``).

        ``mas`` may be a tensor broadcastable against ``freq``.
        """
        freq = torch.as_tensor(freq, dtype=torch.float64)
        ref = self.reference(freq)
        if mas is None:
            return ref
        return ref * (self.ref_mas / torch.as_tensor(mas, dtype=torch.float64, device=ref.device))

    def sigma(self, mas: float | None = None) -> float:
        """Noise σ (HU) of the whole (not band-limited) NPS at ``mas``: ``sqrt(2π ∫ f·NPS(f) df)``."""
        var = self.total_variance_ref() * (1.0 if mas is None else self.ref_mas / float(mas))
        return math.sqrt(var)

    @abc.abstractmethod
    def total_variance_ref(self) -> float:
        """``∫∫ NPS_ref dfx dfy = 2π ∫ f·NPS_ref(f) df`` in HU² (all frequencies)."""


@dataclass(frozen=True)
class ParametricNPS(NPSModel):
    """``NPS_ref(f) = A · f^α · exp(-(f/f_c)^β)`` in HU²·mm² (f in mm⁻¹), a ramp × kernel roll-off.

    Defaults model a standard (soft-tissue/"standard") chest kernel at 120 kVp, 250 mAs: σ = 12 HU
    at 250 mAs (60 HU at 10 mAs, 8.5 HU at 500 mAs), NPS peak at 0.30 mm⁻¹ and ~1 % of the noise
    power above 0.71 mm⁻¹ (the Nyquist frequency of a 0.7 mm reconstruction grid).

    Attributes:
        sigma_ref_hu: noise standard deviation at ``ref_mas`` (HU), integrated over all
            frequencies; fixes the amplitude ``A``.
        peak_freq_per_mm: frequency of the NPS maximum (mm⁻¹); fixes ``f_c``.
        ramp_exponent: α (dimensionless, > 0); 1 = the FBP ramp.
        rolloff_exponent: β (dimensionless, > 0); how sharply the kernel cuts off (2 = Gaussian).
        ref_mas: tube current-time product of the reference protocol (mAs).
        ref_kvp: tube voltage of the reference protocol (kVp); informational, the model is for it.
    """

    sigma_ref_hu: float = 12.0
    peak_freq_per_mm: float = 0.30
    ramp_exponent: float = 1.0
    rolloff_exponent: float = 3.0
    ref_mas: float = 250.0
    ref_kvp: float = 120.0

    def __post_init__(self) -> None:
        for name in ("sigma_ref_hu", "peak_freq_per_mm", "ramp_exponent", "rolloff_exponent", "ref_mas"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"ParametricNPS.{name} must be a positive number, got {value!r}")

    @property
    def cutoff_per_mm(self) -> float:
        """f_c (mm⁻¹): the peak of f^α·exp(-(f/f_c)^β) lies at f_c·(α/β)^(1/β)."""
        a, b = self.ramp_exponent, self.rolloff_exponent
        fc: float = self.peak_freq_per_mm * (b / a) ** (1.0 / b)  # float ** float is typed Any (could be complex)
        return fc

    @property
    def amplitude(self) -> float:
        """A in HU²·mm^(2+α), from σ² = 2πA ∫ f^(1+α)·exp(-(f/f_c)^β) df = 2πA·f_c^(α+2)·Γ((α+2)/β)/β."""
        a, b, fc = self.ramp_exponent, self.rolloff_exponent, self.cutoff_per_mm
        amp: float = self.sigma_ref_hu**2 * b / (2.0 * math.pi * fc ** (a + 2.0) * math.gamma((a + 2.0) / b))
        return amp

    def reference(self, freq: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(freq, dtype=torch.float64)
        rolloff = torch.exp(-((f / self.cutoff_per_mm) ** self.rolloff_exponent))
        return self.amplitude * f.pow(self.ramp_exponent) * rolloff

    def total_variance_ref(self) -> float:
        return self.sigma_ref_hu**2


@dataclass(frozen=True, eq=False)
class TableNPS(NPSModel):
    """A measured radial NPS: ``freqs`` (mm⁻¹, increasing, >= 0), ``values`` (HU²·mm², >= 0).

    Linear interpolation in f; below the first frequency the first value is held; above the last
    frequency the NPS is 0 (a table measured up to its Nyquist frequency says nothing beyond it).
    """

    freqs: np.ndarray
    values: np.ndarray
    ref_mas: float
    source: str = "<table>"
    _f: torch.Tensor = field(init=False, repr=False)
    _v: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        f = np.asarray(self.freqs, dtype=np.float64).reshape(-1)
        v = np.asarray(self.values, dtype=np.float64).reshape(-1)
        _check_table(f, v, self.ref_mas, self.source)
        object.__setattr__(self, "freqs", f)
        object.__setattr__(self, "values", v)
        object.__setattr__(self, "ref_mas", float(self.ref_mas))
        object.__setattr__(self, "_f", torch.from_numpy(f.copy()))
        object.__setattr__(self, "_v", torch.from_numpy(v.copy()))

    def reference(self, freq: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(freq, dtype=torch.float64)
        xp, fp = self._f.to(f.device), self._v.to(f.device)
        idx = torch.searchsorted(xp, f.contiguous()).clamp(1, len(xp) - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        t = ((f - x0) / (x1 - x0)).clamp(0.0, 1.0)
        out = y0 + t * (y1 - y0)
        return torch.where(f > xp[-1], torch.zeros_like(out), out)

    def total_variance_ref(self) -> float:
        f = np.concatenate([[0.0], self.freqs]) if self.freqs[0] > 0 else self.freqs
        v = np.concatenate([[self.values[0]], self.values]) if self.freqs[0] > 0 else self.values
        return float(2.0 * math.pi * np.trapezoid(f * v, f))

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV (``# ref_mas: ...`` header comment + the two columns)."""
        return write_nps_table(path, self.freqs, self.values, self.ref_mas)


def _check_table(f: np.ndarray, v: np.ndarray, ref_mas: float, source: str) -> None:
    where = f"NPS table {source}"
    if f.shape != v.shape:
        raise DataError(f"{where}: {len(f)} frequencies but {len(v)} NPS values")
    if len(f) < 2:
        raise DataError(f"{where}: needs at least 2 rows, has {len(f)}")

    def row(mask: np.ndarray, offset: int = 1) -> int:  # first offending data row, 1-based
        return int(np.flatnonzero(mask)[0]) + offset

    if not np.isfinite(f).all():
        raise DataError(f"{where}: column freq_per_mm has NaN/inf (row {row(~np.isfinite(f))})")
    if not np.isfinite(v).all():
        raise DataError(f"{where}: column nps_hu2_mm2 has NaN/inf (row {row(~np.isfinite(v))})")
    if (f < 0).any():
        raise DataError(f"{where}: negative frequency in freq_per_mm (row {row(f < 0)})")
    if (v < 0).any():
        raise DataError(f"{where}: negative NPS value in nps_hu2_mm2 (row {row(v < 0)})")
    if (np.diff(f) <= 0).any():
        raise DataError(f"{where}: freq_per_mm must be strictly increasing (row {row(np.diff(f) <= 0, 2)})")
    if not (v > 0).any():
        raise DataError(f"{where}: every NPS value is zero")
    if not (isinstance(ref_mas, (int, float, np.floating)) and math.isfinite(ref_mas) and ref_mas > 0):
        raise DataError(f"{where}: reference mAs must be a positive number, got {ref_mas!r}")


def load_nps_table(path: str | Path, ref_mas: float | None = None) -> TableNPS:
    """Load a measured radial NPS from CSV.

    Format: a header row with the columns ``freq_per_mm,nps_hu2_mm2`` (others are ignored), one row
    per frequency (mm⁻¹, strictly increasing) with the NPS in HU²·mm² at the reference mAs, and
    optionally a comment line ``# ref_mas: 250`` anywhere before the header. Other ``#`` lines are
    comments.

    Args:
        path: the CSV file.
        ref_mas: the protocol's reference mAs; required unless the file has a ``# ref_mas:`` line.
            If both are given they must agree.

    Raises:
        DataError: naming the file, if it is missing or unreadable, a column is missing, a value is
            not a number, NaN/inf or negative, the frequencies are not strictly increasing, or the
            reference mAs is missing, invalid or inconsistent.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"NPS table {p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"NPS table {p}: cannot read it ({exc})") from None

    header_mas: float | None = None
    data_lines: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _REF_MAS_RE.match(line)
            if m:
                try:
                    header_mas = float(m.group(1))
                except ValueError:
                    raise DataError(f"NPS table {p}: ref_mas {m.group(1)!r} is not a number") from None
            continue
        if line.strip():
            data_lines.append(line)
    if not data_lines:
        raise DataError(f"NPS table {p}: empty (expected columns {','.join(TABLE_COLUMNS)})")

    reader = csv.DictReader(data_lines)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in TABLE_COLUMNS if c not in columns]
    if missing:
        has = ", ".join(columns) or "none"
        raise DataError(f"NPS table {p}: missing column(s) {', '.join(missing)} (has {has})")
    reader.fieldnames = columns
    freqs: list[float] = []
    values: list[float] = []
    for row_no, row in enumerate(reader, start=1):
        for col, out in zip(TABLE_COLUMNS, (freqs, values), strict=True):
            raw = (row.get(col) or "").strip()
            try:
                out.append(float(raw))
            except ValueError:
                raise DataError(
                    f"NPS table {p}: row {row_no} column {col}: {raw!r} is not a number"
                ) from None

    if ref_mas is None and header_mas is None:
        raise DataError(
            f"NPS table {p}: reference mAs unknown (pass ref_mas= or add a '# ref_mas: 250' line)"
        )
    if ref_mas is not None and header_mas is not None and not math.isclose(float(ref_mas), header_mas):
        raise DataError(f"NPS table {p}: ref_mas={ref_mas} given but the file says ref_mas: {header_mas}")
    mas = float(ref_mas if ref_mas is not None else header_mas)  # type: ignore[arg-type]
    return TableNPS(np.asarray(freqs), np.asarray(values), ref_mas=mas, source=str(p))


def write_nps_table(path: str | Path, freqs: np.ndarray, values: np.ndarray, ref_mas: float) -> Path:
    """Write a radial NPS table (mm⁻¹, HU²·mm²) that :func:`load_nps_table` reads back. Atomic."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(f"# ref_mas: {float(ref_mas):g}\n")
        fh.write(",".join(TABLE_COLUMNS) + "\n")
        for f, v in zip(np.asarray(freqs, dtype=float), np.asarray(values, dtype=float), strict=True):
            fh.write(f"{f:.10g},{v:.10g}\n")
    tmp.replace(p)
    return p


def tabulate(nps: NPSModel, max_freq_per_mm: float = 1.0, n: int = 201) -> TableNPS:
    """``nps`` sampled at ``n`` equally spaced frequencies in ``[0, max_freq_per_mm]``, as a table."""
    f = np.linspace(0.0, max_freq_per_mm, n)
    v = nps.reference(torch.from_numpy(f)).numpy()
    return TableNPS(f, v, ref_mas=nps.ref_mas, source=f"tabulated {type(nps).__name__}")


def default_nps() -> ParametricNPS:
    """The reference parametric NPS (standard chest kernel, 120 kVp, 250 mAs, σ = 12 HU)."""
    return ParametricNPS()


def grid_nps(
    hw: tuple[int, int],
    spacing_mm: Spacing,
    mas: float | None = None,
    *,
    nps: NPSModel | None = None,
    half: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The NPS (HU²·mm²) at ``mas`` on the DFT grid of an ``H×W`` slice.

    Returns float64 ``(H, W)`` in ``fft2`` order, or ``(H, W//2+1)`` (``rfft2``) if ``half``.
    """
    model = nps if nps is not None else default_nps()
    f = radial_frequency(hw, spacing_mm, half=half, device=device)
    return model(f, mas)


def grid_variance(
    hw: tuple[int, int], spacing_mm: Spacing, mas: float, *, nps: NPSModel | None = None
) -> float:
    """Expected noise variance (HU²) of an ``H×W`` slice sampled with ``spacing_mm`` at ``mas``.

    ``Σ_k NPS_mAs(f_k) · Δfx Δfy`` over the DFT grid (``Δf = 1/(N·d)``); this is exactly the
    variance of :func:`ctharden.noise.sample_nps_noise` output (per pixel, in expectation).
    """
    dy, dx = as_spacing(spacing_mm)
    s = grid_nps(hw, (dy, dx), mas, nps=nps)
    return float(s.sum()) / (hw[0] * dy * hw[1] * dx)
