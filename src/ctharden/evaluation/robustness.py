"""Robustness evaluation of one model on one dataset: clean metrics, random and optimised NPS
attacks (shen 2020, Table 2), 100-PGD robust-accuracy curves with their sanity checks (ma 2020),
example images and attention maps.

>>> data = load_arrayset("artifacts/datasets/synthetic_nodule3d", model)
>>> result, visuals = evaluate_robustness(model, data, job_settings(params, "nodule3d"), seed=1)

The evaluation is a set of independent units (:mod:`ctharden.evaluation.units`), each seeded from
``(seed, unit)``: ``evaluate_robustness`` runs them in turn; :mod:`ctharden.flows.fanout` spreads
them over a Dask cluster with the same result.

``result`` is JSON-serialisable (what ``metrics/robustness.json`` holds per job); ``visuals`` holds
the arrays of the example figure (not serialised). Everything runs in eval mode with frozen
parameters (the attack functions take care of it); flips and ``broken`` are decided by fp32
forward passes; attacks may run under bf16 autocast where settings say so.

Samples: random NPS attacks use every sample of each split (``max_samples`` caps it); optimised
attacks and PGD use a class-stratified, seeded subset when ``max_samples`` is set (stated in the
result: ``n`` per attack). With ``models: folds`` the NPS attacks run on every fold model and the
tables give mean ± std over them (the paper's Table 2 protocol); PGD and the sanity checks run on
the selected model.

Noise mode (``settings.noise_mode``, ``robustness.noise.mode``): ``additive`` (the paper) adds the
target-mAs NPS noise to every sample; ``dose`` simulates a rescan of each sample's own scan at the
target mAs (:mod:`ctharden.noise.dose`), the scan mAs read from the manifest column ``mas`` (NaN,
a ``mas_source`` of ``unknown``, or no such column: unknown -> additive, counted). In dose mode every
level of the random and optimised blocks carries ``noise``: ``{mode, target_mas, n, dose, none,
additive_fallback}``; in additive mode the result is what it was before the option existed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ctharden.attacks import (
    optimized_nps_attack,
    pgd,
    random_nps_attack,
    run_sanity_checks,
)
from ctharden.attacks.common import attack_mode
from ctharden.attacks.ensemble import ENSEMBLE_ATTACKS, check_gradient_masking, ensemble_sweep
from ctharden.attacks.nps import InputMap, NPSAttackResult
from ctharden.attacks.nps_metrics import sar_above_curve
from ctharden.attacks.pgd import normalized_area, predict_broken
from ctharden.attacks.sanity import SanityReport
from ctharden.config import choices
from ctharden.config.robustness import IntervalSettings, RobustnessSettings
from ctharden.core.device import select_runtime
from ctharden.core.errors import DataError
from ctharden.core.seeding import derive_seed
from ctharden.data.arrays import ArraySet
from ctharden.data.dataset import read_info
from ctharden.evaluation.clean import binary_metrics
from ctharden.evaluation.intervals import auc_bootstrap, auc_delong
from ctharden.models import positive_score
from ctharden.models.predict import predict_scores
from ctharden.noise import NPSModel, default_nps, sample_nps_noise
from ctharden.noise.dose import as_scan_mas, dose_scale, scale_per_sample

log = logging.getLogger(__name__)
#: The key under which a unit's per-sample outcomes travel until the evaluation moves them to the
#: outcomes file (:func:`ctharden.evaluation.units.assemble`); never part of the metrics.
OUTCOMES = "_outcomes"


def stratified_subset(y: np.ndarray, max_n: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of at most ``max_n`` samples keeping the class shares; all when None."""
    n = len(y)
    if max_n is None or max_n >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked: list[np.ndarray] = []
    classes = np.unique(y)
    for c in classes:
        members = np.nonzero(y == c)[0]
        take = max(1, round(max_n * len(members) / n))
        picked.append(rng.permutation(members)[:take])
    out = np.sort(np.concatenate(picked))
    return out[:max_n] if len(out) > max_n else out


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def _nps_block(results: list[NPSAttackResult], n: int) -> dict[str, Any]:
    """JSON of one attack on one split over one or more models: per mAs SAN/N (%), SAR, curves."""
    levels: dict[str, Any] = {}
    for mas in results[0].mas_levels:
        per_model = [r[mas] for r in results]
        spread = _mean_std([lv.san_rate for lv in per_model])
        sel = per_model[0]
        levels[f"mas{mas:g}"] = {
            "mas": mas,
            "san": sel.san,
            "san_rate": sel.san_rate,  # selected model, % of samples
            "san_rate_mean": spread["mean"],
            "san_rate_std": spread["std"],
            "san_pooled": int(sum(lv.san for lv in per_model)),  # over every model: of n × n_models
            "mean_sar": float(np.mean(sel.sar)),
            "sar_above": sar_above_curve(sel.sar),
        }
        if sel.noise is not None:  # dose mode: same samples for every model
            levels[f"mas{mas:g}"]["noise"] = sel.noise.to_dict()
    return {"n": n, "k": results[0].k, "n_models": len(results), "levels": levels}


