"""The one typed schema of ``params.yaml``: a pydantic model per section, and its error messages.

:func:`~ctharden.config.params.load_params` validates the merged parameters (profile and overrides
applied) with :func:`validate_params`; the settings readers (:mod:`ctharden.config.robustness`,
:mod:`ctharden.config.hardening`, :mod:`ctharden.noise.config`, :mod:`ctharden.gate.criteria`,
``ctharden.stages.train``) build their dataclasses from these models with :func:`validate_section`.
Every rejected value is a :class:`~ctharden.core.errors.ConfigError` of one line that names the key
path, the value given and what is allowed (:func:`format_errors`).

Sections with ``defaults`` and ``jobs`` (``train``, ``robustness``, ``harden``, ``tune``, ``gate``)
validate ``defaults`` on its own (what a job without an entry gets) and each job as ``defaults``
deep-merged with ``jobs.<job>``. Field defaults are what the pipeline uses when a key is absent.
Enumerated values come from :mod:`ctharden.config.choices`.
"""

from __future__ import annotations

import functools
import re
import types
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ctharden.config.choices import (
    DEVICES,
    ENSEMBLE_ATTACKS,
    NOUNS,
    AttackLoss,
    EnsembleAttack,
    ExternalOutput,
    GateKind,
    HardenMethod,
    InputScalingKind,
    IntervalMethod,
    ModelSet,
    NoiseMode,
    NoiseModelKind,
    Norm,
    NpsAttack,
    Precision,
    ProjectionPool,
    SelectOn,
    Split,
    SyntheticTask,
    TrainLoss,
)
from ctharden.config.merge import deep_merge
from ctharden.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int | float, ...]

#: The repository's parameters file (absent when the package is installed without its sources).
REPO_PARAMS = Path(__file__).resolve().parents[3] / "params.yaml"
#: Sections made of ``defaults`` deep-merged with ``jobs.<job>``.
JOB_SECTIONS = ("train", "robustness", "harden", "tune", "gate")


# --------------------------------------------------------------------------------------------------
# value types


def _no_bool(value: Any) -> Any:
    """YAML's ``true``/``false`` are not numbers (pydantic's lax mode would take them as 1/0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not true/false")
    return value


def _empty_if_none(value: Any) -> Any:
    """An empty YAML block (``key:`` with nothing under it) means the block's defaults."""
    return {} if value is None else value


def _folds(value: Any) -> int | str:
    if value == "all":
        return "all"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise PydanticCustomError("folds", "must be a positive integer or 'all'")


