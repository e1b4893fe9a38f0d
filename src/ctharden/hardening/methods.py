"""Hardening a trained job's model: the one implementation behind the ``tune`` and ``harden``
stages, the CLI and the flow.

The baseline is the job's selected fold model (``artifacts/models/<job>/model.pt``). Hardening
fine-tunes a copy of it on the *training folds of that model* (the training split minus its
validation fold; the test split is never used), so the validation fold stays free for the Optuna
objective (:mod:`ctharden.stages.tune`) and the test split for the evaluation. No augmentation: IMA keeps
one margin per stored sample (ma 2020, appendix A), and every method gets the same data.

Methods (``harden.method`` and ``harden.compare``): ``adv`` (20-PGD "adv ε"), ``ima``
(:func:`ctharden.hardening.ima.fit`, ε = its ε_max), ``rand`` ("rand ε"), ``trades``, ``nps`` (random NPS
noise at ``nps_mas``; no ε) and ``adaptive`` (shen 2020 Algorithm 2; no ε). See
:mod:`ctharden.hardening.objectives`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ctharden.config.hardening import EPS_METHODS, HardenSettings
from ctharden.config.robustness import job_settings
from ctharden.core.device import select_runtime
from ctharden.core.errors import ConfigError
from ctharden.core.seeding import derive_seed
from ctharden.data.arrays import ArraySet
from ctharden.evaluation.clean import binary_metrics
from ctharden.evaluation.robustness import stratified_subset
from ctharden.hardening import ima
from ctharden.hardening.adaptive import adaptive_train
from ctharden.hardening.objectives import AdvPGD, BatchLoss, NPSNoise, RandNoise, Trades, fit_with
from ctharden.models.predict import predict_scores
from ctharden.noise.config import noise_model
from ctharden.training.data import balanced_sampler

log = logging.getLogger(__name__)


@dataclass
class HardenData:
    """The data of one job's hardening, in model-input units: ``train`` (fine-tuning set), ``val``
    (the selected model's validation fold; None with a single fold), ``test`` (held out), and
    ``full`` (the whole dataset, loaded once: adaptive training attacks and re-evaluates on it)."""

    train: ArraySet
    val: ArraySet | None
    test: ArraySet
    full: ArraySet

    @property
    def info(self) -> dict[str, Any]:
        """The dataset's ``dataset.json``."""
        return self.full.info


@dataclass
class NoiseContext:
    """What the NPS-noise method needs: pixel spacing (mm), HU per input unit and the NPS model."""

    spacing_mm: float
    hu_per_unit: float
    nps: Any


def hardening_data(data: ArraySet, selected_fold: int) -> HardenData:
    """The hardening sets of the model selected on fold ``selected_fold`` (see
    :meth:`~ctharden.data.arrays.ArraySet.fold_split`) of the whole dataset ``data``."""
    train, val, test = data.fold_split(selected_fold)
    return HardenData(train, val, test, data)


def make_loader(data: ArraySet, batch_size: int, seed: int) -> DataLoader[Any]:
    """``(x, y, idx)`` batches, class-balanced sampling (as the baseline), reproducible from ``seed``."""
    ds = TensorDataset(data.x, data.y, torch.arange(len(data)))
    return DataLoader(ds, batch_size=batch_size, sampler=balanced_sampler(data.y, seed))


def method_eps(method: str, hs: HardenSettings, eps: float | None) -> float | None:
    """The training ε of ``method``: IMA's is its ε_max; adv/rand/trades take ``eps``; others none."""
    if method == "ima":
        return hs.ima_eps_max if eps is None else eps
    if method in EPS_METHODS:
        if eps is None:
            raise ConfigError(f"method {method!r} needs a training eps (run the tune stage or set harden.eps)")
        return float(eps)
    return None


def harden_model(
    baseline: nn.Module,
    method: str,
    eps: float | None,
    data: HardenData,
    hs: HardenSettings,
    *,
    seed: int,
    noise: NoiseContext | None = None,
    adaptive_context: dict[str, Any] | None = None,
    on_epoch: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``baseline`` with ``method``; returns ``(model, info)``.

    ``info``: ``method``, ``eps`` (model-input units, None for noise-only methods), ``history``
    (per-epoch records), ``seconds``; IMA adds ``margins`` (final, per training sample) and
    ``margin_history`` (per epoch); adaptive adds its per-step table rows.
    """

    t0 = time.perf_counter()
    model = copy.deepcopy(baseline).float()
    torch.manual_seed(derive_seed(seed, 50))
    e = method_eps(method, hs, eps)
    loader = make_loader(data.train, hs.batch_size, derive_seed(seed, 51))
    opt = torch.optim.Adam(model.parameters(), lr=hs.lr)
    info: dict[str, Any] = {"method": method, "eps": e, "norm": hs.norm, "epochs": hs.epochs,
                            "n_train": len(data.train)}
    if method == "ima":
        assert e is not None  # method_eps gives IMA its eps_max
        states: list[Any] = []
        _, margins = ima.fit(model, loader, eps_max=e, norm=hs.norm, epochs=hs.epochs, beta=hs.ima_beta,
                             n_pgd=hs.n_pgd, n_binary=hs.ima_n_binary, optimizer=opt, on_epoch=on_epoch, state=states)
        info["margins"] = margins.numpy().tolist()
        info["margin_history"] = [h.tolist() for h in states[0].history]
        info["delta"] = states[0].delta
    elif method == "adaptive":
        if adaptive_context is None:
            raise ConfigError("adaptive hardening needs the robustness evaluation context")
        res = adaptive_train(model, **adaptive_context, n_adapt=hs.adaptive_n_adapt,
                             epochs_per_step=hs.adaptive_epochs_per_step, restarts=hs.adaptive_restarts,
                             lr=hs.lr, batch_size=hs.batch_size, seed=seed)
        model = res.model
        info["adaptive"] = res.to_dict()
        info["tables_markdown"] = res.tables()
    else:
        loss: BatchLoss
        if method in EPS_METHODS and e is None:
            raise ConfigError(f"method {method!r} needs a training eps")
        if method == "adv":
            assert e is not None
            loss = AdvPGD(e, hs.norm, n_pgd=hs.n_pgd, alpha=hs.alpha)
        elif method == "rand":
            assert e is not None
            loss = RandNoise(e, hs.norm)
        elif method == "trades":
            assert e is not None
            loss = Trades(e, hs.norm, beta=hs.trades_beta, n_pgd=hs.n_pgd, alpha=hs.alpha)
        elif method == "nps":
            if noise is None:
                raise ConfigError("NPS-noise hardening needs the noise context (spacing, HU per unit, NPS)")
            loss = NPSNoise(hs.nps_mas, noise.spacing_mm, noise.hu_per_unit, noise.nps, seed=derive_seed(seed, 52))
        else:
            raise ConfigError(f"unknown hardening method {method!r}")
        info["history"] = fit_with(model, loader, loss, epochs=hs.epochs, optimizer=opt, on_epoch=on_epoch)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return model.eval(), info


def clean_scores(model: nn.Module, data: ArraySet) -> dict[str, float]:
    """AUC (NaN when one class is absent) and accuracy at 0.5 of ``model`` on all of ``data``."""

    _, scores = predict_scores(model, data.x, select_runtime("cpu", "fp32"))
    m = binary_metrics(data.y.numpy(), scores)
    return {"auc": float("nan") if m["auc"] is None else float(m["auc"]), "accuracy": float(m["accuracy"])}


def clean_auc(model: nn.Module, data: ArraySet) -> float:
    """AUC of ``model`` on ``data`` (NaN when one class is absent)."""
    return clean_scores(model, data)["auc"]


def subset(data: ArraySet, max_samples: int | None, seed: int) -> ArraySet:
    """A class-stratified, seeded subset of at most ``max_samples`` samples (all when None)."""

    idx = stratified_subset(data.y.numpy(), max_samples, seed)
    mask = np.zeros(len(data), dtype=bool)
    mask[idx] = True
    return data.subset(mask)


def noise_context(params: dict[str, Any], job: str, model: nn.Module, width: int) -> NoiseContext:
    """Spacing and HU scale of the job's robustness settings, and the configured NPS model."""

    rs = job_settings(params, job).for_width(width)
    eps_to_hu = getattr(model, "eps_to_hu", None)
    if callable(eps_to_hu) and getattr(model, "window_hu", None) is not None:
        hu = float(eps_to_hu(1.0))
    elif rs.hu_per_unit is not None:
        hu = float(rs.hu_per_unit)
    else:
        raise ConfigError(f"job {job!r}: NPS noise needs robustness.jobs.{job}.hu_per_unit for display-unit data")
    spacing = rs.spacing_mm if isinstance(rs.spacing_mm, (int, float)) else float(rs.spacing_mm[0])
    return NoiseContext(float(spacing), hu, noise_model(params))