def step_hu(settings: RobustnessSettings, mas: float, nps: NPSModel | None) -> float:
    """The optimised attack's step δ in HU: ``step_sigma`` × the NPS noise σ at ``mas``.

    A fixed HU step would be 1/12 of σ at 10 mAs but 3/5 of it at 500 mAs (σ ∝ mAs^-1/2), so the
    N_iter steps would explore the constraint set very differently at different doses."""

    return settings.optimized.step_sigma * (nps or default_nps()).sigma(mas)


def scan_mas_of(data: ArraySet, idx: np.ndarray) -> Tensor:
    """The scan mAs ``(k,)`` float64 of the samples at positions ``idx``, NaN where unknown.

    Read from ``data.manifest["mas"]`` (mAs per rotation of the sample's scan); a row whose
    ``mas_source`` is ``unknown`` counts as unknown whatever its ``mas``; a set without a manifest
    or without the column is unknown throughout (a dose is never invented).

    Raises:
        DataError: a ``mas`` that is not a number, or a known one that is not positive and finite.
    """
    pos = np.asarray(idx, dtype=np.int64)
    manifest = data.manifest
    if manifest is None or "mas" not in manifest.columns:
        return torch.full((len(pos),), float("nan"), dtype=torch.float64)
    try:
        mas = pd.to_numeric(manifest["mas"], errors="raise").to_numpy(dtype=np.float64)[pos]
    except (TypeError, ValueError) as exc:
        raise DataError(f"manifest column 'mas' must be numeric mAs (NaN = unknown): {exc}") from None
    if "mas_source" in manifest.columns:
        mas = np.where(manifest["mas_source"].astype(str).to_numpy()[pos] == "unknown", np.nan, mas)
    return as_scan_mas(mas, len(pos))


def _dose_inputs(data: ArraySet, settings: RobustnessSettings, idx: np.ndarray) -> dict[str, Any]:
    """The attacks' ``noise_mode``/``scan_mas`` keywords: none in additive mode (the call of before)."""
    if settings.noise_mode == "additive":
        return {}
    return {"noise_mode": settings.noise_mode, "scan_mas": scan_mas_of(data, idx)}


def _nps_inputs(model: nn.Module, settings: RobustnessSettings) -> dict[str, Any]:
    return {"spacing_mm": settings.spacing_mm,
            "hu_per_unit": settings.hu_per_unit if getattr(model, "window_hu", None) is None else None}


