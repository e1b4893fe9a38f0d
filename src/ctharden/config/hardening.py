"""Settings of the ``tune`` and ``harden`` stages (``params.yaml`` ``harden:`` and ``tune:``).

Each section has ``defaults`` deep-merged with ``jobs.<job>``. Units: every ε is in
model-input units (``[0, 1]``), in the norm ``norm``; mAs in mAs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ctharden.config import choices
from ctharden.config.params import deep_merge, section
from ctharden.config.schema import HardenJob, TuneJob, job_path, validate_section
from ctharden.core.errors import ConfigError

METHODS = choices.HARDEN_METHODS  # the hardening methods
EPS_METHODS = choices.EPS_METHODS  # the methods with a training ε


@dataclass(frozen=True)
class HardenSettings:
    """How one job's model is hardened (fine-tuned from its selected baseline model)."""

    method: str = "adv"
    norm: str = "linf"
    eps: float | None = None  # None: the tune stage's choice
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 32
    n_pgd: int = 20
    alpha: float = 4.0
    ima_beta: float = 0.5
    ima_n_binary: int = 10
    ima_eps_max: float = 0.03
    trades_beta: float = 6.0
    nps_mas: tuple[float, ...] = (10.0, 50.0, 100.0)
    adaptive_n_adapt: int = 2
    adaptive_epochs_per_step: int = 10
    adaptive_restarts: int = 1
    compare: tuple[str, ...] = ()
    compare_max_samples: int = 32

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuneSettings:
    """The Optuna search for the training ε of ``harden.method``."""

    n_trials: int = 4
    eps_low: float = 0.002
    eps_high: float = 0.05
    anchors: tuple[float, ...] = ()
    ima_seed: bool = True
    ima_quantile: float = 0.5
    eval_eps: float = 0.01
    eval_norm: str = "linf"
    min_clean_auc: float | None = None  # absolute floor on the validation AUC
    max_auc_drop: float | None = 0.05  # floor relative to the baseline's validation AUC
    min_clean_accuracy: float | None = None  # absolute floor on the validation accuracy
    max_accuracy_drop: float | None = 0.1  # floor relative to the baseline's validation accuracy
    max_samples: int | None = 32
    steps: int = 100

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merged(params: dict[str, Any], name: str, job: str) -> dict[str, Any]:
    block = section(params, name)
    if not isinstance(block, dict):
        raise ConfigError(f"{name} must be a mapping")
    return deep_merge(block.get("defaults") or {}, (block.get("jobs") or {}).get(job) or {})


def harden_settings(params: dict[str, Any], job: str) -> HardenSettings:
    """``harden.defaults`` + ``harden.jobs.<job>``, validated by the schema (:class:`HardenJob`)."""
    m = validate_section(HardenJob, _merged(params, "harden", job), job_path(section(params, "harden"), "harden", job))
    return HardenSettings(
        method=m.method, norm=m.norm, eps=m.eps, epochs=m.epochs, lr=m.lr, batch_size=m.batch_size, n_pgd=m.n_pgd,
        alpha=m.alpha, ima_beta=m.ima.beta, ima_n_binary=m.ima.n_binary, ima_eps_max=m.ima.eps_max,
        trades_beta=m.trades_beta, nps_mas=tuple(m.nps_mas), adaptive_n_adapt=m.adaptive.n_adapt,
        adaptive_epochs_per_step=m.adaptive.epochs_per_step, adaptive_restarts=m.adaptive.restarts,
        compare=tuple(m.compare), compare_max_samples=m.compare_max_samples,
    )


def tune_settings(params: dict[str, Any], job: str) -> TuneSettings:
    """``tune.defaults`` + ``tune.jobs.<job>``, validated by the schema (:class:`TuneJob`)."""
    m = validate_section(TuneJob, _merged(params, "tune", job), job_path(section(params, "tune"), "tune", job))
    return TuneSettings(**{**m.model_dump(), "anchors": tuple(m.anchors)})
