"""Paired comparisons of two evaluations of the same samples: champion promotion and the
pull-request regression check.

Both models' per-sample outcomes (``metrics/outcomes/<variant>/<job>.json``, written by the
evaluation) are paired by sample id. For a gated criterion a sample is *ok* when it survived:

- ``robust_<norm>_acc_eps<ε>``: not broken by any attack of the ensemble at ε;
- ``<attack>_san_mas<mAs>``: not flipped by the NPS attack at that dose;

and the two models differ only on the discordant pairs: ``b`` samples only the new model gets
right, ``c`` only the old one. The exact McNemar test (:func:`ctharden.evaluation.paired.mcnemar_exact`)
decides:

- **promotion** (:func:`promotion_decision`): the new version replaces the champion only if it is
  better on the primary criterion (one-sided p < ``gate.champion.alpha``) *and* its clean AUC is
  non-inferior by the paired DeLong test within ``gate.champion.max_clean_auc_drop``;
- **regression** (:func:`paired_regression`): the pull request's model is worse than the base's
  on a criterion only if the one-sided test says so at ``alpha`` — a run on another CPU whose
  bf16 rounding moves a sample or two does not read as a regression.

The evaluation seeds every attack from ``(seed, unit)`` and picks its samples from the dataset, so
two evaluations with the same settings and dataset attack the same samples with the same seeds.
Pairs need the same dataset: outcomes of different datasets (content hash) are not compared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctharden.core.errors import DataError
from ctharden.evaluation.paired import auc_noninferior, mcnemar_exact, paired_outcomes
from ctharden.gate.criteria import Criterion

_ROBUST = re.compile(r"^robust_(linf|l2)_acc_eps(.+)$")
_SAN = re.compile(r"^(random|optimized)_san_mas(.+)$")


def survived(outcomes: Mapping[str, Any], c: Criterion) -> dict[str, bool] | None:
    """``{sample id: ok}`` of criterion ``c`` in an outcomes file (None: not a per-sample rate, or
    not in this file)."""
    m = _ROBUST.match(c.name)
    if m:
        block = outcomes.get(f"ensemble_{m.group(1)}")
        flags = (block or {}).get("broken", {}).get(m.group(2))
        return None if flags is None else {i: not b for i, b in zip(block["ids"], flags, strict=True)}  # type: ignore[index]
    m = _SAN.match(c.name)
    if m:
        block = outcomes.get(m.group(1))
        flags = (block or {}).get("flipped", {}).get(m.group(2))
        return None if flags is None else {i: not f for i, f in zip(block["ids"], flags, strict=True)}  # type: ignore[index]
    return None


def compare(new: Mapping[str, Any], old: Mapping[str, Any], c: Criterion) -> dict[str, Any]:
    """The paired counts of criterion ``c`` on the samples both outcome files share.

    Raises:
        DataError: the files are of different datasets, or do not both hold the criterion.
    """
    if new.get("dataset_hash") != old.get("dataset_hash"):
        raise DataError(f"{c.name}: the two evaluations are of different datasets "
                        f"({str(new.get('dataset_hash'))[:12]} vs {str(old.get('dataset_hash'))[:12]}); "
                        "re-evaluate the older model on the current data")
    a, b = survived(new, c), survived(old, c)
    if a is None or b is None:
        raise DataError(f"{c.name}: no per-sample outcomes for it in {'the new' if a is None else 'the old'} "
                        "evaluation")
    ids = sorted(set(a) & set(b))
    if not ids:
        raise DataError(f"{c.name}: the two evaluations attacked no common sample")
    counts = paired_outcomes(np.array([a[i] for i in ids]), np.array([b[i] for i in ids]))
    return {"criterion": c.name, **counts.to_dict(), "unpaired": len(set(a) ^ set(b))}


def _auc(new: Mapping[str, Any], old: Mapping[str, Any], margin: float, alpha: float) -> dict[str, Any]:
    """Paired DeLong non-inferiority of the new model's clean AUC on the common test samples."""
    sn = dict(zip(new["clean"]["ids"], new["clean"]["score"], strict=True))
    so = dict(zip(old["clean"]["ids"], old["clean"]["score"], strict=True))
    y = dict(zip(new["clean"]["ids"], new["clean"]["y"], strict=True))
    ids = sorted(set(sn) & set(so))
    return auc_noninferior(np.array([y[i] for i in ids]), np.array([sn[i] for i in ids]),
                           np.array([so[i] for i in ids]), margin=margin, alpha=alpha)


def promotion_decision(new: Mapping[str, Any], champion: Mapping[str, Any], primary: Criterion, *,
                       alpha: float, max_auc_drop: float) -> tuple[bool, str, dict[str, Any]]:
    """Should the new model replace the champion? ``(promote, why, evidence)`` from their outcome
    files (see the module docstring). A primary criterion without per-sample outcomes (clean AUC)
    is decided by the paired DeLong test alone: better with one-sided p < ``alpha``."""
    auc = _auc(new, champion, max_auc_drop, alpha)
    evidence: dict[str, Any] = {"auc": auc}
    if primary.kind == "clean_auc":
        better = auc["diff"] > 0 and auc["lower"] > 0  # non-inferior at margin 0 == superior
        why = f"clean AUC {auc['auc_new']:.4g} vs {auc['auc_old']:.4g} (diff lower bound {auc['lower']:.4g})"
        return better, ("better: " if better else "not better: ") + why, evidence
    pair = compare(new, champion, primary)
    p = mcnemar_exact(pair["new_only"], pair["old_only"], alternative="greater")
    evidence.update(pair=pair, p_value=p)
    sig = (f"{primary.name}: {pair['new_only']} samples only the new version survives, {pair['old_only']} only "
           f"the champion, of {pair['n']} (exact McNemar p = {p:.3g}, alpha {alpha:g})")
    if not p < alpha:
        return False, f"not significantly better on {sig}", evidence
    if not auc["passed"]:
        return False, (f"better on {sig}, but clean AUC {auc['auc_new']:.4g} is not non-inferior to "
                       f"{auc['auc_old']:.4g} within {max_auc_drop:g} (paired DeLong lower bound "
                       f"{auc['lower']:.4g})"), evidence
    return True, f"better on {sig}; clean AUC {auc['auc_new']:.4g} vs {auc['auc_old']:.4g} non-inferior", evidence


def paired_regression(head: Mapping[str, Any], base: Mapping[str, Any], c: Criterion, *, alpha: float
                      ) -> dict[str, Any]:
    """Is the head evaluation significantly worse than the base on criterion ``c``? One-sided
    exact McNemar (``p < alpha``: regressed) on the samples both attacked."""
    pair = compare(head, base, c)
    p = mcnemar_exact(pair["new_only"], pair["old_only"], alternative="less")
    return {**pair, "p_value": p, "alpha": alpha, "regressed": p < alpha}
