"""Robustness-evaluation settings: ``params.yaml``'s ``robustness.defaults`` deep-merged with
``robustness.jobs.<job>``, validated into :class:`RobustnessSettings`.

Units: ``pgd.linf`` and ``pgd.l2`` are ε in *model-input units* (``[0, 1]``; the report also gives
them in HU); ``optimized.step_hu`` is HU; ``spacing_mm`` is the in-plane pixel size in mm;
``hu_per_unit`` is the HU width of the display window for models that take display-windowed
images (covid2d: the PNGs carry no HU; 1400 = the lung window ``[-1000, 400]``, an assumption
stated in the report). ``noise_mode`` comes from ``robustness.noise.mode`` (one for every job):
``additive`` (the paper) or ``dose`` (:mod:`ctharden.noise.dose`, the sample's scan mAs from the
manifest column ``mas``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ctharden.config import choices
from ctharden.config.params import deep_merge, section
from ctharden.config.schema import NoiseSettings, RobustnessJob, validate_section
from ctharden.core.errors import ConfigError

SPLITS = choices.SPLITS
MODEL_SETS = choices.MODEL_SETS
NOISE_MODES = choices.NOISE_MODES


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
    loss: str = "margin"
    max_samples: int | None = None  # test samples attacked
    autocast: bool = True
    tolerance: float = 0.05  # sanity-check slack (shares of samples)
    n_random: int = 10  # random draws per ε in the random-vs-gradient check
    #: the attack ensemble at every listed ε (robust accuracy = worst case over the members)
    attacks: tuple[str, ...] = choices.ENSEMBLE_ATTACKS
    square_queries: int = 1000  # Square's query budget per sample
    #: where the members after PGD run: ``gated`` (the ε the gate judges, :attr:`gated_eps`) or ``all``
    ensemble_eps: str = "gated"
    #: per norm, the ε of the gate's robust-accuracy criteria (set by :meth:`RobustnessSettings.with_gated_eps`)
    gated_eps: dict[str, list[float]] = field(default_factory=dict)

    def ensemble_at(self, norm: str, fallback: float | None) -> list[float]:
        """The ε (of this norm's list) at which the whole ensemble runs: every listed ε for
        ``ensemble_eps: all``; else the gated ε that are listed, or, where the gate judges none of
        them, ``fallback`` (the sanity checks' ``check_eps``: where the attack has most room to be
        better or worse), so gradient masking is looked for in every norm."""
        listed = list(getattr(self, norm))
        if self.ensemble_eps == "all":
            return listed
        gated = sorted(e for e in self.gated_eps.get(norm, []) if e in listed)
        if gated:
            return gated
        return [fallback] if fallback is not None and fallback in listed else listed[:1]


@dataclass(frozen=True)
class IntervalSettings:
    level: float = 0.95  # two-sided confidence level of every reported interval
    method: str = "clopper-pearson"  # rates: clopper-pearson | wilson; AUC: DeLong
    bootstrap: int = 2000  # stratified bootstrap resamples of the AUC (a check of DeLong; 0: none)


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
    noise_mode: str = "additive"  # additive (paper) | dose: rescan at the target mAs (ctharden.noise.dose)
    intervals: IntervalSettings = field(default_factory=IntervalSettings)
    #: attacks whose sample cap is ``plan`` (``optimized``, ``pgd``): uncapped until
    #: :meth:`with_caps` sets what the gate's planner says; ``planned_caps`` records it.
    planned: tuple[str, ...] = ()
    planned_caps: dict[str, int | None] = field(default_factory=dict)
    #: False for a model without input gradients (ONNX): only the attacks that need none run
    #: (random NPS, Square); the optimised NPS attack, PGD, APGD and the sanity checks are "not
    #: applicable" (:mod:`ctharden.evaluation.units`)
    white_box: bool = True

    def __post_init__(self) -> None:
        if self.noise_mode not in NOISE_MODES:
            raise ConfigError(f"robustness.noise.mode must be one of {', '.join(NOISE_MODES)}, got {self.noise_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        """As a dict; ``noise_mode`` only where it is not the default ``additive`` and ``white_box``
        only where it is False (so such an evaluation's JSON is what it was before the options existed)."""
        out = asdict(self)
        if self.noise_mode == "additive":
            del out["noise_mode"]
        if self.white_box:
            del out["white_box"]
        out["planned"] = list(self.planned)
        out["pgd"]["attacks"] = list(self.pgd.attacks)
        return out

    def with_caps(self, caps: dict[str, int | None]) -> RobustnessSettings:
        """These settings with the planner's caps for the ``planned`` attacks (None: every sample)."""
        unknown = set(caps) - set(self.planned)
        if unknown:
            raise ConfigError(f"sample caps given for attacks whose max_samples is not 'plan': {sorted(unknown)}")
        opt, pgd = self.optimized, self.pgd
        if "optimized" in caps:
            opt = replace(opt, max_samples=caps["optimized"])
        if "pgd" in caps:
            pgd = replace(pgd, max_samples=caps["pgd"])
        return replace(self, optimized=opt, pgd=pgd, planned_caps={**self.planned_caps, **caps})

    def with_gated_eps(self, gated: dict[str, list[float]]) -> RobustnessSettings:
        """These settings with the gate's robust-accuracy ε per norm (where ``ensemble_eps: gated``
        runs the whole attack ensemble)."""
        return replace(self, pgd=replace(self.pgd, gated_eps={k: sorted(v) for k, v in gated.items()}))

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
        known = ", ".join(sorted(set(jobs) | set(trained)))
        raise ConfigError(f"unknown job {job!r} for robustness settings (configured: {known})")
    return deep_merge(rob.get("defaults") or {}, jobs.get(job) or {})


def parse_settings(cfg: dict[str, Any]) -> RobustnessSettings:
    """A merged robustness mapping validated by the schema (:class:`~ctharden.config.schema.RobustnessJob`);
    unknown keys and bad values are :class:`ConfigError`. PGD ε lists come out sorted, without repeats."""
    m = validate_section(RobustnessJob, cfg, ("robustness",))
    opt, pgd = m.optimized, m.pgd
    planned = tuple(name for name, block in (("optimized", opt), ("pgd", pgd)) if block.max_samples == "plan")

    def cap(value: int | str | None) -> int | None:
        return value if isinstance(value, int) else None  # "plan": uncapped until with_caps

    return RobustnessSettings(
        mas_levels=list(m.mas_levels), splits=list(m.splits or SPLITS), models=m.models, max_samples=m.max_samples,
        spacing_mm=m.spacing_mm, hu_per_unit=m.hu_per_unit, fov_mm=m.fov_mm,
        random=RandomSettings(k=m.random.k, batch_size=m.random.batch_size),
        optimized=OptimizedSettings(restarts=opt.restarts, step_sigma=opt.step_sigma, tol=opt.tol, n_iter=opt.n_iter,
                                    max_samples=cap(opt.max_samples), batch_size=opt.batch_size, autocast=opt.autocast),
        pgd=PGDSettings(linf=sorted(set(pgd.linf or ())), l2=sorted(set(pgd.l2 or ())), steps=pgd.steps,
                        restarts=pgd.restarts, loss=pgd.loss, max_samples=cap(pgd.max_samples), autocast=pgd.autocast,
                        tolerance=pgd.tolerance, n_random=pgd.n_random, attacks=tuple(pgd.attacks),
                        square_queries=pgd.square_queries, ensemble_eps=pgd.ensemble_eps),
        examples=m.examples,
        intervals=IntervalSettings(level=m.intervals.level, method=m.intervals.method,
                                   bootstrap=m.intervals.bootstrap),
        planned=planned,
    )


def noise_mode(params: dict[str, Any]) -> str:
    """``robustness.noise.mode`` of the full params dict (validated; ``additive`` when absent)."""
    block = (params.get("robustness") or {}).get("noise") or {}
    return validate_section(NoiseSettings, block, ("robustness", "noise")).mode


def job_settings(params: dict[str, Any], job: str) -> RobustnessSettings:
    """The validated robustness settings of training job ``job`` (with ``robustness.noise.mode``)."""
    return replace(parse_settings(robustness_config(params, job)), noise_mode=noise_mode(params))
