"""The papers' robustness trends, checked on an evaluation instead of assumed.

shen 2020 reports three trends (Table 2, Figs. 7-8 and Tables 4-5); ctharden checks each on the
measured headline metrics (:mod:`ctharden.evaluation.headline`) and writes the verdict next to the
numbers (``metrics/robustness*.json`` ``<job>.trends``):

- **SAN/N falls as mAs rises** (more dose, less noise): for each attack and split, SAN/N at every
  mAs level is at most the SAN/N at the next lower level;
- **optimised ≥ random**: at every mAs and split the optimised attack breaks at least as many
  samples as the random one (it starts from random draws and ascends);
- **hardening lowers SAN without losing much AUC** (hardened models only): test SAN/N of the
  hardened model at most the baseline's at every mAs and attack, and its clean test AUC at most
  ``max_auc_drop`` below the baseline's (the tune stage's ``max_auc_drop``, the same stated loss
  the training ε was chosen under; not checked when the tune stage sets only an absolute floor).

Each check lists where it does not hold, so "holds: false" points at the level to look at. These
are observations about a model, not gate criteria.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctharden.evaluation.headline import CLEAN_TEST_AUC, san_rate_name

ATTACKS = ("random", "optimized")


def _series(headline: Mapping[str, float], attack: str, split: str, mas: Sequence[float]) -> list[float] | None:
    names = [san_rate_name(attack, split, m) for m in mas]
    if not all(n in headline for n in names):
        return None
    return [float(headline[n]) for n in names]


def nps_trends(headline: Mapping[str, float], mas_levels: Sequence[float], splits: Sequence[str]) -> dict[str, Any]:
    """``san_falls_with_mas`` and ``optimized_ge_random`` per attack/split (SAN/N in %, mAs ascending)."""
    mas = sorted(float(m) for m in mas_levels)
    falls: dict[str, Any] = {}
    ge: dict[str, Any] = {}
    for split in splits:
        series = {a: _series(headline, a, split, mas) for a in ATTACKS}
        for attack, s in series.items():
            if s is None:
                continue
            rises = [[mas[i], mas[i + 1]] for i in range(len(s) - 1) if s[i + 1] > s[i]]
            falls[f"{attack}_{split}"] = {"holds": not rises, "mas": mas, "san_rate": s, "rises_between": rises}
        rnd, opt = series["random"], series["optimized"]
        if rnd is not None and opt is not None:
            below = [m for m, r, o in zip(mas, rnd, opt, strict=True) if o < r]
            ge[split] = {"holds": not below, "optimized_below_random_at_mas": below}
    return {"san_falls_with_mas": falls, "optimized_ge_random": ge}


def hardening_trends(baseline: Mapping[str, float], hardened: Mapping[str, float], mas_levels: Sequence[float],
                     max_auc_drop: float | None) -> dict[str, Any]:
    """Test SAN/N of the hardened model vs its baseline per attack and mAs, and the clean AUC drop."""
    mas = sorted(float(m) for m in mas_levels)
    lowered: dict[str, Any] = {}
    for attack in ATTACKS:
        b, h = _series(baseline, attack, "test", mas), _series(hardened, attack, "test", mas)
        if b is None or h is None:
            continue
        worse = [m for m, x, y in zip(mas, b, h, strict=True) if y > x]
        lowered[attack] = {"holds": not worse, "mas": mas, "baseline": b, "hardened": h, "higher_at_mas": worse}
    out: dict[str, Any] = {"san_lowered": lowered}
    if max_auc_drop is not None and CLEAN_TEST_AUC in baseline and CLEAN_TEST_AUC in hardened:
        drop = float(baseline[CLEAN_TEST_AUC]) - float(hardened[CLEAN_TEST_AUC])
        out["clean_auc"] = {"holds": drop <= max_auc_drop, "baseline": float(baseline[CLEAN_TEST_AUC]),
                            "hardened": float(hardened[CLEAN_TEST_AUC]), "drop": drop, "max_drop": max_auc_drop}
    return out


def trend_lines(trends: Mapping[str, Any]) -> list[str]:
    """One markdown bullet per checked trend (for the report)."""
    lines = []
    for key, c in trends.get("san_falls_with_mas", {}).items():
        where = "" if c["holds"] else f" (rises between {', '.join(f'{a:g}→{b:g}' for a, b in c['rises_between'])} mAs)"
        lines.append(f"- SAN/N falls as mAs rises, {key.replace('_', ' ')}: {'yes' if c['holds'] else 'no'}{where}")
    for split, c in trends.get("optimized_ge_random", {}).items():
        below = ", ".join(f"{m:g}" for m in c["optimized_below_random_at_mas"])
        where = "" if c["holds"] else f" (below at {below} mAs)"
        lines.append(f"- optimised ≥ random SAN/N, {split}: {'yes' if c['holds'] else 'no'}{where}")
    for attack, c in trends.get("san_lowered", {}).items():
        where = "" if c["holds"] else f" (higher at {', '.join(f'{m:g}' for m in c['higher_at_mas'])} mAs)"
        lines.append(f"- hardening lowers {attack} test SAN/N: {'yes' if c['holds'] else 'no'}{where}")
    auc = trends.get("clean_auc")
    if auc:
        lines.append(f"- clean test AUC {auc['baseline']:.3f} → {auc['hardened']:.3f} (drop {auc['drop']:+.3f}, "
                     f"stated limit {auc['max_drop']:g}): {'within' if auc['holds'] else 'beyond'} the limit")
    return lines