def _threads(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise PydanticCustomError("threads", "must be a positive integer or 'auto'")


def _device(value: Any) -> str:
    if isinstance(value, str) and (value in DEVICES or re.fullmatch(r"cuda:\d+", value)):
        return value
    raise PydanticCustomError("device", "must be one of {choices} (or cuda:N)", {"choices": ", ".join(DEVICES)})


Int = Annotated[int, BeforeValidator(_no_bool)]
PosInt = Annotated[Int, Field(gt=0)]
NonNegInt = Annotated[Int, Field(ge=0)]
Number = Annotated[float, BeforeValidator(_no_bool), AllowInfNan(False)]
PosNumber = Annotated[Number, Field(gt=0)]
NonNegNumber = Annotated[Number, Field(ge=0)]
Fraction = Annotated[Number, Field(ge=0, le=1)]
Folds = Annotated[int | str, PlainValidator(_folds)]
Threads = Annotated[int | str, PlainValidator(_threads)]
DeviceName = Annotated[str, PlainValidator(_device)]
#: ``{level: threshold}`` of the gate (mAs or ε -> threshold); a null threshold disables it.
LevelTable = dict[Number, Number | None]


class _Model(BaseModel):
    """Unknown keys are errors; validated settings are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _merge_jobs(data: Any) -> Any:
    """``jobs.<job>`` -> ``defaults`` deep-merged with it (left as is where not mappings)."""
    if not isinstance(data, Mapping):
        return data
    defaults, jobs = data.get("defaults"), data.get("jobs")
    if jobs is None or not isinstance(jobs, Mapping):
        return data
    base = defaults if isinstance(defaults, Mapping) else {}
    merged = {name: deep_merge(base, job) if isinstance(job, Mapping) else base if job is None else job
              for name, job in jobs.items()}
    return {**data, "jobs": merged}


# --------------------------------------------------------------------------------------------------
# top-level sections


class SplitSettings(_Model):
    """``split``: the patient-grouped hold-out test split and the folds over the rest."""

    test_fraction: Annotated[Number, Field(ge=0, lt=1)] = 0.2
    n_folds: PosInt = 5


class PathSettings(_Model):
    """``paths``: where every stage writes (relative to the working directory)."""

    artifacts: str
    reports: str
    plots: str
    datasets: str
    validation: str
    metrics: str


class MlflowSettings(_Model):
    """``mlflow``: tracking database, artifact root, experiment name."""

    db: str = "mlflow.db"
    artifacts: str = "mlruns"
    experiment: str = "ctharden"


class DaskSettings(_Model):
    """``dask``: the cluster of ``--runner dask`` (an existing scheduler, else a LocalCluster)."""

    address: str | None = None
    n_workers: PosInt | None = None


# ---- datasets: the keyword arguments of the ingest functions (ctharden.data.*)


class LidcDataset(_Model):
    """``kind: lidc``: :func:`ctharden.data.lidc.ingest_lidc`.

    ``mode``: ``3d`` (``nodule3d`` cubes of ``cube_size``) or ``2d`` (``nodule2d`` patches of ``size``,
    one per reader mark). ``spacing_mm``: voxel/pixel size in mm; unset = 1.0 (3d) or 0.7 (2d).
    """

    kind: Literal["lidc"]
    root: str
    mode: Literal["3d", "2d"] = "3d"
    cube_size: PosInt = 32
    spacing_mm: PosNumber | None = None
    size: PosInt = 45
    centroid_tol_mm: PosNumber = 5.0
    strict: StrictBool = False


class Lidc2dDataset(_Model):
    """``kind: lidc2d``: :func:`ctharden.data.lidc2d.ingest_lidc2d` (the LIDC-IDRI crop release)."""

    kind: Literal["lidc2d"]
    root: str
    spacing_mm: PosNumber = 0.7
    size: PosInt = 45
    limit: PosInt | None = None


class CovidDataset(_Model):
    """``kind: covid``: :func:`ctharden.data.covid.ingest_covid`."""

    kind: Literal["covid"]
    root: str
    size: PosInt = 224
    block_size: PosInt = 25
    skip_bad: StrictBool = False


class SyntheticDataset(_Model):
    """``kind: synthetic``: :func:`ctharden.data.synthetic.generate_synthetic`."""

    kind: Literal["synthetic"]
    task: SyntheticTask
    n: PosInt
    size: PosInt = 224
    malignant_fraction: Fraction = 0.35


Dataset = Annotated[LidcDataset | Lidc2dDataset | CovidDataset | SyntheticDataset, Field(discriminator="kind")]
DATASET_MODELS: dict[str, type[LidcDataset | Lidc2dDataset | CovidDataset | SyntheticDataset]] = {
    "lidc": LidcDataset, "lidc2d": Lidc2dDataset, "covid": CovidDataset, "synthetic": SyntheticDataset}


# ---- train


class TrainDefaults(_Model):
    """``train.defaults``: the loop knobs (:class:`ctharden.training.loop.TrainConfig`) and the job's
    model, data and runtime; a job (:class:`TrainJob`) must name its dataset and architecture."""

    epochs: PosInt = 10
    batch_size: PosInt = 32
    lr: PosNumber = 1e-4
    weight_decay: NonNegNumber = 0.0
    loss: TrainLoss = "mse"
    balanced_sampling: StrictBool = True
    shift_vox: NonNegNumber = 5.0
    rotate_deg: NonNegNumber = 15.0
    select_on: SelectOn = "val_auc"
    early_stopping_patience: NonNegInt = 0
    dataset: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    window_hu: tuple[Number, Number] | None = None
    folds: Folds = "all"
    device: DeviceName = "auto"
    precision: Precision = "auto"
    threads: Threads = "auto"
    log_system_metrics: StrictBool = True


class TrainJob(TrainDefaults):
    """``train.defaults`` deep-merged with ``train.jobs.<job>``."""

    dataset: str
    arch: str


class TrainSection(_Model):
    """``train``."""

    defaults: Annotated[TrainDefaults, BeforeValidator(_empty_if_none)]
    jobs: dict[str, TrainJob]

    _merge = model_validator(mode="before")(_merge_jobs)


# ---- robustness


class RandomBlock(_Model):
    """``robustness.random``: random NPS attacks."""

    k: PosInt = 5
    batch_size: PosInt = 256


class OptimizedBlock(_Model):
    """``robustness.optimized``: Algorithm 1's optimised NPS attack."""

    restarts: PosInt = 2
    step_sigma: PosNumber = 0.25
    tol: NonNegNumber = 1e-3
    n_iter: PosInt = 10
    max_samples: PosInt | Literal["plan"] | None = None  # plan: the gate's sample planner sets it
    batch_size: PosInt = 64
    autocast: StrictBool = True


class PgdBlock(_Model):
    """``robustness.pgd``: 100-PGD; ε in model-input units."""

    linf: list[PosNumber] | None = None
    l2: list[PosNumber] | None = None
    steps: PosInt = 100
    restarts: PosInt = 1
    loss: AttackLoss = "margin"
    max_samples: PosInt | Literal["plan"] | None = None  # plan: the gate's sample planner sets it
    autocast: StrictBool = True
    tolerance: PosNumber = 0.05
    n_random: PosInt = 10
    attacks: list[EnsembleAttack] = Field(default_factory=lambda: cast("list[EnsembleAttack]", list(ENSEMBLE_ATTACKS)),
                                         min_length=1)

    @field_validator("attacks")
    @classmethod
    def _distinct_attacks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists an attack twice: {v}")
        return v
    square_queries: PosInt = 1000
    ensemble_eps: Literal["gated", "all"] = "gated"  # gated: the members after PGD at the gate's ε only


class InputScaling(_Model):
    """``input`` of a model contract: how HU become what the model takes.

    ``window``: ``clamp((hu - lo) / (hi - lo), 0, 1)`` with ``window_hu = [lo, hi]``; ``zscore``:
    ``(hu - mean_hu) / std_hu`` (``window_hu`` then bounds the attack space, default the whole HU
    range of CT); ``display``: the data are already display values in [0, 1] (``window_hu`` null).
    """

    kind: InputScalingKind = "window"
    window_hu: tuple[Number, Number] | None = None
    mean_hu: Number | None = None
    std_hu: PosNumber | None = None

    @model_validator(mode="after")
    def _consistent(self) -> InputScaling:
        if self.window_hu is not None and not self.window_hu[0] < self.window_hu[1]:
            raise ValueError(f"window_hu must be [lo, hi] with lo < hi, got {list(self.window_hu)}")
        if self.kind == "window" and self.window_hu is None:
            raise ValueError("kind window needs window_hu: [lo, hi] (HU mapped to 0 and 1)")
        if self.kind == "zscore" and (self.mean_hu is None or self.std_hu is None):
            raise ValueError("kind zscore needs mean_hu and std_hu (in HU)")
        if self.kind != "zscore" and (self.mean_hu is not None or self.std_hu is not None):
            raise ValueError(f"mean_hu / std_hu apply to kind zscore only, not {self.kind}")
        if self.kind == "display" and self.window_hu is not None:
            raise ValueError("kind display takes data already in [0, 1]: window_hu must be null")
        return self


class OutputSpec(_Model):
    """``output`` of a model contract: ``logit`` ``(N,)``/``(N, 1)``; ``logits2`` ``(N, 2)``;
    ``probability`` of the positive class ``(N,)``/``(N, 1)``; ``classes``: ``(N, C)`` logits with
    the positive class at ``positive_index`` (also the positive column of ``logits2``)."""

    kind: ExternalOutput = "logit"
    positive_index: NonNegInt = 1
    classes: PosInt | None = None  # C of a ``classes`` output (checked by the dry run)

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        if self.kind == "logits2" and self.positive_index > 1:
            raise ValueError(f"logits2 has columns 0 and 1; positive_index {self.positive_index} is out of range")
        if self.kind == "classes" and self.classes is not None and self.positive_index >= self.classes:
            raise ValueError(f"positive_index {self.positive_index} is not a class of {self.classes}")
        return self


class ModelContract(_Model):
    """What a model ctharden did not build expects and returns (``--contract FILE.yaml``).

    ``input_shape``: the spatial shape ``(H, W)`` or ``(D, H, W)`` in pixels; ``channels``: the
    single CT channel is repeated to this many; ``spacing_mm``: the pixel spacing the model was
    trained at (data are resampled to it at ingest).
    """

    spatial_dims: Literal[2, 3]
    input_shape: list[PosInt]
    channels: PosInt = 1
    input: InputScaling = Field(default_factory=lambda: InputScaling(window_hu=(-1000.0, 400.0)))
    output: OutputSpec = Field(default_factory=OutputSpec)
    spacing_mm: PosNumber | None = None

    @model_validator(mode="after")
    def _shape(self) -> ModelContract:
        if len(self.input_shape) != self.spatial_dims:
            raise ValueError(f"input_shape {self.input_shape} has {len(self.input_shape)} axes; "
                             f"spatial_dims is {self.spatial_dims}")
        return self


class NoiseSettings(_Model):
    """``robustness.noise``: the NPS model (:class:`ctharden.noise.config.NoiseConfig`)."""

    model: NoiseModelKind = "parametric"
    ref_mas: PosNumber | None = None
    ref_kvp: PosNumber = 120.0
    sigma_ref_hu: PosNumber = 12.0
    peak_freq_per_mm: PosNumber = 0.30
    ramp_exponent: PosNumber = 1.0
    rolloff_exponent: PosNumber = 3.0
    table: str | None = None
    projection_pool: ProjectionPool = "all"
    mode: NoiseMode = "additive"

    @model_validator(mode="after")
    def _table_given(self) -> NoiseSettings:
        if self.model == "table" and not self.table:
            raise ValueError("model is 'table' but table is not set")
        return self


class IntervalsBlock(_Model):
    """``robustness.intervals``: the two-sided confidence intervals the evaluation reports
    (:mod:`ctharden.evaluation.intervals`): rates by ``method``, AUC by DeLong with a stratified
    bootstrap of ``bootstrap`` resamples as a check (0: no bootstrap)."""

    level: Annotated[Number, Field(gt=0.5, lt=1)] = 0.95
    method: IntervalMethod = "clopper-pearson"
    bootstrap: NonNegInt = 2000


class RobustnessJob(_Model):
    """``robustness.defaults`` deep-merged with ``robustness.jobs.<job>``."""

    mas_levels: Annotated[list[PosNumber], Field(min_length=1)]
    splits: list[Split] | None = None
    models: ModelSet = "selected"
    max_samples: PosInt | None = None
    spacing_mm: PosNumber = 1.0
    hu_per_unit: PosNumber | None = None
    fov_mm: PosNumber | None = None
    random: Annotated[RandomBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=RandomBlock)
    optimized: Annotated[OptimizedBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=OptimizedBlock)
    pgd: Annotated[PgdBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=PgdBlock)
    examples: NonNegInt = 2
    intervals: Annotated[IntervalsBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=IntervalsBlock)

    @field_validator("mas_levels")
    @classmethod
    def _distinct(cls, levels: list[float]) -> list[float]:
        dup = sorted({m for m in levels if levels.count(m) > 1})
        if dup:
            raise ValueError(f"must list each mAs once (duplicates: {dup})")
        return levels

    @model_validator(mode="after")
    def _some_eps(self) -> RobustnessJob:
        if not self.pgd.linf and not self.pgd.l2:
            raise ValueError("pgd needs ε values under linf and/or l2")
        return self


class RobustnessSection(_Model):
    """``robustness``."""

    defaults: Annotated[RobustnessJob, BeforeValidator(_empty_if_none)]
    jobs: Annotated[dict[str, RobustnessJob], BeforeValidator(_empty_if_none)] = Field(default_factory=dict)
    noise: Annotated[NoiseSettings, BeforeValidator(_empty_if_none)] = Field(default_factory=NoiseSettings)

    _merge = model_validator(mode="before")(_merge_jobs)


# ---- harden and tune


class ImaBlock(_Model):
    """``harden.ima``: IMA's margin estimation."""

    eps_max: PosNumber = 0.03
    beta: Fraction = 0.5
    n_binary: PosInt = 10


class AdaptiveBlock(_Model):
    """``harden.adaptive``: shen 2020's Algorithm 2."""

    n_adapt: PosInt = 2
    epochs_per_step: PosInt = 10
    restarts: PosInt = 1


class HardenJob(_Model):
    """``harden.defaults`` deep-merged with ``harden.jobs.<job>``."""

    method: HardenMethod = "adv"
    norm: Norm = "linf"
    eps: NonNegNumber | None = None
    epochs: PosInt = 5
    lr: PosNumber = 1e-4
    batch_size: PosInt = 32
    n_pgd: PosInt = 20
    alpha: PosNumber = 4.0
    ima: Annotated[ImaBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=ImaBlock)
    trades_beta: PosNumber = 6.0
    nps_mas: list[PosNumber] = Field(default_factory=lambda: [10.0, 50.0, 100.0])
    adaptive: Annotated[AdaptiveBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=AdaptiveBlock)
    compare: list[HardenMethod] = Field(default_factory=list)
    compare_max_samples: PosInt = 32


class TuneJob(_Model):
    """``tune.defaults`` deep-merged with ``tune.jobs.<job>``."""

    n_trials: PosInt = 4
    eps_low: PosNumber = 0.002
    eps_high: PosNumber = 0.05
    anchors: list[PosNumber] = Field(default_factory=list)
    ima_seed: StrictBool = True
    ima_quantile: Annotated[Number, Field(gt=0, lt=1)] = 0.5
    eval_eps: PosNumber = 0.01
    eval_norm: Norm = "linf"
    min_clean_auc: Fraction | None = None
    max_auc_drop: Fraction | None = 0.05
    min_clean_accuracy: Fraction | None = None
    max_accuracy_drop: Fraction | None = 0.1
    max_samples: PosInt | None = 32
    steps: PosInt = 100

    @model_validator(mode="after")
    def _consistent(self) -> TuneJob:
        lo, hi = self.eps_low, self.eps_high
        if not lo < hi:
            raise ValueError(f"eps_low must be below eps_high, got {lo} >= {hi}")
        if any(not lo <= a <= hi for a in self.anchors):
            raise ValueError(f"anchors must lie in [eps_low, eps_high] = [{lo}, {hi}], got {self.anchors}")
        if self.min_clean_auc is None and self.max_auc_drop is None:
            raise ValueError("tune needs a clean-AUC floor: set min_clean_auc and/or max_auc_drop")
        return self


class HardenSection(_Model):
    """``harden``."""

    defaults: Annotated[HardenJob, BeforeValidator(_empty_if_none)] = Field(default_factory=HardenJob)
    jobs: Annotated[dict[str, HardenJob], BeforeValidator(_empty_if_none)] = Field(default_factory=dict)

    _merge = model_validator(mode="before")(_merge_jobs)


class TuneSection(_Model):
    """``tune``."""

    defaults: Annotated[TuneJob, BeforeValidator(_empty_if_none)] = Field(default_factory=TuneJob)
    jobs: Annotated[dict[str, TuneJob], BeforeValidator(_empty_if_none)] = Field(default_factory=dict)

    _merge = model_validator(mode="before")(_merge_jobs)


# ---- gate


class ChampionBlock(_Model):
    """``gate.champion``: when a new version replaces the champion (paired tests on the same
    samples, :mod:`ctharden.gate.champion`): better on the primary criterion by an exact McNemar
    test at ``alpha``, clean AUC non-inferior within ``max_clean_auc_drop`` (paired DeLong)."""

    alpha: Annotated[Number, Field(gt=0, lt=1)] = 0.05
    max_clean_auc_drop: Number = 0.02


DEFAULT_PLAN_MARGIN: dict[GateKind, float] = {"clean_auc": 0.03, "san_rate": 10.0, "robust_accuracy": 0.10}


class PlanBlock(_Model):
    """``gate.plan``: what the sample-size planner (:mod:`ctharden.gate.planner`) assumes. A model
    whose true rate is ``margin`` better than the threshold (in the criterion's units: AUC, % for
    SAN/N, a share for robust accuracy) must be decided *pass* with probability ``power``."""

    power: Annotated[Number, Field(gt=0, lt=1)] = 0.8
    margin: dict[GateKind, PosNumber] = Field(default_factory=lambda: dict(DEFAULT_PLAN_MARGIN))


class GateJob(_Model):
    """``gate.defaults`` deep-merged with ``gate.jobs.<job>``; which criteria these give, and whether
    ``primary`` is one of them, is decided by :func:`ctharden.gate.criteria.gate_settings`."""

    confidence: Annotated[Number, Field(gt=0.5, lt=1)] = 0.95
    method: IntervalMethod = "clopper-pearson"
    plan: Annotated[PlanBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=PlanBlock)
    min_clean_auc: Number | None = None
    max_san_rate: dict[NpsAttack, LevelTable | None] | None = None
    min_robust_accuracy: dict[Norm, LevelTable | None] | None = None
    sanity: StrictBool = True
    primary: str | None = None
    champion: Annotated[ChampionBlock, BeforeValidator(_empty_if_none)] = Field(default_factory=ChampionBlock)
    regression: dict[GateKind, Number] | None = None
    model_name: str = "ctharden-{job}"

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, template: str) -> str:
        try:
            name = template.format(job="job")
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"must be a name with at most a {{job}} placeholder, got {template!r}") from None
        if not name or "/" in name or "@" in name:
            raise ValueError(f"{template!r} is not a valid registered-model name (no '/', '@', not empty)")
        return template


