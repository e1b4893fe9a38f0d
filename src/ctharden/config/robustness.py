"""Robustness-evaluation settings: ``params.yaml``'s ``robustness.defaults`` deep-merged with
``robustness.jobs.<job>``, validated into :class:`RobustnessSettings`.

Units: ``pgd.linf`` and ``pgd.l2`` are ε in *model-input units* (``[0, 1]``; the report also gives
them in HU); ``optimized.step_hu`` is HU; ``spacing_mm`` is the in-plane pixel size in mm;
``hu_per_unit`` is the HU width of the display window for models that take display-windowed
images (covid2d: the PNGs carry no HU; 1400 = the lung window ``[-1000, 400]``, an assumption
stated in the report).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ctharden.config.params import deep_merge, section
from ctharden.core.errors import ConfigError

SPLITS = ("train", "test")
MODEL_SETS = ("selected", "folds")


def _num(name: str, value: Any, *, positive: bool = True, integer: bool = False, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"robustness.{name} must be {kind} {'> 0' if positive else '>= 0'}, got {value!r}")
    return int(value) if integer else float(value)


def _eps_list(name: str, value: Any) -> list[float]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"robustness.{name} must be a list of ε values, got {value!r}")
    out = sorted({_num(name, v) for v in value})
    return out


@dataclass(frozen=True)
class RandomSettings:
    k: int = 5  # perturbations per sample and mAs (paper K = 50)
    batch_size: int = 256


@dataclass(frozen=True)
class OptimizedSettings:
    restarts: int = 2  # K random restarts (paper 50)
    step_sigma: float = 0.25  # δ as a fraction of the NPS noise σ (HU) at the attacked mAs
    tol: float = 1e-3  # paper ε = 1e-3
    n_iter: int = 10  # paper N_iter = 10
    max_samples: int | None = None  # per split
    batch_size: int = 64
    autocast: bool = True


@dataclass(frozen=True)
class PGDSettings:
    linf: list[float] = field(default_factory=list)
    l2: list[float] = field(default_factory=list)
    steps: int = 100
    restarts: int = 1
    loss: str = "both"
    max_samples: int | None = None  # test samples attacked
    autocast: bool = True
    tolerance: float = 0.05  # sanity-check slack (shares of samples)
    n_random: int = 10  # random draws per ε in the random-vs-gradient check


@dataclass(frozen=True)
class RobustnessSettings:
    """Everything one job's evaluation needs (see the module docstring for units)."""

    mas_levels: list[float]
    splits: list[str]
    models: str  # selected | folds (NPS attacks on every fold model: Table-2 mean ± std)
    max_samples: int | None  # per split, random NPS attacks
    spacing_mm: float  # in-plane pixel size (mm); replaced by fov_mm / width when fov_mm is set
    hu_per_unit: float | None
    fov_mm: float | None
    random: RandomSettings
    optimized: OptimizedSettings
    pgd: PGDSettings
    examples: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_width(self, width: int) -> RobustnessSettings:
        """These settings with ``spacing_mm = fov_mm / width`` when a field of view is given."""
        if self.fov_mm is None:
            return self
        return replace(self, spacing_mm=self.fov_mm / width)


def robustness_config(params: dict[str, Any], job: str) -> dict[str, Any]:
    """``robustness.defaults`` deep-merged with ``robustness.jobs.<job>`` (raw mapping)."""
    rob = section(params, "robustness")
    jobs = rob.get("jobs") or {}
    trained = (params.get("train") or {}).get("jobs") or {}
    if job and job not in jobs and job not in trained:
        raise ConfigError(f"unknown job {job!r} for robustness settings (configured: {', '.join(sorted(set(jobs) | set(trained)))})")
    return deep_merge(rob.get("defaults") or {}, jobs.get(job) or {})


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"robustness.{name} must be true or false, got {value!r}")
    return value


def parse_settings(cfg: dict[str, Any]) -> RobustnessSettings:
    """Validate a merged robustness mapping; unknown keys and bad values are :class:`ConfigError`."""
    known = {"mas_levels", "splits", "models", "max_samples", "spacing_mm", "fov_mm", "hu_per_unit", "random",
             "optimized", "pgd", "examples"}
    unknown = set(cfg) - known
    if unknown:
        raise ConfigError(f"robustness: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    levels = cfg.get("mas_levels") or []
    if not isinstance(levels, (list, tuple)) or not levels:
        raise ConfigError(f"robustness.mas_levels must be a non-empty list, got {levels!r}")
    mas = [_num("mas_levels", m) for m in levels]
    if len(set(mas)) != len(mas):
        raise ConfigError(f"robustness.mas_levels has duplicates: {levels}")
    splits = list(cfg.get("splits") or SPLITS)
    if not splits or any(s not in SPLITS for s in splits):
        raise ConfigError(f"robustness.splits must be a subset of {list(SPLITS)}, got {splits!r}")
    models = cfg.get("models", "selected")
    if models not in MODEL_SETS:
        raise ConfigError(f"robustness.models must be one of {list(MODEL_SETS)}, got {models!r}")

    def sub(name: str, cls: type, ints: set[str], floats: set[str], bools: set[str], opt: set[str]) -> Any:
        raw = cfg.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"robustness.{name} must be a mapping, got {raw!r}")
        fields = set(cls.__dataclass_fields__)
        bad = set(raw) - fields
        if bad:
            raise ConfigError(f"robustness.{name}: unknown keys {sorted(bad)} (known: {sorted(fields)})")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            label = f"{name}.{key}"
            if key in ints:
                out[key] = _num(label, value, integer=True, allow_none=key in opt)
            elif key in floats:
                out[key] = _num(label, value, positive=key != "tol", allow_none=key in opt)
            elif key in bools:
                out[key] = _bool(label, value)
            elif key in ("linf", "l2"):
                out[key] = _eps_list(label, value)
            elif key == "loss":
                if value not in ("ce", "margin", "both"):
                    raise ConfigError(f"robustness.{label} must be ce, margin or both, got {value!r}")
                out[key] = value
        return cls(**out)

    rnd = sub("random", RandomSettings, {"k", "batch_size"}, set(), set(), set())
    opt = sub("optimized", OptimizedSettings, {"restarts", "n_iter", "max_samples", "batch_size"},
              {"step_sigma", "tol"}, {"autocast"}, {"max_samples"})
    pgd = sub("pgd", PGDSettings, {"steps", "restarts", "max_samples", "n_random"}, {"tolerance"},
              {"autocast"}, {"max_samples"})
    if not pgd.linf and not pgd.l2:
        raise ConfigError("robustness.pgd needs ε values under linf and/or l2")
    return RobustnessSettings(
        mas_levels=mas, splits=splits, models=models,
        max_samples=_num("max_samples", cfg.get("max_samples"), integer=True, allow_none=True),
        spacing_mm=_num("spacing_mm", cfg.get("spacing_mm", 1.0)),
        hu_per_unit=_num("hu_per_unit", cfg.get("hu_per_unit"), allow_none=True),
        fov_mm=_num("fov_mm", cfg.get("fov_mm"), allow_none=True),
        random=rnd, optimized=opt, pgd=pgd,
        examples=_num("examples", cfg.get("examples", 2), positive=False, integer=True),
    )


def job_settings(params: dict[str, Any], job: str) -> RobustnessSettings:
    """The validated robustness settings of training job ``job``."""
    return parse_settings(robustness_config(params, job))
