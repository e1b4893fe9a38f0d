"""Patient-grouped, label-stratified train/test split and k-fold assignment.

No patient (or pseudo-patient, e.g. a block of neighbouring COVID-CT file numbers) ever appears
in more than one of {test, a train fold}. Groups are shuffled with the seed inside each label
stratum (a group's stratum is its majority label); whole groups go to test until each stratum
has its share of samples, then the rest are dealt to the k folds greedily, always into the fold
with the fewest samples of that stratum so far, which keeps folds balanced in size and labels.
:func:`assign_folds_to_given_splits` keeps a split the data came with and only deals its train rows
to folds, the same way.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from ctharden.core.errors import DataError


def assign_splits(
    manifest: pd.DataFrame, *, test_fraction: float, n_folds: int, seed: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Return ``manifest`` with ``split`` (train|test) and ``fold`` (-1 for test) columns, and a summary.

    ``n_folds`` is reduced (with a warning) when there are fewer training groups than folds;
    the summary records the folds actually used.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if n_folds < 1:
        raise DataError(f"n_folds must be >= 1, got {n_folds}")
    df = manifest.copy()
    rng = np.random.default_rng(seed)
    groups = df.groupby("patient_id", sort=True)["label"].agg(lambda s: int(s.mode().iloc[0]))
    sizes = df.groupby("patient_id", sort=True).size()

    split_of: dict[str, str] = {}
    fold_of: dict[str, int] = {}
    train_groups: list[str] = []
    for label in sorted(groups.unique()):
        members = np.array(groups.index[groups == label])
        rng.shuffle(members)
        stratum_total = int(sizes[members].sum())
        target = test_fraction * stratum_total
        in_test = 0
        for gid in members:
            # Only move a group to test while it leaves at least one group of this label for training.
            remaining = len(members) - sum(1 for g in members if split_of.get(g) == "test")
            if in_test + sizes[gid] / 2 <= target and remaining > 1:
                split_of[gid] = "test"
                in_test += int(sizes[gid])
            else:
                split_of[gid] = "train"
                train_groups.append(gid)

    used_folds = max(1, min(n_folds, len(train_groups)))
    if used_folds < n_folds:
        warnings.warn(
            f"only {len(train_groups)} training patient groups: using {used_folds} folds instead of {n_folds}",
            stacklevel=2,
        )
    load = np.zeros((used_folds, 2), dtype=np.int64)  # samples per fold for (this stratum, total)
    for label in sorted(groups.unique()):
        load[:, 0] = 0
        train_members = [g for g in train_groups if groups[g] == label]
        for gid in train_members:
            k = int(np.lexsort((load[:, 1], load[:, 0]))[0])
            fold_of[gid] = k
            load[k] += int(sizes[gid])

    df["split"] = df["patient_id"].map(split_of)
    df["fold"] = df["patient_id"].map(lambda g: fold_of.get(g, -1)).astype(int)
    summary = {
        "method": "patient-grouped, label-stratified",
        "seed": seed,
        "test_fraction": test_fraction,
        "n_folds_requested": n_folds,
        "n_folds": used_folds,
        "n_groups": int(len(groups)),
        "n_test": int((df["split"] == "test").sum()),
        "n_train": int((df["split"] == "train").sum()),
    }
    return df, summary


def assign_folds_to_given_splits(
    manifest: pd.DataFrame, *, n_folds: int, seed: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Keep ``manifest``'s given ``split`` (train|test); deal the train rows to folds like :func:`assign_splits`.

    Folds are patient-grouped and label-stratified (:func:`assign_splits` with no test share, on
    the train rows only); test rows get fold -1. Raises :class:`DataError` on a split value other
    than train/test, a patient in both splits, or no train rows.
    """
    if "split" not in manifest.columns:
        raise DataError("given splits: the samples have no 'split' column")
    df = manifest.copy()
    split = df["split"].astype(str)
    bad = sorted(set(split) - {"train", "test"})
    if bad:
        raise DataError(f"given splits: split values {bad} are not 'train' or 'test'")
    both = sorted(set(df.loc[split == "train", "patient_id"]) & set(df.loc[split == "test", "patient_id"]))
    if both:
        raise DataError(f"given splits: patient(s) {both[:5]} in both train and test")
    train = split == "train"
    if not train.any():
        raise DataError("given splits: no train samples")
    folded, summary = assign_splits(df[train], test_fraction=0.0, n_folds=n_folds, seed=seed)
    df["fold"] = -1
    df.loc[train, "fold"] = folded["fold"]
    df["fold"] = df["fold"].astype(int)
    summary = {
        **summary,
        "method": "given train/test split; folds patient-grouped, label-stratified",
        "test_fraction": None,
        "n_groups": int(df["patient_id"].nunique()),
        "n_test": int((~train).sum()),
        "n_train": int(train.sum()),
    }
    return df, summary