class GateSection(_Model):
    """``gate``."""

    defaults: Annotated[GateJob, BeforeValidator(_empty_if_none)] = Field(default_factory=GateJob)
    jobs: Annotated[dict[str, GateJob], BeforeValidator(_empty_if_none)] = Field(default_factory=dict)

    _merge = model_validator(mode="before")(_merge_jobs)


class Settings(_Model):
    """The whole of ``params.yaml`` after the profile and the overrides are applied."""

    profile: str = "default"
    seed: NonNegInt
    split: SplitSettings
    paths: PathSettings
    datasets: dict[str, Dataset]
    mlflow: Annotated[MlflowSettings, BeforeValidator(_empty_if_none)] = Field(default_factory=MlflowSettings)
    train: TrainSection
    robustness: RobustnessSection | None = None
    harden: HardenSection | None = None
    tune: TuneSection | None = None
    gate: GateSection | None = None
    dask: Annotated[DaskSettings, BeforeValidator(_empty_if_none)] = Field(default_factory=DaskSettings)


# --------------------------------------------------------------------------------------------------
# validation and its one-line errors


def validate_section(model: type[M], data: Any, prefix: Sequence[str] = ()) -> M:
    """``model`` validated from ``data``; a :class:`ConfigError` naming ``prefix`` + the key path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, prefix)) from None


def job_path(block: Any, name: str, job: str) -> tuple[str, ...]:
    """Where a job's merged settings are reported: ``<name>.jobs.<job>`` when section ``block``
    has an entry for it, else ``<name>.defaults`` (what the job gets)."""
    jobs = block.get("jobs") if isinstance(block, Mapping) else None
    return (name, "jobs", job) if isinstance(jobs, Mapping) and job in jobs else (name, "defaults")


def validate_params(params: Mapping[str, Any], where: str = "params") -> Settings:
    """The merged parameters validated as :class:`Settings` (also: each job's dataset is configured)."""
    try:
        settings = Settings.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_errors(exc, Settings)}") from None
    for job, cfg in settings.train.jobs.items():
        if cfg.dataset not in settings.datasets:
            raise ConfigError(f"{where}: train.jobs.{job}.dataset = {cfg.dataset!r}: must be a configured dataset "
                              f"({', '.join(settings.datasets)})")
    return settings


