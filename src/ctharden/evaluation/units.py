"""The robustness evaluation as independent units of work, and their assembly into the result.

One job's evaluation (:func:`~ctharden.evaluation.robustness.evaluate_robustness`) is::

    todo = evaluation_units(settings, n_models)              # list[EvalUnit]
    done = [run_unit(u, models, data, settings, seed=seed, nps=nps) for u in todo]
    result, visuals = assemble(todo, done, settings, n_models)

Every unit seeds its own random numbers from ``(seed, unit)`` (see
:func:`~ctharden.core.seeding.derive_seed`), so the units may run in any order, in any process, and
the assembled result is the same: what lets :mod:`ctharden.flows.fanout` spread them over a Dask
cluster. The units:

=================  ==========================================  ======================================
kind               one per                                     value
=================  ==========================================  ======================================
``clean``          job                                         clean metrics per split (dict)
``random_nps``     (split, model)                              :class:`NPSAttackResult`, every mAs
``optimized_nps``  (split, model, mAs level)                   :class:`NPSAttackResult`, one mAs
``pgd``            norm with ε values                          ``(curve, sanity report dict)``
``blackbox``       norm with ε values (no gradients)           the Square-only curve
``examples``       job                                         the example figure's arrays
=================  ==========================================  ======================================

Model index 0 is the selected model (``clean``, ``pgd``, ``blackbox`` and ``examples`` use only it).

A model without input gradients (ONNX; ``settings.white_box`` False) gets the units that need
none: ``clean``, ``random_nps``, ``blackbox`` instead of ``pgd``, and ``examples`` (clean and
random only). The result then says :data:`~ctharden.evaluation.headline.NO_GRADIENTS` where the
optimised NPS attack, PGD, the ensemble and the sanity checks would be (``white_box``), and
``sanity_passed`` is None: nothing white-box was checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ctharden.config.robustness import RobustnessSettings
from ctharden.core.errors import DataError
from ctharden.core.progress import progress
from ctharden.data.arrays import ArraySet
from ctharden.evaluation.evidence import result_intervals
from ctharden.evaluation.headline import NO_GRADIENTS
from ctharden.evaluation.robustness import (
    OUTCOMES,
    PGD_NORMS,
    blackbox_norm_run,
    clean_metrics,
    example_visuals,
    nps_tables,
    optimized_nps_run,
    pgd_norm_run,
    random_nps_run,
)
from ctharden.noise import NPSModel

log = logging.getLogger(__name__)
KINDS = ("clean", "random_nps", "optimized_nps", "pgd", "blackbox", "examples")
NPS_KINDS = ("random_nps", "optimized_nps")
_TIMING_GROUP = {"clean": "clean", "random_nps": "nps", "optimized_nps": "nps", "pgd": "pgd", "blackbox": "blackbox",
                 "examples": "examples"}


@dataclass(frozen=True)
class EvalUnit:
    """One unit of an evaluation. ``split``: index into ``settings.splits``; ``model``: index into
    the model set (0 = selected); ``mas``: index into ``settings.mas_levels``; ``norm``: ``linf``/``l2``."""

    kind: str
    split: int | None = None
    model: int | None = None
    mas: int | None = None
    norm: str | None = None

    @property
    def name(self) -> str:
        """Short readable name, e.g. ``optimized_nps-s1-m0-l2`` (Prefect task-run names)."""
        parts = [self.kind]
        parts += [f"{tag}{v}" for tag, v in (("s", self.split), ("m", self.model), ("l", self.mas)) if v is not None]
        return "-".join(parts + ([self.norm] if self.norm else []))


@dataclass
class UnitResult:
    """A unit's value (see the module docstring) and the seconds it took where it ran."""

    value: Any
    seconds: float


def evaluation_units(settings: RobustnessSettings, n_models: int) -> list[EvalUnit]:
    """Every unit of one job's evaluation, in the serial order."""
    if n_models < 1:
        raise DataError("an evaluation needs at least one model")
    out = [EvalUnit("clean")]
    white = settings.white_box
    for si in range(len(settings.splits)):
        out += [EvalUnit("random_nps", split=si, model=mi) for mi in range(n_models)]
        out += [EvalUnit("optimized_nps", split=si, model=mi, mas=li)
                for mi in range(n_models) for li in range(len(settings.mas_levels)) if white]
    out += [EvalUnit("pgd" if white else "blackbox", norm=norm) for norm in PGD_NORMS if getattr(settings.pgd, norm)]
    out.append(EvalUnit("examples"))
    return out


