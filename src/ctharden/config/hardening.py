"""Settings of the ``tune`` and ``harden`` stages (``params.yaml`` ``harden:`` and ``tune:``).

Each section has ``defaults`` deep-merged with ``jobs.<job>``. Units: every ε is in
model-input units (``[0, 1]``), in the norm ``norm``; mAs in mAs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ctharden.config.params import deep_merge, section
from ctharden.core.errors import ConfigError

METHODS: tuple[str, ...] = ("adv", "ima", "rand", "trades", "nps", "adaptive")
EPS_METHODS: tuple[str, ...] = ("adv", "ima", "rand", "trades")  # methods with a training ε


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


def _flatten(raw: dict[str, Any], nested: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in raw.items() if k not in nested}
    for key in nested:
        sub = raw.get(key) or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"harden.{key} must be a mapping")
        out.update({f"{key}_{k}": v for k, v in sub.items()})
    return out


def _positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> Any:
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def harden_settings(params: dict[str, Any], job: str) -> HardenSettings:
    """``harden.defaults`` + ``harden.jobs.<job>``, validated."""
    raw = _flatten(_merged(params, "harden", job), ("ima", "adaptive"))
    known = set(HardenSettings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"harden ({job}): unknown keys {sorted(unknown)}")
    s = HardenSettings(**raw)
    if s.method not in METHODS:
        raise ConfigError(f"harden.method must be one of {list(METHODS)}, got {s.method!r}")
    if s.norm not in ("linf", "l2"):
        raise ConfigError(f"harden.norm must be linf or l2, got {s.norm!r}")
    bad = [m for m in s.compare if m not in METHODS]
    if bad:
        raise ConfigError(f"harden.compare: unknown methods {bad} (choose from {list(METHODS)})")
    ints = ("epochs", "batch_size", "n_pgd", "ima_n_binary", "adaptive_n_adapt", "adaptive_epochs_per_step",
            "adaptive_restarts", "compare_max_samples")
    vals = {n: _positive(f"harden.{n}", getattr(s, n), integer=True) for n in ints}
    floats = {n: _positive(f"harden.{n}", getattr(s, n)) for n in ("lr", "alpha", "ima_eps_max", "trades_beta")}
    beta = float(s.ima_beta)
    if not 0 <= beta <= 1:
        raise ConfigError(f"harden.ima.beta must lie in [0, 1], got {s.ima_beta!r}")
    eps = None if s.eps is None else _positive("harden.eps", s.eps, allow_zero=True)
    mas = tuple(_positive("harden.nps_mas", m) for m in s.nps_mas)
    return HardenSettings(**{**asdict(s), **vals, **floats, "ima_beta": beta, "eps": eps, "nps_mas": mas,
                             "compare": tuple(s.compare)})


def tune_settings(params: dict[str, Any], job: str) -> TuneSettings:
    """``tune.defaults`` + ``tune.jobs.<job>``, validated."""
    raw = _merged(params, "tune", job)
    unknown = set(raw) - set(TuneSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"tune ({job}): unknown keys {sorted(unknown)}")
    s = TuneSettings(**raw)
    lo, hi = _positive("tune.eps_low", s.eps_low), _positive("tune.eps_high", s.eps_high)
    if not lo < hi:
        raise ConfigError(f"tune.eps_low must be below tune.eps_high, got {lo} >= {hi}")
    anchors = tuple(_positive("tune.anchors", a) for a in s.anchors)
    if any(not lo <= a <= hi for a in anchors):
        raise ConfigError(f"tune.anchors must lie in [eps_low, eps_high] = [{lo}, {hi}], got {list(anchors)}")
    if s.eval_norm not in ("linf", "l2"):
        raise ConfigError(f"tune.eval_norm must be linf or l2, got {s.eval_norm!r}")
    if s.min_clean_auc is None and s.max_auc_drop is None:
        raise ConfigError("tune needs a clean-AUC floor: set min_clean_auc and/or max_auc_drop")
    if s.min_clean_auc is not None and not 0 <= float(s.min_clean_auc) <= 1:
        raise ConfigError(f"tune.min_clean_auc must lie in [0, 1], got {s.min_clean_auc!r}")
    for name in ("max_auc_drop", "min_clean_accuracy", "max_accuracy_drop"):
        v = getattr(s, name)
        if v is not None and not 0 <= float(v) <= 1:
            raise ConfigError(f"tune.{name} must lie in [0, 1], got {v!r}")
    if not 0 < float(s.ima_quantile) < 1:
        raise ConfigError(f"tune.ima_quantile must lie in (0, 1), got {s.ima_quantile!r}")
    return TuneSettings(
        n_trials=_positive("tune.n_trials", s.n_trials, integer=True), eps_low=lo, eps_high=hi, anchors=anchors,
        ima_seed=bool(s.ima_seed), ima_quantile=float(s.ima_quantile),
        eval_eps=_positive("tune.eval_eps", s.eval_eps), eval_norm=s.eval_norm,
        min_clean_auc=None if s.min_clean_auc is None else float(s.min_clean_auc),
        max_auc_drop=None if s.max_auc_drop is None else float(s.max_auc_drop),
        min_clean_accuracy=None if s.min_clean_accuracy is None else float(s.min_clean_accuracy),
        max_accuracy_drop=None if s.max_accuracy_drop is None else float(s.max_accuracy_drop),
        max_samples=None if s.max_samples is None else _positive("tune.max_samples", s.max_samples, integer=True),
        steps=_positive("tune.steps", s.steps, integer=True),
    )