def nps_samples(data: ArraySet, settings: RobustnessSettings, seed: int, split_index: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Dataset indices of split ``settings.splits[split_index]`` that the NPS attacks use:
    ``(random, optimized)``, the random attacks' (seeded, stratified) subset and the optimised
    attacks' subset of it."""
    split = settings.splits[split_index]
    idx = data.indices(split)
    if len(idx) == 0:
        raise DataError(f"split {split!r} of the dataset is empty")
    y = data.y.numpy()
    sub = idx[stratified_subset(y[idx], settings.max_samples, derive_seed(seed, 30, split_index))]
    osub = sub[stratified_subset(y[sub], settings.optimized.max_samples, derive_seed(seed, 32, split_index))]
    return sub, osub


def random_nps_run(
    model: nn.Module, data: ArraySet, settings: RobustnessSettings, *, split_index: int, model_index: int,
    seed: int, nps: NPSModel | None = None, device: torch.device | None = None,
) -> NPSAttackResult:
    """The random NPS attack of one model on one split, every mAs level (common random numbers)."""
    dev = device or torch.device("cpu")
    sub, _ = nps_samples(data, settings, seed, split_index)
    g = torch.Generator(device=dev).manual_seed(derive_seed(seed, 31, split_index, model_index))
    res = random_nps_attack(
        model, data.raw[sub].to(dev), settings.mas_levels, settings.random.k, nps=nps, generator=g,
        batch_size=settings.random.batch_size, **_nps_inputs(model, settings), **_dose_inputs(data, settings, sub),
    )
    return dataclasses.replace(res, index=sub)


def optimized_nps_run(
    model: nn.Module, data: ArraySet, settings: RobustnessSettings, *, split_index: int, model_index: int,
    mas_index: int, seed: int, nps: NPSModel | None = None, device: torch.device | None = None,
) -> NPSAttackResult:
    """The optimised NPS attack (Algorithm 1) of one model on one split at one mAs level."""
    dev = device or torch.device("cpu")
    _, osub = nps_samples(data, settings, seed, split_index)
    o = settings.optimized
    mas = settings.mas_levels[mas_index]
    g = torch.Generator(device=dev).manual_seed(derive_seed(seed, 33, split_index, model_index, mas_index))
    res = optimized_nps_attack(
        model, data.raw[osub].to(dev), mas, restarts=o.restarts, step_hu=step_hu(settings, mas, nps), tol=o.tol,
        n_iter=o.n_iter, nps=nps, generator=g, batch_size=o.batch_size, autocast=o.autocast,
        **_nps_inputs(model, settings), **_dose_inputs(data, settings, osub),
    )
    return dataclasses.replace(res, index=osub)


def merge_levels(per_mas: Sequence[NPSAttackResult], settings: RobustnessSettings) -> NPSAttackResult:
    """One optimised-attack result over every mAs level from the per-level results (in
    ``settings.mas_levels`` order); the inputs are left unchanged."""
    first = per_mas[0]
    merged = dataclasses.replace(first, levels=dict(first.levels), settings=dict(first.settings))
    for r in per_mas[1:]:
        merged.levels.update(r.levels)
    merged.settings["mas_levels"] = list(settings.mas_levels)
    merged.settings["mean_steps"] = float(np.mean([r.settings["mean_steps"] for r in per_mas]))
    return merged


def nps_tables(random_runs: Sequence[Sequence[NPSAttackResult]],
               optimized_runs: Sequence[Sequence[Sequence[NPSAttackResult]]] | None, settings: RobustnessSettings
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(random, optimized)`` JSON blocks per split from the attack results indexed
    ``random_runs[split][model]`` and ``optimized_runs[split][model][mas]`` (None: no optimised
    attack ran, the block is empty)."""
    random_out: dict[str, Any] = {}
    opt_out: dict[str, Any] = {}
    for si, split in enumerate(settings.splits):
        rnd = list(random_runs[si])
        random_out[split] = _nps_block(rnd, rnd[0].n)
        if optimized_runs is None:
            continue
        opt = [merge_levels(per_mas, settings) for per_mas in optimized_runs[si]]
        opt_out[split] = _nps_block(opt, opt[0].n)
        opt_out[split]["mean_steps"] = opt[0].settings["mean_steps"]
    return random_out, opt_out


PGD_NORMS = choices.NORMS


def pgd_samples(data: ArraySet, settings: RobustnessSettings, seed: int) -> np.ndarray:
    """Test-split indices that PGD attacks (seeded, stratified ``pgd.max_samples`` subset)."""
    idx = data.indices("test")
    if len(idx) == 0:
        raise DataError("the dataset's test split is empty")
    picked: np.ndarray = idx[stratified_subset(data.y.numpy()[idx], settings.pgd.max_samples, derive_seed(seed, 40))]
    return picked


def survival(broken: Mapping[float, Tensor], values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Per ε of ``values``: the share of samples that survived (0 for no samples) and their count,
    from ``broken[ε]`` bool ``(N,)``."""
    accuracy = [1.0 - float(broken[e].float().mean()) if broken[e].numel() else 0.0 for e in values]
    return accuracy, [int((~broken[e]).sum()) for e in values]


def ensemble_block(model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], settings: RobustnessSettings,
                   norm: str, report: SanityReport, clean_broken: Tensor, *,
                   seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attack ensemble (``pgd.attacks``) on the PGD samples ``x`` ``(N, ...)`` at the ε of
    :meth:`~ctharden.config.robustness.PGDSettings.ensemble_at` (the gated ε by default; every
    listed ε with ``ensemble_eps: all``), starting from the sanity sweep's PGD outputs:
    ``(block, outcomes)``. ``block``: ``eps`` (ε = 0 first: the clean fp32 decision, then the
    ensemble's ε), per ε the worst-case accuracy and survivors, per member the samples it attacked
    and broke, the samples only Square broke (``masked``), and the seconds it took; ``scope``
    says which ε it covers (``area`` only when it covers them all). At the other listed ε the
    curve is PGD's alone. Appends the ``gradient_masking`` check to ``report``. Seeds its own
    generator from ``(seed, 42, norm index)``."""
    p = settings.pgd
    at = p.ensemble_at(norm, report.settings.get("check_eps"))
    g = torch.Generator(device=x.device).manual_seed(derive_seed(seed, 42, PGD_NORMS.index(norm)))
    t0 = time.perf_counter()
    runs = ensemble_sweep(
        model, x, y, at, pgd_x_adv=report.x_adv if "pgd" in p.attacks else None, norm=norm, attacks=p.attacks,
        steps=p.steps, restarts=p.restarts, square_queries=p.square_queries, autocast=p.autocast, generator=g,
        pgd_loss=p.loss,
    )
    seconds = time.perf_counter() - t0
    report.checks.append(check_gradient_masking(runs))
    broken = {0.0: clean_broken, **{e: runs[e].broken.cpu() for e in at}}
    members = [a for a in ENSEMBLE_ATTACKS if a in p.attacks]
    values = [0.0, *at]
    accuracy, survived = survival(broken, values)
    every_eps = list(at) == list(eps)
    block = {
        "eps": values, "scope": "all" if every_eps else "gated",
        "attacks": members, "square_queries": p.square_queries if "square" in members else None,
        "accuracy": accuracy,
        "survived": survived,
        "per_attack": {a: {"attacked": [int(runs[e].attacked[a].sum()) for e in at],
                           "broken": [int(runs[e].broken_by[a].sum()) for e in at]} for a in members},
        "masked": [int(runs[e].masking.sum()) for e in at],
        "seconds": round(seconds, 2),
        "auc": normalized_area(values, accuracy) if every_eps else None,
    }
    return block, {f"{e:g}": broken[e].tolist() for e in values}


def pgd_norm_run(
    model: nn.Module, data: ArraySet, settings: RobustnessSettings, norm: str, *, seed: int,
    device: torch.device | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """100-PGD robust accuracy vs ε for one norm with every sanity check, and the attack ensemble's
    worst case at every ε (``curve["ensemble"]``, :func:`ensemble_block`): ``(curve, sanity)``.

    Seeds torch's global RNG (the PGD starts) from ``(seed, 41, norm index)`` first."""
    dev = device or torch.device("cpu")
    p = settings.pgd
    sub = pgd_samples(data, settings, seed)
    x, y = data.x[sub].to(dev), data.y[sub].to(dev)
    eps = getattr(p, norm)
    torch.manual_seed(derive_seed(seed, 41, PGD_NORMS.index(norm)))
    report = run_sanity_checks(
        model, x, y, eps, norm=norm, steps=p.steps, restarts=p.restarts, loss=p.loss,
        tolerance=p.tolerance, n_random=p.n_random, autocast=p.autocast, early_stop=True,
    )
    acc = dict(zip(report.curve["eps"], report.curve["accuracy"], strict=True))
    values = [0.0, *eps]
    accuracy = [acc[e] for e in values]
    broken = {0.0: predict_broken(model, x, y).cpu(), **{e: report.broken[e] for e in eps}}  # ε = 0: clean fp32
    ensemble, ensemble_broken = ensemble_block(model, x, y, eps, settings, norm, report, broken[0.0], seed=seed)
    curve = {
        "eps": values, "eps_hu": _eps_hu(model, values, settings), "accuracy": accuracy,
        "survived": [int((~broken[e]).sum()) for e in values],
        "auc": normalized_area(values, accuracy), "n": int(len(sub)), "steps": p.steps, "restarts": p.restarts,
        "loss": p.loss, "large_eps": report.settings["large_eps"],
        "accuracy_large_eps": acc[report.settings["large_eps"]],
        "ensemble": ensemble,
        OUTCOMES: {"ids": [data.sample_ids[int(i)] for i in sub],
                   "broken": {f"{e:g}": broken[e].tolist() for e in values},
                   "ensemble_broken": ensemble_broken},
    }
    return curve, report.to_dict()


def blackbox_norm_run(
    model: nn.Module, data: ArraySet, settings: RobustnessSettings, norm: str, *, seed: int,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """The black-box evaluation of a model without input gradients (``settings.white_box`` False):
    accuracy under the Square Attack alone (``pgd.square_queries`` queries per sample, margin loss)
    on the PGD samples, at the ε where the ensemble would run (:meth:`PGDSettings.ensemble_at`:
    the gated ε by default). Square's outputs are checked for budget and clip range like every
    ensemble member, and ``broken`` is re-decided in fp32.

    Returns the curve: ``eps`` (ε = 0 first: the clean decision), ``eps_hu``, ``accuracy``,
    ``survived``, ``n``, ``attacks`` (``["square"]``), ``square_queries``, ``seconds`` and
    ``bound: "upper"`` (a stronger attack can only break more, so this accuracy is an upper bound of
    the robust accuracy), with the per-sample outcomes under :data:`OUTCOMES`. Seeds its generator
    from ``(seed, 42, norm index)`` (the ensemble's seed)."""
    dev = device or torch.device("cpu")
    p = settings.pgd
    sub = pgd_samples(data, settings, seed)
    x, y = data.x[sub].to(dev), data.y[sub].to(dev)
    at = p.ensemble_at(norm, None)
    g = torch.Generator(device=x.device).manual_seed(derive_seed(seed, 42, PGD_NORMS.index(norm)))
    t0 = time.perf_counter()
    runs = ensemble_sweep(model, x, y, at, norm=norm, attacks=("square",), square_queries=p.square_queries,
                          autocast=False, generator=g)
    broken = {0.0: predict_broken(model, x, y).cpu(), **{e: runs[e].broken.cpu() for e in at}}
    values = [0.0, *at]
    accuracy, survived = survival(broken, values)
    return {
        "eps": values, "eps_hu": _eps_hu(model, values, settings), "accuracy": accuracy,
        "survived": survived, "n": int(len(sub)), "attacks": ["square"],
        "square_queries": p.square_queries, "seconds": round(time.perf_counter() - t0, 2), "bound": "upper",
        OUTCOMES: {"ids": [data.sample_ids[int(i)] for i in sub],
                   "broken": {f"{e:g}": broken[e].tolist() for e in values}},
    }


def run_pgd_evaluation(
    model: nn.Module, data: ArraySet, settings: RobustnessSettings, *, seed: int, device: torch.device | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """100-PGD robust accuracy vs ε on the test split, per norm, with every sanity check.

    Returns ``(pgd, sanity)``: per norm the curve (ε in input units and HU, accuracy, normalised
    area) and the :class:`~ctharden.attacks.SanityReport` as a dict. The curve *is* the sanity run's
    sweep (the same PGD, not a second one).
    """
    pgd_samples(data, settings, seed)  # an empty test split is an error even without ε lists
    curves: dict[str, Any] = {}
    sanity: dict[str, Any] = {}
    for norm in PGD_NORMS:
        if getattr(settings.pgd, norm):
            curves[norm], sanity[norm] = pgd_norm_run(model, data, settings, norm, seed=seed, device=device)
    return curves, sanity


def _eps_hu(model: nn.Module, eps: Sequence[float], settings: RobustnessSettings) -> list[float] | None:
    """ε in HU: the model's HU window width per input unit, or the assumed display window."""
    eps_to_hu = getattr(model, "eps_to_hu", None)
    if callable(eps_to_hu) and getattr(model, "window_hu", None) is not None:
        return [float(eps_to_hu(e)) for e in eps]
    if settings.hu_per_unit is not None:
        return [float(e * settings.hu_per_unit) for e in eps]
    return None


def clean_metrics(model: nn.Module, data: ArraySet, device: torch.device | None = None,
                  intervals: IntervalSettings | None = None) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity per split (fp32, eval mode), with the AUC's DeLong
    interval (``auc_delong``: point, lower, upper, se) and, as its check, a stratified bootstrap
    (``auc_bootstrap``) at ``intervals.level``; the test split also carries its per-sample scores
    under :data:`OUTCOMES` (``ids``, ``y``, ``score``), which the evaluation moves to the outcomes file."""

    cfg = intervals or IntervalSettings()
    runtime = select_runtime("cpu" if device is None or device.type == "cpu" else "cuda", "fp32")
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        idx = data.indices(split)
        if len(idx):
            _, scores = predict_scores(model, data.x[idx], runtime)
            y = data.y[idx].numpy()
            m = binary_metrics(y, scores)
            if m["auc"] is not None:
                m["auc_delong"] = auc_delong(y, scores, level=cfg.level).to_dict()
                if cfg.bootstrap:
                    m["auc_bootstrap"] = auc_bootstrap(y, scores, level=cfg.level, n_boot=cfg.bootstrap,
                                                       seed=len(idx)).to_dict()
            if split == "test":
                m[OUTCOMES] = {"index": [int(i) for i in idx], "ids": [data.sample_ids[int(i)] for i in idx],
                               "y": y.astype(int).tolist(),
                               "score": [float(v) for v in scores]}
            out[split] = m
    return out


def example_visuals(
    model: nn.Module,
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    seed: int,
    nps: NPSModel | None = None,
    n_examples: int | None = None,
) -> dict[str, Any]:
    """Arrays for the example figure and the attention map, for ``n_examples`` test samples.

    Per sample: the clean input, one random NPS realisation at the lowest mAs (a flipping one when
    any of 32 draws flips it), the optimised NPS perturbation at that mAs, and the L∞ PGD example at
    the smallest listed ε that breaks it (else the largest); for a model without input gradients
    (``settings.white_box`` False) the clean and random images only. All in model-input units, plus the
    noise images in HU and the fp32 positive scores. Every random number (noise, PGD starts)
    comes from one generator seeded from ``(seed, 50)``: the examples do not depend on what ran
    before them in the process.
    """

    count = settings.examples if n_examples is None else n_examples
    idx = data.indices("test")[: max(count, 0)]
    if count <= 0 or len(idx) == 0:
        return {"examples": []}
    nps_model = nps or default_nps()
    mas = min(settings.mas_levels)
    to_input = InputMap(model, _nps_inputs(model, settings)["hu_per_unit"])  # (x, p_hu) -> model input

    def score(xin: Tensor) -> np.ndarray:
        with attack_mode(model), torch.no_grad():
            return positive_score(model(xin), getattr(model, "output", "logit")).float().numpy()

    examples = []
    g = torch.Generator().manual_seed(derive_seed(seed, 50))
    for i in idx:
        xa = data.raw[i : i + 1]
        x0 = data.x[i : i + 1]
        s0 = score(x0)[0]
        draws = sample_nps_noise((32, *xa.shape[1:]), mas, settings.spacing_mm, nps=nps_model, generator=g)
        dose = _dose_inputs(data, settings, np.array([i]))
        if dose:  # dose mode: the sample's rescan at the lowest mAs
            draws = scale_per_sample(draws, dose_scale(mas, dose["scan_mas"]).expand(32))
        noisy = to_input(xa.expand_as(draws), draws)
        s = score(noisy)
        flips = np.nonzero((s > 0.5) != (s0 > 0.5))[0]
        j = int(flips[0]) if len(flips) else 0
        scores = {"clean": float(s0), "random": float(s[j])}
        example: dict[str, Any] = {"sample_id": data.sample_ids[int(i)], "label": int(data.y[i]), "mas": mas,
                                   "clean": x0[0], "random": noisy[j], "random_noise_hu": draws[j],
                                   "random_flipped": bool(len(flips)), "scores": scores}
        if not settings.white_box:
            examples.append(example)
            continue
        opt = optimized_nps_attack(
            model, xa, mas, restarts=1, step_hu=step_hu(settings, mas, nps_model), tol=settings.optimized.tol,
            n_iter=settings.optimized.n_iter, nps=nps_model, generator=g, return_perturbations=True,
            **_nps_inputs(model, settings), **dose,
        )
        assert opt.perturbations is not None  # asked for with return_perturbations=True
        p_opt = opt.perturbations[mas][0, 0][None]
        x_opt = to_input(xa, p_opt)
        adv, eps_used = x0, None
        for e in settings.pgd.linf or settings.pgd.l2:
            cand, broken = pgd(model, x0, data.y[i : i + 1], e, norm="linf" if settings.pgd.linf else "l2",
                               steps=settings.pgd.steps, loss=settings.pgd.loss, early_stop=True, generator=g)
            adv, eps_used = cand, e
            if bool(broken[0]):
                break
        examples.append({
            **example, "optimized": x_opt[0], "optimized_noise_hu": p_opt[0], "pgd": adv[0], "pgd_eps": eps_used,
            "pgd_norm": "linf" if settings.pgd.linf else "l2",
            "scores": {**scores, "optimized": float(score(x_opt)[0]), "pgd": float(score(adv)[0])},
        })
    return {"examples": examples}


def dataset_hash(dataset_dir: str | Path) -> str:
    """The dataset's content hash (from ``dataset.json``)."""
    return str(read_info(dataset_dir)["content_hash"])