def run_unit(
    unit: EvalUnit,
    models: Sequence[nn.Module],
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    seed: int,
    nps: NPSModel | None = None,
    device: torch.device | None = None,
) -> UnitResult:
    """Run one unit on ``models`` (selected first) and ``data``; returns its value and seconds."""
    t0 = time.perf_counter()
    model = models[unit.model or 0]
    if unit.kind == "clean":
        value: Any = clean_metrics(model, data, device, settings.intervals)
    elif unit.kind == "random_nps":
        value = random_nps_run(model, data, settings, split_index=_index(unit.split), model_index=_index(unit.model),
                               seed=seed, nps=nps, device=device)
    elif unit.kind == "optimized_nps":
        value = optimized_nps_run(model, data, settings, split_index=_index(unit.split),
                                  model_index=_index(unit.model), mas_index=_index(unit.mas), seed=seed, nps=nps,
                                  device=device)
    elif unit.kind == "pgd":
        value = pgd_norm_run(model, data, settings, str(unit.norm), seed=seed, device=device)
    elif unit.kind == "blackbox":
        value = blackbox_norm_run(model, data, settings, str(unit.norm), seed=seed, device=device)
    elif unit.kind == "examples":
        value = example_visuals(model, data, settings, seed=seed, nps=nps)
    else:
        raise DataError(f"unknown evaluation unit {unit.kind!r} (known: {list(KINDS)})")
    return UnitResult(value, time.perf_counter() - t0)


def _index(value: int | None) -> int:
    if value is None:
        raise DataError("evaluation unit lacks an index")
    return value


def run_units(units: Sequence[EvalUnit], models: Sequence[nn.Module], data: ArraySet, settings: RobustnessSettings,
              *, seed: int, nps: NPSModel | None = None, device: torch.device | None = None) -> list[UnitResult]:
    """:func:`run_unit` for each unit in turn (the serial path), with a progress bar and ETA."""
    out = []
    with progress(len(units), f"evaluating {data.info.get('task', 'dataset')}") as advance:
        for i, u in enumerate(units):
            out.append(run_unit(u, models, data, settings, seed=seed, nps=nps, device=device))
            log.info("evaluation unit %d/%d %s: %.1f s", i + 1, len(units), u.name, out[-1].seconds)
            advance(note=f"{u.name} {out[-1].seconds:.0f} s")
    return out


def _by_unit(units: Sequence[EvalUnit], partials: Sequence[UnitResult]) -> dict[EvalUnit, UnitResult]:
    if len(units) != len(partials):
        raise DataError(f"{len(units)} evaluation units but {len(partials)} results")
    return dict(zip(units, partials, strict=True))