def _unwrap(tp: Any) -> Any:
    """``tp`` without ``Annotated`` and ``| None``."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(model: type[BaseModel], loc: Loc) -> tuple[list[str | int | float], Any]:
    """The displayed path of ``loc`` (tagged-union tags dropped) and the type found there."""
    tp: Any = model
    shown: list[str | int | float] = []
    for part in loc:
        cur = _unwrap(tp)
        origin = get_origin(cur)
        if _is_model(cur) and isinstance(part, str) and part in cur.model_fields:
            tp = cur.model_fields[part].annotation
        elif origin is dict:
            tp = get_args(cur)[1]
        elif origin is list:
            tp = get_args(cur)[0]
        elif origin is tuple and isinstance(part, int):
            args = get_args(cur)
            tp = args[0] if len(args) == 2 and args[1] is Ellipsis else args[min(part, len(args) - 1)]
        elif origin in (Union, types.UnionType) and all(_is_model(a) for a in get_args(cur)):
            tags = {_tag(a): a for a in get_args(cur)}
            if part in tags:
                tp = tags[part]
                continue  # the discriminator's tag: not part of the key path
            tp = None
        else:
            tp = None
        shown.append(part)
    return shown, tp


def _tag(member: Any) -> Any:
    field = member.model_fields.get("kind")
    return get_args(field.annotation)[0] if field is not None else None


def _dotted(parts: Sequence[str | int | float]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if not isinstance(p, str) else (f".{p}" if out else p)
    return out


def _setting(parts: Sequence[str | int | float]) -> list[str | int | float]:
    """``harden.jobs.<job>.x`` and ``harden.defaults.x`` -> ``harden.x`` (the setting's name)."""
    if len(parts) >= 2 and parts[0] in JOB_SECTIONS:
        if parts[1] == "defaults":
            return [parts[0], *parts[2:]]
        if parts[1] == "jobs" and len(parts) >= 3:
            return [parts[0], *parts[3:]]
    return list(parts)


def _choices(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _kind(tp: Any) -> str:
    leaf = _unwrap(tp)
    return "an integer" if leaf is int else "a number" if leaf is float else "a value"


def _show(value: Any) -> str | None:
    """``value`` for the message, or None where it is a whole block (not worth repeating)."""
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return None


def _describe(err: Mapping[str, Any], model: type[BaseModel], prefix: Sequence[str]) -> str:
    """One error of ``ValidationError.errors()`` as ``path = value: <setting> must be <allowed>``."""
    loc: Loc = tuple(err["loc"])
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if loc and loc[-1] == "[key]":
        parts, tp = _walk(model, loc[:-2])
        path = _dotted([*prefix, *parts])
        key = loc[-2]
        if kind == "literal_error":
            keys = tuple(_choices(str(ctx.get("expected", ""))))
            noun = NOUNS.get(keys, "keys")
            return f"{path}: unknown {noun} [{key!r}] (allowed: {', '.join(keys)})"
        key_type = get_args(_unwrap(tp))[0] if get_origin(_unwrap(tp)) is dict else None
        return f"{path}: key {key!r} must be {_kind(key_type)}"
    parts, tp = _walk(model, loc)
    full = [*prefix, *parts]
    path, setting = _dotted(full), _dotted(_setting(full))
    subject = "" if setting == path else f"{setting} "
    shown = _show(value)
    given = f" = {shown}" if shown is not None else ""
    if kind == "extra_forbidden":
        _, parent = _walk(model, loc[:-1])
        parent = _unwrap(parent)
        known = f"; known: {', '.join(parent.model_fields)}" if _is_model(parent) else ""
        return f"{path}{given}: unknown key (unknown keys are refused here{known})"
    if kind == "missing":
        return f"{path}: missing; {subject}is required"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(ctx.get("discriminator", "'kind'")).strip("'")
        tags = _choices(str(ctx.get("expected_tags", "")))
        if not tags:
            union = _unwrap(tp)
            tags = [str(_tag(a)) for a in get_args(union)] if get_origin(union) in (Union, types.UnionType) else []
        got = f" = {ctx['tag']!r}" if "tag" in ctx else ""
        return f"{path}.{field}{got}: must be one of {', '.join(tags)}"
    if kind in ("value_error", "assertion_error"):
        message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if message.startswith("must "):
            return f"{path}{given}: {subject}{message}"
        return f"{path}: {message}"
    ops = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}
    simple = {
        "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
        "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
        "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
        "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
        "list_type": "a list", "tuple_type": "a list",
    }
    if kind in ops:
        name, op = ops[kind]
        allowed = f"{_kind(tp)} {op} {ctx.get(name)}"
    elif kind == "literal_error":
        allowed = f"one of {', '.join(_choices(str(ctx.get('expected', ''))))}"
    elif kind in simple:
        allowed = simple[kind]
    elif kind == "bool_not_number":
        allowed = f"{_kind(tp) if _kind(tp) != 'a value' else 'a number'}, not true/false"
    elif kind == "too_short":
        allowed = f"a list of at least {ctx.get('min_length')} item(s)"
    elif kind == "too_long":
        allowed = f"a list of at most {ctx.get('max_length')} item(s)"
    else:
        message = str(err["msg"])
        if message.startswith("must "):
            return f"{path}{given}: {subject}{message}"
        return f"{path}{given}: {message[:1].lower()}{message[1:]}"
    return f"{path}{given}: {subject}must be {allowed}"


def format_errors(exc: ValidationError, model: type[BaseModel], prefix: Sequence[str] = ()) -> str:
    """The first error of ``exc`` as one line (key path, value given, what is allowed), saying how
    many more there are."""
    errors = exc.errors(include_url=False)
    line = _describe(errors[0], model, prefix)
    # a bad default shows again in every job merged from it: count it once
    seen = {(tuple(_setting(_walk(model, tuple(e["loc"]))[0])), e["type"], _show(e.get("input"))) for e in errors}
    more = len(seen) - 1
    return line + (f" (and {more} more error{'s' if more > 1 else ''})" if more else "")


# --------------------------------------------------------------------------------------------------
# the ingest defaults (the CLI's ``ingest`` commands)

#: What the schema cannot default (required keys of ``params.yaml``): the ingest functions' own.
INGEST_FALLBACKS: dict[str, Any] = {"seed": 0, "n": 200}


def _schema_defaults(kind: str) -> dict[str, Any]:
    fields = {**DATASET_MODELS[kind].model_fields, **SplitSettings.model_fields}
    out = {n: f.default for n, f in fields.items() if not f.is_required() and n != "kind"}
    return {**INGEST_FALLBACKS, **out} if kind == "synthetic" else {"seed": INGEST_FALLBACKS["seed"], **out}


def _params_file() -> Path | None:
    for path in (REPO_PARAMS, Path("params.yaml")):
        if path.is_file():
            return path
    return None


@functools.cache
def _top_level(file: Path) -> Settings | None:
    """``file``'s top level (the default profile) validated, or None (with a warning) if it is not valid."""
    try:
        raw = yaml.safe_load(file.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError("top level must be a mapping")
        raw.pop("profiles", None)
        return validate_params({**raw, "profile": "default"}, where=str(file))
    except (OSError, yaml.YAMLError, ConfigError) as exc:
        warnings.warn(f"{file}: {exc}; the ingest commands use the schema's defaults", stacklevel=3)
        return None


def ingest_defaults(kind: str, path: str | Path | None = None) -> dict[str, Any]:
    """Keyword defaults of ``ctharden ingest <kind>``: the first ``kind`` dataset of ``params.yaml``'s
    top level (the default profile), ``split`` and ``seed``, as the pipeline's ingest stage uses them.

    ``path``: the parameters file; default the repository's ``params.yaml``, else ``./params.yaml``.
    Without one (or with an invalid one, which warns), the schema's field defaults.
    """
    if kind not in DATASET_MODELS:
        raise ConfigError(f"unknown dataset kind {kind!r} (choose from {', '.join(DATASET_MODELS)})")
    out = _schema_defaults(kind)
    file = Path(path) if path is not None else _params_file()
    settings = None if file is None else _top_level(file.resolve())
    if settings is None:
        return out
    spec = next((d for d in settings.datasets.values() if d.kind == kind), None)
    if spec is not None:
        out.update(spec.model_dump(exclude={"kind", "root", "task"}))
    return {**out, **settings.split.model_dump(), "seed": settings.seed}