def assemble_nps(units: Sequence[EvalUnit], partials: Sequence[UnitResult], settings: RobustnessSettings,
                 n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``(random_nps, optimized_nps)`` blocks from the NPS units' results (any order);
    ``optimized_nps`` is empty for a black-box evaluation (``settings.white_box`` False)."""
    got = _by_unit(units, partials)
    splits, levels = range(len(settings.splits)), range(len(settings.mas_levels))
    rnd = [[got[EvalUnit("random_nps", split=si, model=mi)].value for mi in range(n_models)] for si in splits]
    opt = [[[got[EvalUnit("optimized_nps", split=si, model=mi, mas=li)].value for li in levels]
            for mi in range(n_models)] for si in splits] if settings.white_box else None
    return nps_tables(rnd, opt, settings)


def _without(block: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != key}


def outcomes_of(units: Sequence[EvalUnit], got: dict[EvalUnit, UnitResult], settings: RobustnessSettings
                ) -> dict[str, Any]:
    """Per-sample outcomes on the test split, by sample id (the selected model): clean scores,
    which samples each NPS attack flipped at each mAs, which each PGD run broke at each ε
    (``pgd_<norm>``) and which the attack ensemble broke (``ensemble_<norm>``, the gated worst case)."""
    clean = got[EvalUnit("clean")].value.get("test", {}).get(OUTCOMES)
    if clean is None:
        return {}
    ids = dict(zip(clean["index"], clean["ids"], strict=True))
    out: dict[str, Any] = {"clean": {k: clean[k] for k in ("ids", "y", "score")}}
    if "test" in settings.splits:
        si = settings.splits.index("test")
        for kind, short in (("random_nps", "random"), ("optimized_nps", "optimized")):
            found = [got[u].value for u in units if u.kind == kind and u.split == si and (u.model or 0) == 0]
            if not found or found[0].index is None:
                continue
            flipped: dict[str, list[bool]] = {}
            for res in found:  # the optimised attack: one result per mAs level
                flipped.update({f"{mas:g}": lv.flipped_any.tolist() for mas, lv in res.levels.items()})
            out[short] = {"ids": [ids[int(i)] for i in found[0].index], "flipped": flipped}
    for u in units:
        if u.kind == "pgd":
            block = got[u].value[0][OUTCOMES]
            out[f"pgd_{u.norm}"] = {"ids": block["ids"], "broken": block["broken"]}
            out[f"ensemble_{u.norm}"] = {"ids": block["ids"], "broken": block["ensemble_broken"]}
        elif u.kind == "blackbox":
            block = got[u].value[OUTCOMES]
            out[f"blackbox_{u.norm}"] = {"ids": block["ids"], "broken": block["broken"]}
    return out


def assemble(units: Sequence[EvalUnit], partials: Sequence[UnitResult], settings: RobustnessSettings,
             n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(result, visuals)`` of :func:`~ctharden.evaluation.robustness.evaluate_robustness` from
    every unit's result (``partials[i]`` belongs to ``units[i]``; any order). ``seconds`` sums the
    units' own times per group (``total``: all units). ``result["outcomes"]`` holds the per-sample
    outcomes (:func:`outcomes_of`; the evaluation stage writes them to their own file) and
    ``result["intervals"]`` every interval (:mod:`ctharden.evaluation.evidence`)."""
    got = _by_unit(units, partials)
    missing = [u.name for u in evaluation_units(settings, n_models) if u not in got]
    if missing:
        raise DataError(f"evaluation units without a result: {missing}")
    random_res, opt_res = assemble_nps(units, partials, settings, n_models)
    pgd = {u.norm: got[u].value for u in units if u.kind == "pgd"}
    curves = {norm: _without(pgd[norm][0], OUTCOMES) for norm in PGD_NORMS if norm in pgd}
    sanity = {norm: pgd[norm][1] for norm in PGD_NORMS if norm in pgd}
    groups = ("clean", "nps", "pgd", "examples") if settings.white_box else ("clean", "nps", "blackbox", "examples")
    timings = dict.fromkeys(groups, 0.0)
    for u, r in got.items():
        timings[_TIMING_GROUP[u.kind]] += r.seconds
    clean = {split: _without(m, OUTCOMES) for split, m in got[EvalUnit("clean")].value.items()}
    result = {
        "clean": clean,
        "random_nps": random_res,
        "optimized_nps": opt_res,
        "pgd": curves,
        "sanity": {norm: {"passed": s["passed"], "flags": s["flags"], "checks": s["checks"],
                          "settings": s["settings"]} for norm, s in sanity.items()},
        "sanity_passed": all(s["passed"] for s in sanity.values()) if settings.white_box else None,
        "n_models": n_models,
        "settings": settings.to_dict(),
        "seconds": {k: round(v, 1) for k, v in {**timings, "total": sum(timings.values())}.items()},
        "outcomes": outcomes_of(units, got, settings),
    }
    if not settings.white_box:
        result["blackbox"] = {u.norm: _without(got[u].value, OUTCOMES) for u in units if u.kind == "blackbox"}
        result["white_box"] = {"applicable": False, "reason": NO_GRADIENTS,
                               "not_run": ["optimized_nps", "pgd", "attack ensemble (gradient members)",
                                           "sanity checks"]}
    result["intervals"] = result_intervals(result)
    return result, got[EvalUnit("examples")].value


def run_nps_attacks(
    models: Sequence[nn.Module],
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    seed: int,
    nps: NPSModel | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random and optimised NPS attacks for every split and model.

    Returns ``(random, optimized)``: ``{split: block}`` with the block of :func:`_nps_block`; the
    first model is the selected one (the figures' perturbations come from :func:`example_visuals`).
    """

    todo = [u for u in evaluation_units(settings, len(models)) if u.kind in NPS_KINDS]
    done = run_units(todo, models, data, settings, seed=seed, nps=nps, device=device)
    return assemble_nps(todo, done, settings, len(models))


def model_set(model: nn.Module, fold_models: Sequence[nn.Module], settings: RobustnessSettings) -> list[nn.Module]:
    """The models the NPS attacks run on: the selected one first, then (``models: folds``) the others."""
    return [model, *fold_models] if settings.models == "folds" else [model]


def evaluate_robustness(
    model: nn.Module,
    data: ArraySet,
    settings: RobustnessSettings,
    *,
    seed: int,
    fold_models: Sequence[nn.Module] = (),
    nps: NPSModel | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole evaluation of ``model`` (the selected model) on ``data``: every unit of
    :mod:`ctharden.evaluation.units` in turn, then assembled.

    Args:
        fold_models: further models (the other CV folds) for the NPS attacks' mean ± std when
            ``settings.models == "folds"``.

    Returns:
        ``(result, visuals)``: the JSON-serialisable result and the example arrays.
    """

    models = model_set(model, fold_models, settings)
    todo = evaluation_units(settings, len(models))
    done = run_units(todo, models, data, settings, seed=seed, nps=nps, device=device)
    return assemble(todo, done, settings, len(models))
